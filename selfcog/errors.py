"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class SelfcogError(Exception):
    """A problem the user can fix: bad input, a wrong path, no network. The message names place and reason."""
