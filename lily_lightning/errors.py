"""The one exception type for problems a user can fix (bad config, missing data or weights)."""


class UsageError(ValueError):
    """Raised for input the user can correct; the CLI prints its message alone, without a traceback.

    Subclasses ``ValueError`` so library callers can catch it the usual way.
    """


def usage_message(error: UsageError) -> str:
    """The message to show for ``error``, alone.

    A UsageError raised in a DataLoader worker process comes back re-raised by torch with the worker's whole
    traceback as its message ("Caught UsageError in DataLoader worker process 0. Original Traceback ...",
    torch/_utils.py ExceptionWrapper); the original message is the text after its last "UsageError: ".
    """
    text = str(error)
    marker = "UsageError: "
    if text.startswith("Caught UsageError in DataLoader worker") and marker in text:
        text = text[text.rindex(marker) + len(marker) :].strip()
    return text
