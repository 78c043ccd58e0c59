"""The one rule for what counts as a secret: used for saved/logged configs and for every storage log line.

A key is secret when its name says so (secret, token, password, credential, session, private, or a key
name such as `key`, `access_key`, `key_id`); its value is masked wherever the options are shown, and the
values themselves (plus the AWS credential variables) are scrubbed from free text such as server errors.
"""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_KEY_RE = re.compile(r"(secret|token|passw|credential|session|private|(^|_)key($|_)|access_?key)", re.I)
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
MASK = "***"


def is_secret_key(name: object) -> bool:
    return bool(SECRET_KEY_RE.search(str(name)))


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy safe to log or save: values of secret-looking keys (also nested) become '***'."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif is_secret_key(k) and v not in (None, ""):
            out[k] = MASK
        else:
            out[k] = v
    return out


def secret_values(options: dict[str, Any] | None) -> set[str]:
    """The secret strings themselves: from the options and from the AWS credential variables."""
    vals = {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    stack = [options or {}]
    while stack:
        for k, v in stack.pop().items():
            if isinstance(v, dict):
                stack.append(v)
            elif is_secret_key(k) and isinstance(v, str) and v:
                vals.add(v)
    return vals


def scrub(text: str, options: dict[str, Any] | None = None) -> str:
    """Remove credentials from free text (server error messages may echo the access key id)."""
    # Very short values would mangle ordinary words; real keys are long.
    for secret in sorted((v for v in secret_values(options) if len(v) >= 4), key=len, reverse=True):
        text = text.replace(secret, MASK)
    # user:password@host in URLs
    return re.sub(r"(://)[^/@\s]+@", rf"\1{MASK}@", text)
