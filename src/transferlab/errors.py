"""The error a user can act on: stages print its message, without a traceback, and exit 1."""


class UserError(Exception):
    """Bad input or environment: the message says what, where, and what to do."""
