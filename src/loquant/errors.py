"""The one exception type loquant raises for bad input."""


class LoquantError(ValueError):
    """Bad input or a broken file. The message is one line, meant for the user."""
