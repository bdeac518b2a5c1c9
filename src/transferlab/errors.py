"""What a user is told: errors they can act on (stages print the message, without a traceback,
and exit 1), and one-line warnings about what was done instead (a damaged cache rebuilt, say)."""
import sys


class UserError(Exception):
    """Bad input or environment: the message says what, where, and what to do."""


def warn(message: str) -> None:
    print(f"transferlab: warning: {message}", file=sys.stderr, flush=True)
