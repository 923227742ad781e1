"""The library's error types."""


class FormatError(ValueError):
    """Raised by every decoder for corrupt, truncated, hostile or mismatched bytes."""


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend (FEDCOMPRESS_BACKEND or backend=...) cannot run this op."""


class BadInput(Exception):
    """A user error on the command line (unknown name, bad number, missing data); ``fedcompress``
    prints it and exits with code 2. Here, not in cli.py, so that pipelines raise it without
    importing the command line."""
