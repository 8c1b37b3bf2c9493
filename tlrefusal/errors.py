"""User-facing errors: the CLI prints these as one red line and exits 1, never with a traceback."""


class TlrefusalError(Exception):
    """A problem the user can fix (bad path, bad flag, data that does not fit). The message is one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
