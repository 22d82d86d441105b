"""The one exception type the CLI turns into a one-line message (exit code 2)."""


class UserError(Exception):
    """A mistake in the user's input: bad model spec, mismatched dictionary, bad task file.

    The message says what is wrong and what to do; the CLI prints it without a traceback.
    """
