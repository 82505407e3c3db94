"""Errors a user can fix. The CLI prints them as one line, never as a traceback."""


class InstillError(Exception):
    """A problem with the user's input (recipe, file, model path, run directory).

    The message says what is wrong, where (file, key or line) and how to fix it.
    """
