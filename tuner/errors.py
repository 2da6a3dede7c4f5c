"""Errors meant for users: one line, no traceback."""


class UserError(Exception):
    """Bad input or an impossible request.  The CLI prints ``tuner: <message>`` and exits with ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code
