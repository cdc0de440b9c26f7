"""Errors that reach the user as one sentence instead of a traceback."""


class EdgekitError(Exception):
    """Base class for errors edgekit reports to the user without a traceback."""

    exit_code = 1


class UserError(EdgekitError):
    """The input is wrong (recipe, file, shape, flag). The message names the fix.

    The CLI prints it on one line and exits with code 2.
    """

    exit_code = 2


class StepFailed(EdgekitError):
    """A pipeline step ran but its result is not acceptable (e.g. parity failed)."""

    exit_code = 1
