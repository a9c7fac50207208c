"""The one exception class of bigpicture."""


class TilingError(ValueError):
    """Raised for anything the engine cannot do exactly.

    The message names the node and op, says why, and says what to do.
    """
