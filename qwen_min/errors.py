"""Errors a user can cause, and how the command-line entry points show them.

Every boundary (a checkpoint folder, a data file, a run folder, a flag) checks what it is given
and raises `UserError` with one sentence that names the file or flag and says what to do. The
entry points (`train.py`, `evaluate.py`, `flops.py`, `python -m qwen_min`) print that sentence
and exit with status 2, argparse's code for a usage error. Any other exception is a bug in
qwen-min and keeps its traceback, so it can be reported.
"""

import os
import sys


class UserError(Exception):
    """Something the user gave us is wrong; the message says what and what to do instead."""


def run_cli(main, argv=None):
    """Runs an entry point's `main(argv)`, turning a UserError into one line on stderr and exit 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:  # `python flops.py | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush cannot fail
        raise SystemExit(1) from None
