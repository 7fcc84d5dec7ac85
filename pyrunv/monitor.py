"""The per-container monitor: the process whose pid `create` writes to --pid-file.

It owns the VM (virtiofsd, QEMU, QMP) and the guest channel, relays the stdio it inherited from
`create`, forwards the signals it receives, serves the CLI's control socket, and finally exits with
the container's status: its exit code, or death by the same signal."""
import asyncio
import concurrent.futures
import ctypes
import contextlib
import json
import os
import resource
import select
import signal
import socket
import termios
import time
import tty

from . import control, hostmount, logs, plan as plan_mod, spec as spec_mod, state, vm
from .channel import F, PAIR, ProcessIO
from .config import Config
from .errors import PyrunvError
from .plan import VmPlan

log = logs.log
INIT_ID = 1
PR_SET_NAME = 15
FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGTERM, signal.SIGALRM, signal.SIGPWR, signal.SIGTSTP, signal.SIGCONT)
UNKILLABLE = (signal.SIGCHLD, signal.SIGWINCH, signal.SIGURG, signal.SIGCONT, signal.SIGSTOP, signal.SIGTSTP,
              signal.SIGTTIN, signal.SIGTTOU)


def launch(store: state.Store, record: state.Record, plan: VmPlan, config: Config, *,
           terminal: bool, console_socket: str | None, console_size: tuple | None) -> tuple:
    """Forks the monitor and returns (pid, accel) once the container's process is prepared in the VM."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            monitor = Monitor(store, record, plan, config, terminal, console_socket, console_size)
            _exit_like(monitor.run(write_end))
        finally:
            os._exit(1)  # the monitor never returns into the CLI's code
    os.close(write_end)
    report = b""
    deadline = config.boot_timeout + 30
    with os.fdopen(read_end, "rb") as f:
        while select.select([f], [], [], deadline)[0]:
            chunk = f.read1(4096)
            if not chunk:
                break
            report += chunk
    text = report.decode(errors="replace")
    if not text.startswith("ok "):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # its helpers die with it (PDEATHSIG)
        os.waitpid(pid, 0)
        raise PyrunvError(text.strip() or "the container's monitor failed; see the log")
    return pid, text.split()[1]


def _exit_like(status: tuple) -> None:
    """Exit as the container did: its code, or death by the very signal that killed it."""
    code, sig = status
    if sig and sig not in UNKILLABLE:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    os._exit(code & 0xFF)


def open_console(console_socket: str, size: tuple | None) -> int:
    """Like runc: a pty whose master goes to --console-socket. Returns the slave, in raw mode
    because the guest's own tty does the line discipline."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        if size and all(size):
            termios.tcsetwinsize(slave, size)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(console_socket)
            socket.send_fds(sock, [b"/dev/ptmx"], [master])
    except OSError as e:
        os.close(slave)
        raise PyrunvError(f"console socket {console_socket}: {e.strerror}") from None
    finally:
        os.close(master)
    return slave


class Monitor:
    def __init__(self, store, record, plan, config, terminal, console_socket, console_size):
        self.store, self.record, self.plan, self.config = store, record, plan, config
        self.terminal, self.console_socket, self.console_size = terminal, console_socket, console_size
        self.state_dir = store.path(record.id)
        self.paused = False
        self.next_ident = INIT_ID + 1

    def run(self, report_fd: int) -> tuple:
        status = (1, 0)
        try:
            os.setsid()
            os.closerange(3, report_fd)
            os.closerange(report_fd + 1, 1 << 16)
            logs.reopen(os.path.join(self.state_dir, "monitor.log"))
            ctypes.CDLL(None).prctl(PR_SET_NAME, b"pyrunv-monitor")
            # Namespaces before asyncio starts any thread: unshare needs a single-threaded process.
            hostmount.private_namespace()
            if self.plan.network_namespace is not None:
                hostmount.network_namespace(self.plan.network_namespace)
            status = asyncio.run(self._run(report_fd))
        except PyrunvError as e:
            self._report(report_fd, str(e))
        except BaseException as e:  # the monitor must always report and exit
            log.exception("monitor failed")
            self._report(report_fd, f"monitor failed: {e}")
        return status

    @staticmethod
    def _report(report_fd: int, message: str) -> bool:
        """Tells `create` how the boot went; False if create is gone and nobody will own this container."""
        try:
            os.write(report_fd, message.encode())
            return True
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.close(report_fd)

    def _path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    async def _run(self, report_fd: int) -> tuple:
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=64)
        async with contextlib.AsyncExitStack() as stack:
            try:
                accel = await self._boot(stack)
            except (PyrunvError, OSError) as e:
                error = str(e)
            else:
                if not self._report(report_fd, f"ok {accel}"):
                    return (1, 0)  # create died before it could record us: tear everything down
                status = await self._serve()
                with open(self._path(state.EXIT_FILE), "w") as f:
                    json.dump({"code": status[0], "signal": status[1]}, f)
                return status
        self._report(report_fd, error)  # only now: everything the boot started is gone
        return (1, 0)

    async def _boot(self, stack: contextlib.AsyncExitStack) -> str:
        loop = asyncio.get_running_loop()
        share = self._path("share")
        os.mkdir(share, 0o700)
        for shared in self.plan.shared:
            hostmount.bind(shared.source, os.path.join(share, shared.name), shared.readonly)
        accel = vm.choose_accel(self.config, self.plan)

        # Every socket is made here and handed over as an fd: no daemon races us for a path.
        listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        fs_client = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        with control.socket_path(self.state_dir, "fs.sock") as path:
            listener.bind(path)
            listener.listen(1)
            fs_client.connect(path)
            os.unlink(path)
        agent_host, agent_guest = socket.socketpair()
        qmp_host, qmp_guest = socket.socketpair()
        for s in (agent_host, agent_guest, qmp_host, qmp_guest):
            stack.enter_context(s)

        self.virtiofsd = stack.enter_context(
            vm.virtiofsd(self.config, share, listener.fileno(), self._path("virtiofsd.log")))
        argv = vm.qemu_argv(self.config, self.plan, accel, agent_fd=agent_guest.fileno(),
                            qmp_fd=qmp_guest.fileno(), fs_fd=fs_client.fileno(),
                            console_log=self._path("console.log"))
        log.debug("starting %s", " ".join(argv))
        self.qemu = stack.enter_context(vm.Daemon(
            "qemu", argv, (agent_guest.fileno(), qmp_guest.fileno(), fs_client.fileno()), self._path("qemu.log")))
        for s in (listener, fs_client, agent_guest, qmp_guest):
            s.close()
        with open(self._path("helpers.json"), "w") as f:
            json.dump([(d.pid, state.process_start_time(d.pid)) for d in (self.qemu, self.virtiofsd)], f)
        self.boot_deadline = time.monotonic() + self.config.boot_timeout
        self.qemu_gone = self._exit_of(self.qemu.pid)
        self.virtiofsd_gone = self._exit_of(self.virtiofsd.pid)

        from .channel import Channel
        self.channel = Channel(agent_host)
        await self.channel.open()
        from qemu.qmp import QMPClient
        self.qmp = QMPClient(self.record.id)
        await self._booting(self.qmp.connect(qmp_host))
        stack.push_async_callback(self.qmp.disconnect)
        log.debug("agent ready: %s", await self._booting(self.channel.ready))
        fds = (0, 1, 2)
        if self.terminal:
            slave = open_console(self.console_socket, self.console_size) if self.console_socket else 0
            fds = (slave, slave, slave)
        self.init = ProcessIO(self.channel, INIT_ID, fds, self.executor, tty=self.terminal)
        await asyncio.wait_for(self.channel.request(F.CREATE, INIT_ID, self.plan.init_records), 60)
        self.init.start_relay()

        control_sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        with control.socket_path(self.state_dir, control.SOCKET_NAME) as path:
            control_sock.bind(path)
        control_sock.listen(16)
        control_sock.setblocking(False)
        self.server = loop.create_task(self._accept(control_sock))
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._forward, sig)
        self.shutdown = loop.create_future()
        return accel

    def _exit_of(self, pid: int) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        pidfd = os.pidfd_open(pid)

        def on_exit():
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not future.done():
                future.set_result(None)
        loop.add_reader(pidfd, on_exit)
        return future

    async def _booting(self, awaitable):
        """Waits for a boot step, unless QEMU or virtiofsd dies or the boot deadline passes first."""
        step = asyncio.ensure_future(awaitable)
        await asyncio.wait([step, self.qemu_gone, self.virtiofsd_gone],
                           timeout=max(0.0, self.boot_deadline - time.monotonic()),
                           return_when=asyncio.FIRST_COMPLETED)
        if step.done() and not step.exception():
            return step.result()
        step.cancel()
        if self.qemu_gone.done():
            raise PyrunvError(self.qemu.failure("exited during boot") + self._console_hint())
        if self.virtiofsd_gone.done():
            raise PyrunvError(self.virtiofsd.failure("exited during boot"))
        if step.done():
            raise PyrunvError(f"VM boot failed: {step.exception()}")
        raise PyrunvError(f"VM did not become ready within {self.config.boot_timeout:g}s{self._console_hint()}")

    def _console_hint(self) -> str:
        try:
            with open(self._path("console.log"), "rb") as f:
                lines = [x for x in f.read()[-4096:].decode(errors="replace").splitlines() if x.strip()]
        except OSError:
            lines = []
        log.error("console log tail:\n%s", "\n".join(lines[-20:]))
        return f" (last console line: {lines[-1].strip()})" if lines else " (the console log is empty)"

    async def _serve(self) -> tuple:
        init_done = asyncio.ensure_future(self.init.wait())
        await asyncio.wait([init_done, self.virtiofsd_gone, self.shutdown], return_when=asyncio.FIRST_COMPLETED)
        if init_done.done():
            return init_done.result()
        return (128 + signal.SIGKILL, signal.SIGKILL)  # the VM (or its file server) died: as if SIGKILLed

    def _forward(self, sig: int) -> None:
        asyncio.get_running_loop().create_task(self._signal(INIT_ID, sig, False))

    async def _signal(self, ident: int, sig: int, everyone: bool) -> None:
        """A signal that nobody waits for: the process may be gone, or the VM frozen until resume."""
        with contextlib.suppress(PyrunvError):
            await self.channel.request(F.SIGNAL, ident, PAIR.pack(sig, int(everyone)))

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            loop.create_task(self._handle(conn))

    async def _handle(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fds: list = []
        try:
            conn.settimeout(10)
            data, fds, _, _ = await loop.run_in_executor(self.executor, socket.recv_fds, conn, 1 << 20, 3)
            while data and not data.endswith(b"\n"):
                more = await loop.run_in_executor(self.executor, conn.recv, 1 << 20)
                if not more:
                    break
                data += more
            conn.setblocking(False)
            request = json.loads(data)
            try:
                handler = getattr(self, "_op_" + request["op"])
            except (AttributeError, KeyError, TypeError):
                raise PyrunvError(f"unknown request {request!r}") from None
            reply = await handler(request, fds, conn)
            fds = []
        except PyrunvError as e:
            reply = {"error": str(e)}
        except (OSError, ValueError) as e:
            log.warning("control connection: %s", e)
            reply = None
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            if reply is not None:
                await loop.sock_sendall(conn, json.dumps(reply).encode() + b"\n")
            conn.close()

    async def _op_start(self, request, fds, conn):
        await self.channel.request(F.START, INIT_ID)
        return {"ok": True}

    async def _op_signal(self, request, fds, conn):
        sig, everyone = int(request["signal"]), bool(request.get("all"))
        if self.paused:
            if sig != signal.SIGKILL:
                asyncio.get_running_loop().create_task(self._signal(INIT_ID, sig, everyone))
                return {"ok": True}  # delivered when the VM thaws, as a frozen cgroup does
            await self._op_resume(request, fds, conn)
        await self.channel.request(F.SIGNAL, INIT_ID, PAIR.pack(sig, int(everyone)))
        return {"ok": True}

    async def _op_pause(self, request, fds, conn):
        await self.qmp.execute("stop")
        self.paused = True
        return {"ok": True}

    async def _op_resume(self, request, fds, conn):
        await self.qmp.execute("cont")
        self.paused = False
        return {"ok": True}

    async def _op_ps(self, request, fds, conn):
        text = (await self.channel.request(F.PS)).decode()
        rows = [line.split(" ", 3) for line in text.splitlines() if line]
        return {"processes": [{"pid": int(p), "ppid": int(pp), "uid": int(u), "cmd": c} for p, pp, u, c in rows]}

    async def _op_stats(self, request, fds, conn):
        text = (await self.channel.request(F.STATS)).decode()
        return {"stats": {k: int(v) for k, v in (line.split() for line in text.splitlines() if line)}}

    async def _op_shutdown(self, request, fds, conn):
        if not self.shutdown.done():
            self.shutdown.set_result(None)
        return {"ok": True}

    async def _op_exec(self, request, fds, conn):
        process = spec_mod.parse_process(request["process"])
        ident, self.next_ident = self.next_ident, self.next_ident + 1
        stdio = (fds[0], fds[0], fds[0]) if process.terminal else tuple(fds)
        io = ProcessIO(self.channel, ident, stdio, self.executor, tty=process.terminal)
        try:
            await self.channel.request(F.EXEC, ident, plan_mod.records(plan_mod.process_pairs(process)))
        except BaseException:
            self.channel.detach(ident)
            raise  # _handle closes the fds and tells the waiter
        io.start_relay()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(conn, b'{"ok": true}\n')
        relay = loop.create_task(self._exec_signals(conn, ident))
        code, sig = await io.wait()
        relay.cancel()
        for fd in set(fds):
            os.close(fd)
        return {"exit": code, "signal": sig}

    async def _exec_signals(self, conn: socket.socket, ident: int) -> None:
        """The exec's waiter forwards the signals it gets as JSON lines."""
        loop = asyncio.get_running_loop()
        buffer = b""
        while True:
            chunk = await loop.sock_recv(conn, 4096)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    loop.create_task(self._signal(ident, int(json.loads(line)["signal"]), False))
