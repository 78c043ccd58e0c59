"""The one error handler of the console scripts: an input error is one line on stderr and exit code 2.

    def cli(argv=None):
        run_cli("ldmscale-sample", lambda: main(parse_args(argv)))

`body` returns the exit code (None = 0). An `InputError` (ldmscale.runtime.errors) prints
`prog: <kind>: message` on one line; so do the argument parser's own errors (argparse exits 2 itself). Errors that
are not the input's fault propagate with their traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from ldmscale.runtime.errors import InputError


def one_line(text: str) -> str:
    """Messages may wrap a lower layer's text: fold it onto one line."""
    return " ".join(str(text).split())


def input_error_line(prog: str, exc: InputError) -> str:
    kind = getattr(exc, "kind", "")
    return f"{prog}: {kind + ': ' if kind else ''}{one_line(str(exc))}"


def run_cli(prog: str, body: Callable[[], int | None]) -> NoReturn:
    """Run a console script's body under the input-error contract, then exit with its code."""
    try:
        code = body()
    except InputError as exc:
        print(input_error_line(prog, exc), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    raise SystemExit(code or 0)
