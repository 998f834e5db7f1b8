"""The one exception type for bad input: its message is shown to the user without a traceback."""


class CaeeError(Exception):
    """Bad input (config key, file, checkpoint, label values) with an actionable message."""
