"""User-facing failures and the wrapper that turns them into one line on stderr.

A `UserError` is a mistake the person at the keyboard can fix (a wrong path, a missing column, a
folder that is not ours). It is shown as `error: <message>` with no traceback and exit status 2,
the convention of argparse and most Unix tools. Anything else is a bug and keeps its traceback.
Entry points of other packages (the trainer) may import this module too.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2
# 128 + SIGINT, what a shell reports for a command stopped with Ctrl-C.
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""


def run_main(main: Callable[[], int | None], interrupted_hint: str = "") -> NoReturn:
    """Run an entry point; map UserError and Ctrl-C to one clear line and an exit status."""
    try:
        status = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"interrupted{': ' + interrupted_hint if interrupted_hint else ''}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(status or 0)
