"""User-facing errors: the CLI prints these as one line, without a traceback."""


class RegganError(Exception):
    """A problem with the user's input (arguments, files, checkpoints), explained in one line."""
