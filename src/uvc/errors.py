"""One exception type for every problem a user can fix, so the CLI can print it without a traceback."""


class UVCError(Exception):
    """A bad input or state, with a message that names the problem and the fix."""
