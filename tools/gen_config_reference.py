"""Write docs/reference/config.md from the configuration dataclasses (ldmscale/config/schema.py).

Every key of `Config` gets one row: its key, type, default, allowed values (for `Literal` fields) and what it means,
read from the source: a docstring string right under the field, else the comment on the field's line(s) and the
block of comment lines directly above it. A section's class docstring heads its section.

    python tools/gen_config_reference.py           # rewrite the page
    python tools/gen_config_reference.py --check   # exit 1, naming the keys, when the page is out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import json
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

from ldmscale.config import schema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "ldmscale" / "config" / "schema.py"
PAGE = ROOT / "docs" / "reference" / "config.md"

HEADER = """# Configuration reference

Generated from the dataclasses in `ldmscale/config/schema.py` by `python tools/gen_config_reference.py`; do not
edit by hand (the test suite runs `python tools/gen_config_reference.py --check`). How a config is put together
(defaults, YAML files, `include:`, `section.key=value` overrides) is in [Configuration](../configuration.md).
"""


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    key: str
    type: str
    default: str
    allowed: str
    doc: str


def field_comments(source: str) -> dict[str, dict[str, str]]:
    """{class name: {field name: its documentation}} from the source of a module of dataclasses."""
    lines = source.splitlines()
    comments: dict[int, str] = {}  # 1-based line -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()

    def comment_only(lineno: int) -> bool:
        return lineno in comments and lines[lineno - 1].lstrip().startswith("#")

    out: dict[str, dict[str, str]] = {}
    for cls in ast.parse(source).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        docs: dict[str, str] = {}
        body = cls.body
        for i, node in enumerate(body):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())  # a docstring under the field wins
                continue
            above: list[str] = []
            line = node.lineno - 1
            while line > 0 and comment_only(line):
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)
                        if n in comments and not comment_only(n)]
            docs[node.target.id] = " ".join(above + trailing)
        out[cls.name] = docs
    return out


def type_name(tp: Any) -> str:
    """A readable name for an annotation: int, list[str], dict[str, Any], the values' type for a Literal, a union's
    members joined by "or" (a `|` would end the table cell)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(sorted({type(a).__name__ for a in typing.get_args(tp)}))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is Any:
        return "Any"
    return getattr(tp, "__name__", str(tp))


def render_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"{f.name} has no default")


def list_item(tp: Any) -> type | None:
    """The dataclass of a list-of-dataclasses field (data.sources: each item's keys get their own section)."""
    args = typing.get_args(tp)
    return args[0] if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]) else None


def collect(cls: type, prefix: str, docs: dict[str, dict[str, str]],
            sections: list[tuple[str, str, list[FieldDoc]]]) -> None:
    """Append (section key, its class docstring, its fields) for cls and, after it, for its nested sections (a list
    of dataclasses as `key[]`)."""
    hints = typing.get_type_hints(cls)
    rows: list[FieldDoc] = []
    nested: list[tuple[type, str]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            nested.append((tp, key))
            continue
        if list_item(tp) is not None:
            nested.append((list_item(tp), key + "[]"))  # type: ignore[arg-type]
        allowed = ""
        if typing.get_origin(tp) is Literal:
            allowed = ", ".join(f"`{render_value(a)}`" for a in typing.get_args(tp))
        rows.append(FieldDoc(key, type_name(tp), render_value(default_of(f)), allowed,
                             docs.get(cls.__name__, {}).get(f.name, "")))
    doc = "" if _generated_doc(cls) else " ".join((cls.__doc__ or "").split())
    sections.append((prefix.rstrip("."), doc, rows))
    for sub, key in nested:
        collect(sub, key + ".", docs, sections)


def _generated_doc(cls: type) -> bool:
    """dataclass() writes `Name(field: type, ...)` as the docstring of a class without one."""
    return (cls.__doc__ or "").startswith(cls.__name__ + "(")


def cell(text: str) -> str:
    """Source text as a table cell: outside `code spans`, `|`, `*` and `<` escaped (cell border, emphasis, HTML)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # the even pieces lie outside code spans
        parts[i] = parts[i].replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")
    return "`".join(parts)


def render() -> str:
    docs = field_comments(SCHEMA.read_text())
    parts = [HEADER]
    for f in dataclasses.fields(schema.Config):
        sections: list[tuple[str, str, list[FieldDoc]]] = []
        collect(typing.get_type_hints(schema.Config)[f.name], f.name + ".", docs, sections)
        for name, doc, rows in sections:
            parts.append(f"\n## `{name}`\n")
            if doc:
                parts.append(f"\n{doc}\n")
            parts.append("\n| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n")
            for r in rows:
                parts.append(f"| `{r.key}` | `{r.type}` | `{r.default}` | {r.allowed} | {cell(r.doc)} |\n")
    return "".join(parts)


ROW = re.compile(r"^\| `([\w.\[\]]+)` \|(.*)$")


def rows_by_key(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in map(ROW.match, text.splitlines()) if m}


def stale_keys(current: str, wanted: str) -> list[str]:
    """What --check reports: keys missing from the page, keys the page has that no longer exist, rows that differ."""
    have, want = rows_by_key(current), rows_by_key(wanted)
    report = [f"missing: {k}" for k in want if k not in have]
    report += [f"no longer exists: {k}" for k in have if k not in want]
    report += [f"changed: {k}" for k in want if k in have and have[k] != want[k]]
    if not report and current != wanted:
        report.append("text outside the key rows changed")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the page differs from what would be written")
    args = ap.parse_args(argv)
    wanted = render()
    shown = PAGE.relative_to(ROOT) if PAGE.is_relative_to(ROOT) else PAGE
    if args.check:
        current = PAGE.read_text() if PAGE.exists() else ""
        problems = stale_keys(current, wanted)
        if problems:
            print(f"{shown} is out of date ({'; '.join(problems)}): "
                  f"run python tools/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(wanted)
    print(f"wrote {shown} ({len(rows_by_key(wanted))} keys)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
