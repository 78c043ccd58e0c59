"""The input-error contract every console script keeps.

An `InputError` is a problem with something the user gave (a config key, a shard list, a checkpoint path, a
prompts file): its message names the problem and the fix, in one line. The console scripts turn it into one line
on stderr (`prog: <kind>: message`) and exit code 2 (ldmscale.runtime.cli); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Something the user gave is wrong; the message says what and what to do."""

    kind = ""  # printed before the message, e.g. "config error"; empty for errors that speak for themselves
