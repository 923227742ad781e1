"""The library's error types."""


class FormatError(ValueError):
    """Raised by every decoder for corrupt, truncated, hostile or mismatched bytes."""


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend (FEDCOMPRESS_BACKEND or backend=...) cannot run this op."""
