"""User-facing errors: the CLI prints them in one line and exits with code 2."""


class EsdError(Exception):
    """Bad input from the user (an argument, a file, a model). The message names the problem and the fix."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and the last good checkpoint stays as it was."""
