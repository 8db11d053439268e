"""The exceptions that end a run on purpose, each reported as a message rather than a traceback."""


class UserError(Exception):
    """A bad input from the user: reported as one line, exit code 1."""


class Interrupted(Exception):
    """Training stopped by a signal after saving its state: the message says how to resume;
    the exit code is 128 + the signal number, as a shell reports a process the signal ended
    (130 SIGINT, 143 SIGTERM, 138 SIGUSR1, 140 SIGUSR2)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
