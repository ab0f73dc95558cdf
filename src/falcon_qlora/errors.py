"""User-facing errors: the CLI prints their message as one line (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input or environment. The message names the file, row or key and says what to do."""
