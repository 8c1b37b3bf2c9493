"""User-facing errors: the CLI prints these as one red line and exits 1, never with a traceback."""


class TlrefusalError(Exception):
    """A problem the user can fix (bad path, bad flag, data that does not fit). The message is one line."""
