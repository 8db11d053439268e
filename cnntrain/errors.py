"""The one exception type for bad user input."""


class UserError(Exception):
    """A bad input from the user: reported as one line, exit code 1."""
