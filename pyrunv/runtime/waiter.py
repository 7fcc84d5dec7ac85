"""The waiter: the host process that stands for one guest process where engines expect a process of the
container's: a pod member's init (its --pid-file process) or a detached exec. It forwards the signals it
gets to the monitor, and exits as the guest process did.

It is a fresh `python -S` that imports this module alone: a fork of the CLI would keep the memory of
click and jsonschema, 15 MiB for every container of a pod. So it speaks the control socket's JSON lines
by itself (docs/architecture.md). It imports the C modules behind signal, socket and json: their Python
layers (enum, selectors, re) would make each waiter some 2 MiB bigger."""
import _signal as signal
import _socket
import os
import sys

from .. import jsonlite
from ..host.signals import FORWARDED, exit_like

VM_GONE = {"exit": 128 + signal.SIGKILL, "signal": signal.SIGKILL}  # as if SIGKILLed, as the VM was


def wait(sock, received: bytes = b"") -> dict:
    """Forwards our signals as JSON lines until the monitor's line with the exit status arrives."""
    def forward(number, frame):
        try:
            sock.sendall(jsonlite.dumps({"signal": number}).encode() + b"\n")
        except OSError:
            pass
    for sig in FORWARDED:
        signal.signal(sig, forward)
    while b"\n" not in received:
        try:
            chunk = sock.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            return VM_GONE  # the monitor, and so the VM, died
        received += chunk
    reply = jsonlite.loads(received.split(b"\n", 1)[0])
    return reply if "exit" in reply else VM_GONE


def exec_argv(fd: int, exit_file: str, received: bytes) -> list:
    """The command line of a waiter on the connected socket fd."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {here!r}); "
            "from pyrunv.runtime.waiter import main; main()", str(fd), exit_file, received.hex()]


def main() -> None:
    try:
        fd, exit_file, received = int(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3])
        sock = _socket.socket(fileno=fd)
        sock.setblocking(True)  # the CLI's timeout left the shared file description non-blocking
        reply = wait(sock, received)
        if exit_file:
            try:
                with open(exit_file, "w") as f:
                    f.write(jsonlite.dumps(reply))
            except OSError:
                pass  # a full disk must not change the status the engine sees
        exit_like(reply["exit"], reply["signal"])
    finally:
        os._exit(1)
