"""The guest channel: frames over the agent's virtio-serial port, and the stdio relay of each process.

Framing and flow control are described in docs/protocol.md: every stream has its own credit, so a
slow reader of one stream never blocks another stream or the control replies."""
import asyncio
import enum
import fcntl
import os
import struct
import termios

from ..errors import PyrunvError
from ..logs import log

HEADER = struct.Struct("<III")
PAIR = struct.Struct("<II")
FLAG = struct.Struct("<I")
EXIT = struct.Struct("<iiI")  # code, signal, OOM kills (of a container's init; an older agent sent no count)
WINDOW = 256 << 10
CHUNK = 64 << 10
MAX_PAYLOAD = 1 << 20  # the agent never sends more; a guest that does is not trusted further
STDIN, STDOUT, STDERR = 0, 1, 2


class F(enum.IntEnum):
    (CREATE, EXEC, START, SIGNAL, STDIN, WINSIZE, CREDIT, PS, STATS, POWEROFF, NETWORK, REMOVE, FREEZE, UPDATE, KMSG,
     RESTORED, SHARE, CONNECT, MEMORY) = range(1, 20)
    READY, OK, ERROR, STDOUT, STDERR, EXIT, REPLY, MOUNTS = range(64, 72)


class ChannelClosed(PyrunvError):
    def __init__(self):
        super().__init__("the VM's agent is gone")


class Channel:
    def __init__(self, sock):
        self._sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._procs: dict[int, "ProcessIO"] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._next_tag = 1 << 31
        self.on_mounts = lambda ident, mountinfo: None  # a container's mounts changed (propagation.py)
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()

    async def open(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=1 << 21)
        asyncio.get_running_loop().create_task(self._read_loop(reader))

    def send(self, kind: F, ident: int, payload: bytes = b"") -> None:
        if self.closed.done():
            raise ChannelClosed()
        self._writer.write(HEADER.pack(kind, ident, len(payload)) + payload)

    async def request(self, kind: F, ident: int | None = None, payload: bytes = b"") -> bytes:
        """Sends a request and waits for its OK, ERROR (raised as the user's error) or REPLY.

        Replies carry only the id, so requests about one process go one at a time."""
        if ident is None:
            ident, self._next_tag = self._next_tag, self._next_tag + 1
        lock = self._locks.setdefault(ident, asyncio.Lock())
        async with lock:
            future = asyncio.get_running_loop().create_future()
            self._pending[ident] = future
            try:
                self.send(kind, ident, payload)
                return await future
            finally:
                self._pending.pop(ident, None)

    def attach(self, proc: "ProcessIO") -> None:
        self._procs[proc.ident] = proc

    def detach(self, ident: int) -> None:
        self._procs.pop(ident, None)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                kind, ident, length = HEADER.unpack(await reader.readexactly(HEADER.size))
                if length > MAX_PAYLOAD:
                    raise ValueError(f"frame of {length} bytes from the guest")
                self._dispatch(kind, ident, await reader.readexactly(length) if length else b"")
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except Exception:  # a malformed frame: the stream can no longer be trusted
            log.exception("guest channel")
        self.closed.set_result(None)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ChannelClosed())
        for proc in self._procs.values():
            proc.vm_died()

    def _dispatch(self, kind: int, ident: int, payload: bytes) -> None:
        if kind == F.READY and not self.ready.done():
            self.ready.set_result(payload.decode(errors="replace"))
        elif kind == F.MOUNTS:
            self.on_mounts(ident, payload.decode(errors="surrogateescape"))  # at once: before what follows
        elif kind in (F.OK, F.ERROR, F.REPLY):
            future = self._pending.get(ident)
            if future and not future.done():
                if kind == F.ERROR:
                    future.set_exception(PyrunvError(payload.decode(errors="replace")))
                else:
                    future.set_result(payload)
        elif ident in self._procs:
            proc = self._procs[ident]
            if kind in (F.STDOUT, F.STDERR):
                proc.output(STDOUT if kind == F.STDOUT else STDERR, payload)
            elif kind == F.CREDIT:
                stream, credit = PAIR.unpack(payload)
                proc.stdin_credit(credit)
            elif kind == F.EXIT:
                code, sig, oom_kills = EXIT.unpack(payload + bytes(4) if len(payload) == 8 else payload)
                del self._procs[ident]
                proc.oom_kills = oom_kills
                proc.exited(code, sig)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class ProcessIO:
    """Relays one guest process's stdio to host file descriptors, granting credit as the host drains it.

    Blocking reads and writes run in threads, so the host fds (inherited from the engine) are never
    switched to non-blocking mode under the engine's feet."""

    def __init__(self, channel: Channel, ident: int, fds: tuple, executor, tty: bool = False, stderr: bool = True):
        self.channel, self.ident, self.executor, self.tty = channel, ident, executor, tty
        self.has_stderr = stderr and not tty  # a tty's output is one stream; so is a connection's (forward.py)
        self.stdin_fd, self.stdout_fd, self.stderr_fd = fds
        self._queues = {STDOUT: asyncio.Queue(), STDERR: asyncio.Queue()}
        self._credit = 0
        self._credit_changed = asyncio.Event()
        self._winsize = None
        self._tasks: list[asyncio.Task] = []
        self._feeder: asyncio.Task | None = None
        self.exit: asyncio.Future = asyncio.get_running_loop().create_future()
        self.oom_kills = 0  # for a container's init, as the agent counted them when it exited
        channel.attach(self)

    def start_relay(self) -> None:
        loop = asyncio.get_running_loop()
        self._credit = WINDOW
        writers = [(STDOUT, self.stdout_fd)] + ([(STDERR, self.stderr_fd)] if self.has_stderr else [])
        self._tasks = [loop.create_task(self._drain(stream, fd)) for stream, fd in writers]
        if self.stdin_fd is not None:
            self._feeder = loop.create_task(self._feed())
        if self.tty:
            loop.create_task(self._follow_winsize())

    def output(self, stream: int, data: bytes) -> None:
        self._queues[stream].put_nowait(data)

    def stdin_credit(self, credit: int) -> None:
        self._credit += credit
        self._credit_changed.set()

    def exited(self, code: int, sig: int) -> None:
        if not self.exit.done():
            self.exit.set_result((code, sig))

    def let_go(self) -> None:
        """Lets go of the host's ends of the stdio now (the engine waits for them to close), without closing
        their fd numbers under a relay thread that may still use them: they become /dev/null."""
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            for fd in {self.stdin_fd, self.stdout_fd, self.stderr_fd} - {None}:
                os.dup2(null, fd, inheritable=False)
        finally:
            os.close(null)

    def vm_died(self) -> None:
        for queue in self._queues.values():
            queue.put_nowait(b"")
        self.exited(137, 9)

    async def wait(self) -> tuple:
        """The exit status, once every byte of output has been written out."""
        status = await self.exit
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        return status

    async def input_done(self) -> None:
        """Once the process has exited: waits for the read of its input to return, so that the caller may
        close the input's fd (a socket shut down, a pipe whose writer is gone)."""
        if self._feeder:
            await asyncio.wait([self._feeder], timeout=30)

    async def _drain(self, stream: int, fd: int | None) -> None:
        loop = asyncio.get_running_loop()
        broken = fd is None
        while True:
            data = await self._queues[stream].get()
            if not data:
                break
            if not broken:
                try:
                    await loop.run_in_executor(self.executor, _write_all, fd, data)
                except OSError:
                    broken = True  # the reader went away: keep draining so the guest never stalls
            if not self.channel.closed.done():
                self.channel.send(F.CREDIT, self.ident, PAIR.pack(stream, len(data)))

    async def _feed(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.exit.done():
            while self._credit <= 0:
                self._credit_changed.clear()
                await self._credit_changed.wait()
            try:
                data = await loop.run_in_executor(self.executor, os.read, self.stdin_fd, min(self._credit, CHUNK))
            except OSError:
                data = b""  # a hung-up tty or a closed fd ends stdin like EOF does
            if self.exit.done() or self.channel.closed.done():
                return
            self._credit -= len(data)
            self.channel.send(F.STDIN, self.ident, data)
            if not data:
                return

    async def _follow_winsize(self) -> None:
        # The engine resizes the host pty's master; the slave here sees it, and so must the guest's tty.
        while not self.exit.done():
            try:
                size = fcntl.ioctl(self.stdout_fd, termios.TIOCGWINSZ, b"\0" * 8)
            except OSError:
                return
            if size != self._winsize:
                self._winsize = size
                rows, cols = struct.unpack("HHHH", size)[:2]
                if not self.channel.closed.done():
                    self.channel.send(F.WINSIZE, self.ident, struct.pack("<HH", rows, cols))
            await asyncio.sleep(0.05)  # engines resize the pty around start; the guest should see it at once
