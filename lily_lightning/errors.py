"""The one exception type for problems a user can fix (bad config, missing data or weights)."""


class UsageError(ValueError):
    """Raised for input the user can correct; the CLI prints its message alone, without a traceback.

    Subclasses ``ValueError`` so library callers can catch it the usual way.
    """
