"""The one exception type a user can cause.

CLIs catch `UserError` and print its message as a single line with a non-zero exit; any
other exception is a bug in the toolkit and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong checkpoint, an unknown option.

    `prog` names the command whose usage was wrong (set by `smix.cli.ArgParser`), so the
    one-line message can say `smix robustness fgsm: error: …` without repeating itself.
    `every_rank`: the same error was raised on every process of a torchrun group
    (`smix.dist.agree`), so only rank 0 need print it.
    """

    def __init__(self, message: str, prog: str | None = None, every_rank: bool = False):
        super().__init__(message)
        self.prog = prog
        self.every_rank = every_rank


def one_line(message: str) -> str:
    """Collapse a message to one line so that a CLI error is always a single line."""
    return " ".join(str(message).split())
