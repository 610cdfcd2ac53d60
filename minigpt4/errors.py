"""One exception type for mistakes a user can fix; entry scripts print it as one line."""

from __future__ import annotations

import functools
import logging
import sys


class UserError(Exception):
    """Bad input or configuration: the message names the thing and the fix."""

    exit_code = 2  # a subclass may choose another (evaluate.fail_on_error: 1)


def exit_on_user_error(fn):
    """Wrap an entry point so that a UserError prints one line and exits 2, or its own
    exit_code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            logging.getLogger("minigpt4").debug("user error", exc_info=True)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
