"""The one exception type every data problem raises."""

__all__ = ["DataError"]


class DataError(ValueError):
    """A data file is missing, truncated, corrupt or fails its checksum.

    The message names the file, what was expected, what was found and what to do.
    """
