"""The one error path for users: the message is what they see, the code is what runc would exit with."""


class PyrunvError(Exception):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


def one_line(message: str) -> str:
    """What the user sees on stderr is one line, even where a message quotes input with newlines."""
    return " ".join(message.splitlines())
