"""The one exception type a user can cause.

CLIs catch `UserError` and print its message as a single line with a non-zero exit; any
other exception is a bug in the toolkit and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong checkpoint, an unknown option."""


def one_line(message: str) -> str:
    """Collapse a message to one line so that a CLI error is always a single line."""
    return " ".join(str(message).split())
