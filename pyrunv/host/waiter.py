"""The waiter: the host process that stands for one guest process where engines expect a process of the
container's: a pod member's init (its --pid-file process) or a detached exec. It forwards the signals it
gets to the monitor, and exits as the guest process did.

A detached exec's is a fresh `python -S` that imports this module alone: a fork of the CLI would keep the
memory of click and jsonschema. A pod member's is forked from its pod's zygote (zygote()). A fork of the
monitor would not do: as the monitor runs, it writes its pages, and each waiter ended with its own copy of
the heap (7 MiB each). It speaks the control socket's JSON lines by itself (docs/architecture.md), with
the C modules behind signal, socket and json: their Python layers (enum, selectors, re) would make each
waiter some 2 MiB bigger."""
import _signal as signal
import _socket
import os
import sys

from .. import jsonlite
from .signals import FORWARDED, exit_like

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


def die_of_oom() -> None:
    """The guest's OOM killer took the container's init: the host process that stands for it dies the same
    way, by its own host cgroup's OOM killer, so that an engine that learns of OOMs from that cgroup (the
    runc shim, and through it the kubelet's OOMKilled) learns of this one. Only where the waiter is alone in
    a cgroup of its own; otherwise, and if the kernel spares it, it dies of SIGKILL as the init did."""
    unified = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
        path = next((p for _, controllers, p in entries
                     if (controllers == "" if unified else "memory" in controllers.split(","))), None)
        directory = ("/sys/fs/cgroup" if unified else "/sys/fs/cgroup/memory") + (path or "/")
        with open(os.path.join(directory, "cgroup.procs")) as f:
            if path in (None, "/") or f.read().split() != [str(os.getpid())]:
                return
        usage, limit, no_swap = (("memory.current", "memory.max", ("memory.swap.max", "0")) if unified else
                                 ("memory.usage_in_bytes", "memory.limit_in_bytes", ("memory.swappiness", "0")))
        with open(os.path.join(directory, usage)) as f:
            room = int(f.read()) + (8 << 20)
        for name, value in (no_swap, (limit, str(room))):
            try:
                with open(os.path.join(directory, name), "w") as f:
                    f.write(value)
            except OSError:
                if name == limit:
                    return
        held = [b"\1" * (1 << 20) for _ in range(2 * (room >> 20))]  # touched pages, beyond the limit
        del held
    except (OSError, ValueError):
        return


def exec_argv(fd: int, exit_file: str, received: bytes) -> list:
    """The command line of a waiter on the connected socket fd."""
    return _python("main", str(fd), exit_file, received.hex())


def zygote_argv(fd: int) -> list:
    """The command line of a zygote (zygote()) on the connected socket fd."""
    return _python("zygote", str(fd))


def _python(function: str, *args: str) -> list:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {here!r}); "
            f"from pyrunv.host.waiter import {function}; {function}()", *args]


def main() -> None:
    try:
        fd, exit_file, received = int(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3])
        sock = _socket.socket(fileno=fd)
        sock.setblocking(True)  # the CLI's timeout left the shared file description non-blocking
        serve(sock, exit_file, received)
    finally:
        os._exit(1)


def serve(sock, exit_file: str, received: bytes = b"") -> None:
    """Waits for the exit status, writes it to exit_file (if any) and exits as the guest process did."""
    reply = wait(sock, received)
    if exit_file:
        try:
            with open(exit_file, "w") as f:
                f.write(jsonlite.dumps(reply))
        except OSError:
            pass  # a full disk must not change the status the engine sees
    if reply["signal"] == signal.SIGKILL and reply.get("oom_kills"):
        die_of_oom()
    exit_like(reply["exit"], reply["signal"])


def zygote() -> None:
    """Forks a waiter for each request on its socket until the socket closes. A request is an exit file's path
    (empty for none) and a newline, with the waiter's socket as its one fd; the reply, the waiter's pid. It does nothing else, so the pages its
    waiters share with it stay shared: each costs the host a few hundred KiB, where a Python of its own costs
    3.7 MiB. The collector is off: it would visit, and so copy, every page."""
    import gc
    gc.disable()
    try:
        sock = _socket.socket(fileno=int(sys.argv[1]))
        while True:
            path, ancillary, _, _ = sock.recvmsg(4096, _socket.CMSG_SPACE(4))
            fds = [int.from_bytes(data[:4], sys.byteorder) for level, kind, data in ancillary
                   if (level, kind) == (_socket.SOL_SOCKET, _socket.SCM_RIGHTS)]
            if not path.endswith(b"\n") or len(fds) != 1:
                return  # the monitor is gone
            sock.sendall(str(_fork(fds[0], path[:-1].decode())).encode())
    finally:
        os._exit(0)


def _fork(fd: int, exit_file: str) -> int:
    """A waiter on the socket fd, in a session of its own and not our child: the engine's subreaper
    (containerd's shim, conmon) adopts it, as it adopts one the CLI starts."""
    reader, writer = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.setsid()
            pid = os.fork()
            if pid == 0:
                os.closerange(3, fd)
                os.closerange(fd + 1, 1 << 16)
                sock = _socket.socket(fileno=fd)
                sock.setblocking(True)
                serve(sock, exit_file)
            os.write(writer, str(pid).encode())
        finally:
            os._exit(1)
    os.close(writer)
    os.close(fd)
    os.waitpid(middle, 0)
    try:
        return int(os.read(reader, 32) or b"0")
    finally:
        os.close(reader)
