"""The one error handler of the console scripts: an input error is one line on stderr and exit code 2.

    def cli(argv=None):
        run_cli("ldmscale-sample", lambda: main(parse_args(argv)))

`body` returns the exit code (None = 0). An `InputError` (ldmscale.runtime.errors) prints
`prog: <kind>: message` on one line. The command lines are parsed by `ArgumentParser`, whose errors are
InputErrors too (argparse's own would print the whole usage text above the error), and whose value types
(`at_least`, `finite_float`) refuse a 0 or a nan on the command line rather than after a model has loaded.
Errors that are not the input's fault propagate with their traceback.

Exit codes: 0 done, 1 a run that failed after it started, 2 an input error, 3 Slurm refused the job,
130 interrupted (docs/errors.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from ldmscale.runtime.errors import InputError

EXIT_INPUT = 2


class UsageError(InputError):
    """The command line itself is wrong: an unknown option, a missing argument, a value of the wrong type."""

    kind = "usage error"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`prog: usage error: ... (see prog --help)`, exit 2 under run_cli), and
    options accepted anywhere among the positional arguments (`parse_args` parses intermixed)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):  # argparse's own (untyped) signature
        # `ldmscale-train --config C a.b=1 --resume never c.d=2`: plain parse_args refuses the second override
        return self.parse_intermixed_args(args, namespace)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: give a whole number >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def finite_float(text: str) -> float:
    """An argparse type: a finite number (float() alone takes 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def output_dir_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a local folder could not be created or written by this user, or None: checked before any work, so a
    run does not die at its end with a traceback from mkdir. Callers raise it as their own kind of error."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return f"{p} is a file, not a folder"
    existing = next((a for a in (p, *p.parents) if a.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"{existing} is a file, so {p} cannot be a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None


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
        raise SystemExit(EXIT_INPUT) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    raise SystemExit(code or 0)
