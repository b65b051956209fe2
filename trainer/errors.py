"""Errors shortened to what fits on one line of a log or an error message."""


def first_line(error: BaseException) -> str:
    """`Type: first line of the message` (just `Type` when there is no message)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
