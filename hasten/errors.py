"""The one exception type users see: a clear, one-line message about bad input."""


class HastenError(Exception):
    """Raised for invalid input or configuration; the CLI prints it as one line and exits non-zero."""
