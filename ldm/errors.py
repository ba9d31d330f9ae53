"""The error a user's input causes (a path, a config, a flag): CLIs print its message as one line and exit 2. Its own
module so that the lowest layers (``ldm.fileio``) can raise it without importing ``ldm.util``."""


class UserFacingError(Exception):
    """An error caused by user input (a path, a config, a flag). CLIs print its message as one line and exit 2."""
