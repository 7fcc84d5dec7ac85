"""The CLI's side of the monitor's control socket: one JSON request (with fds for exec), JSON lines back.

Kept free of asyncio so that the CLI verbs stay cheap to start."""
import socket

from .. import jsonlite
from ..errors import PyrunvError
from ..host.sockets import socket_path

SOCKET_NAME = "monitor.sock"


class Connection:
    def __init__(self, state_dir: str, timeout: float | None = 60.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            with socket_path(state_dir, SOCKET_NAME) as path:
                self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise PyrunvError("container's monitor is not running") from None
        self._buffer = b""

    def send(self, message: dict, fds=()) -> None:
        data = jsonlite.dumps(message).encode() + b"\n"
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def receive(self) -> dict:
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise PyrunvError("the container's monitor did not answer in time") from None
            if not chunk:
                raise PyrunvError("the container's monitor went away")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply = jsonlite.loads(line)
        if "error" in reply:
            raise PyrunvError(reply["error"])
        return reply

    def pending(self) -> bytes:
        """What arrived after the last line receive() returned."""
        return self._buffer

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def call(state_dir: str, op: str, timeout: float = 60.0, fds=(), **args) -> dict:
    with Connection(state_dir, timeout) as conn:
        conn.send({"op": op, **args}, fds)
        return conn.receive()
