"""Errors a user can fix, and errors shortened to what fits on one line of a log or a message.

Imports nothing of the project, so that data/ and modeling/ use the same `first_line`."""


class RunError(RuntimeError):
    """A mistake the user can fix (a folder, a file, the data): the entry points print it as one
    `error:` line and exit 1."""


class AgreedRunError(RunError):
    """A RunError that every process raises together, after agreeing on it: each node reports it
    once (its first process), at once."""


def first_line(error: BaseException) -> str:
    """`Type: first line of the message` (just `Type` when there is no message)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
