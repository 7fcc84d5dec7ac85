"""The zygote of a pod's waiters (host/waiter.py): a child of the monitor that forks the waiter of each member."""
import socket
import subprocess
import threading

from ..host import waiter

TIMEOUT = 10.0


class Zygote:
    def __init__(self):
        self._sock = None
        self._process = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._start()

    def fork(self, exit_file: str) -> tuple:
        """A waiter that writes exit_file: our end of its socket, and its pid. Blocking: for the executor."""
        with self._lock:
            self._start()
            ours, theirs = socket.socketpair()
            try:
                socket.send_fds(self._sock, [exit_file.encode() + b"\n"], [theirs.fileno()])
                pid = int(self._sock.recv(32) or b"0")
            except (OSError, ValueError):
                pid = 0
            finally:
                theirs.close()
            if not pid:
                ours.close()
                raise OSError("the zygote of the pod's waiters did not answer")
            return ours, pid

    def _start(self) -> None:
        if self._process:
            return
        self._sock, theirs = socket.socketpair()
        self._sock.settimeout(TIMEOUT)
        with theirs:
            self._process = subprocess.Popen(waiter.zygote_argv(theirs.fileno()), pass_fds=[theirs.fileno()],
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)

    def close(self) -> None:
        """Its socket closes, and it ends."""
        if self._process:
            self._sock.close()
            self._process.wait(TIMEOUT)
