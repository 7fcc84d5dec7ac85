"""The monitor's service once its VM is started: the VM's life (its boot or load, the guest channel, the
containers' stdio, signal forwarding, its end) and the CLI's control socket, whose ops (ops.py) act on it.

Other containers of a pod join the running VM through `create` requests. Each such request's connection
comes from that container's pid-file process (its waiter) and stays open until the container exits."""
import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import time

from ..errors import PyrunvError
from ..host import network
from ..host.signals import FORWARDED
from ..host.sockets import socket_path
from ..host.terminal import open_console, raw_terminal
from ..logs import log
from ..state import store as state
from ..vm import plan as plan_mod
from . import control, ops, saving
from .child import run_child
from .memory import GuestMemory
from .zygote import Zygote
from .propagation import Propagation
from .channel import PAIR, STDERR, STDOUT, WINDOW, Channel, F, ProcessIO

INIT_ID = state.VM_INIT
SCM_MAX_FD = 253  # the kernel's limit of fds in one message: stdio and a container's mount trees


class Service:
    """The service of one monitor (main.Monitor): its VM's processes, sockets and plan come from there."""

    def __init__(self, monitor, accel: str):
        self.monitor, self.accel = monitor, accel
        self.config, self.plan = monitor.config, monitor.plan
        self.qemu, self.virtiofsd = monitor.qemu, monitor.virtiofsd
        self.paused = False
        self.memory = GuestMemory(self)
        self.zygote = Zygote()
        self.next_ident = INIT_ID + 1
        self.members: dict[str, tuple] = {}  # a pod's other containers: ID -> (ident, names in the share)
        self.forwarding: asyncio.Task | None = None  # a pod's port forwarding, being set up (forward.listen)
        self._qmp = None

    def path(self, *names: str) -> str:
        return os.path.join(self.monitor.state_dir, *names)

    async def run(self, report_fd: int) -> tuple:
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=64)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.zygote.close)
            await self._attach(stack)
            if not self.monitor.report(report_fd, f"ok {self.accel}"):
                return (1, 0)  # create died before it could record us: tear everything down
            status = await self._serve()
            ended = {"exit": status[0], "signal": status[1], "oom_kills": self.init.oom_kills}
            with contextlib.suppress(OSError):  # a full disk must not change the status the engine sees
                with open(self.path(state.EXIT_FILE), "w") as f:
                    json.dump(ended, f)
            return status

    async def _attach(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        self.boot_deadline = time.monotonic() + self.config.boot_timeout
        self.qemu_gone = self._exit_of(self.qemu.pid)
        self.virtiofsd_gone = self._exit_of(self.virtiofsd.pid)
        self.channel = Channel(self.monitor.agent_socket)
        self.propagation = Propagation(self.path("share"))
        self.channel.on_mounts = self.propagation.report
        await self.channel.open()
        stack.push_async_callback(self._disconnect_qmp)
        stack.push_async_callback(self._power_off)
        template = self.monitor.template
        if self.monitor.restore_from:
            await self.booting(saving.restore(self, self.monitor.restore_from))
        elif template and template.exists:
            try:
                await self.booting(saving.refresh(self, template.plugged))  # the child that started QEMU loaded it
                template.used()
                self.channel.ready.set_result("template")
            except PyrunvError as e:
                raise template.failed(str(e)) from None
        else:
            log.debug("agent ready: %s", await self.booting(self.channel.ready))
            if template:
                await saving.save_template(self, template)
                if template.plugged:
                    await self.booting(saving.plug_share(self, await self.qmp_client()))
        fds = (0, 1, 2)
        if self.monitor.terminal:
            console_socket = self.monitor.console_socket
            slave = open_console(console_socket, self.monitor.console_size) if console_socket else 0
            if not console_socket:
                stack.enter_context(raw_terminal(0))  # a person's own terminal, as runc run uses it
            else:
                # As under runc, the container keeps none of create's stdio: the containerd shim (go-runc)
                # reads create's stdout and stderr until EOF before it goes on.
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.close(null)
            fds = (slave, slave, slave)
        self.init = ProcessIO(self.channel, INIT_ID, fds, self.executor, tty=self.monitor.terminal)
        if self.monitor.restore_from:
            self.init.start_relay()
            # The credit the agent had left went with the old monitor's relay: a fresh window per stream.
            for stream in (STDOUT, STDERR):
                self.channel.send(F.CREDIT, INIT_ID, PAIR.pack(stream, WINDOW))
        else:
            self.propagation.expect(INIT_ID, self.plan.init_records)
            await asyncio.wait_for(self.channel.request(F.CREATE, INIT_ID, self.plan.init_records), 60)
            log.debug("init process prepared")
            self.init.start_relay()

        control_sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        with socket_path(self.monitor.state_dir, control.SOCKET_NAME) as path:
            control_sock.bind(path)
        control_sock.listen(16)
        control_sock.setblocking(False)
        self.server = loop.create_task(self._accept(control_sock))
        if self.monitor.display_listener is not None:
            from . import display
            self.display_server = loop.create_task(display.serve(self, self.monitor.display_listener))
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._forward, sig)
        self.shutdown = loop.create_future()

    async def _power_off(self) -> None:
        """Ends the VM. What the guest wrote to its share is on the host already (virtio-fs writes through), so
        QEMU is killed; a VM with block devices is asked to power off instead, after the agent's sync. The
        monitor's exit stack kills whatever is still there after the grace period."""
        if self.qemu_gone.done():
            return
        if self.plan.disks and not self.paused and self.channel.ready.done() and not self.channel.closed.done():
            with contextlib.suppress(PyrunvError):
                self.channel.send(F.POWEROFF, 0)
        else:
            self.qemu.proc.kill()
        await asyncio.wait([self.qemu_gone], timeout=1.0)

    async def qmp_client(self):
        """QMP is only needed for pause and resume, so it connects on first use, off the boot path."""
        if self._qmp is None:
            from qemu.qmp import QMPClient
            client = QMPClient(self.monitor.record.id)
            await asyncio.wait_for(client.connect(self.monitor.qmp_socket), 10)
            self._qmp = client
        return self._qmp

    async def _disconnect_qmp(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):  # QEMU may be dead already: its EOF is no news here
                await self._qmp.disconnect()

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

    async def booting(self, awaitable):
        """Waits for a boot step, unless QEMU or virtiofsd dies or the boot deadline passes first."""
        step = asyncio.ensure_future(awaitable)
        await asyncio.wait([step, self.qemu_gone, self.virtiofsd_gone],
                           timeout=max(0.0, self.boot_deadline - time.monotonic()),
                           return_when=asyncio.FIRST_COMPLETED)
        if step.done() and not step.exception():
            return step.result()
        failure = step.exception() if step.done() else None  # before cancel(), which makes it done
        step.cancel()
        if self.virtiofsd_gone.done() and not self.qemu_gone.done():
            await asyncio.wait([self.qemu_gone], timeout=1.0)  # QEMU's exit ends virtiofsd: name the cause
        if self.qemu_gone.done():
            raise PyrunvError(self.qemu.failure("exited during boot") + self._console_hint())
        if self.virtiofsd_gone.done():
            raise PyrunvError(self.virtiofsd.failure("exited during boot"))
        if failure is not None:
            raise PyrunvError(f"VM boot failed: {failure}")
        raise PyrunvError(f"VM did not become ready within {self.config.boot_timeout:g}s{self._console_hint()}")

    def _console_hint(self) -> str:
        try:
            with open(self.path("console.log"), "rb") as f:
                lines = [x for x in f.read()[-4096:].decode(errors="replace").splitlines() if x.strip()]
        except OSError:
            lines = []
        log.error("console log tail:\n%s", "\n".join(lines[-20:]))
        panic = [x for x in lines if "Kernel panic" in x]  # the panic says why; the lines after it do not
        if panic:
            return f" (console: {panic[-1].strip()})"
        return f" (last console line: {lines[-1].strip()})" if lines else " (the console log is empty)"

    async def _serve(self) -> tuple:
        init_done = asyncio.ensure_future(self.init.wait())
        await asyncio.wait([init_done, self.virtiofsd_gone, self.shutdown], return_when=asyncio.FIRST_COMPLETED)
        if init_done.done():
            log.debug("init exited: %s", init_done.result())
            return init_done.result()
        return (128 + signal.SIGKILL, signal.SIGKILL)  # the VM (or its file server) died: as if SIGKILLed

    def _forward(self, sig: int) -> None:
        asyncio.get_running_loop().create_task(self.signal(INIT_ID, sig, False))

    async def signal(self, ident: int, sig: int, everyone: bool) -> None:
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
            data, fds, _, _ = await loop.run_in_executor(self.executor, socket.recv_fds, conn, 1 << 20, SCM_MAX_FD)
            while data and not data.endswith(b"\n"):
                more = await loop.run_in_executor(self.executor, conn.recv, 1 << 20)
                if not more:
                    break
                data += more
            conn.setblocking(False)
            request = json.loads(data)
            try:
                handler = ops.OPS[request["op"]]
            except (KeyError, TypeError):
                raise PyrunvError(f"unknown request {request!r}") from None
            reply = await handler(self, request, fds, conn)
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

    def ident(self, request) -> int:
        """The id in the VM of the container a request names: the VM's own (the sandbox), or a member's."""
        name = request.get("container")
        if name is None or name == self.monitor.record.id:
            return INIT_ID
        if name not in self.members:
            raise PyrunvError(f"container {name} is not in the VM of {self.monitor.record.id}")
        return self.members[name][0]

    def new_ident(self) -> int:
        ident, self.next_ident = self.next_ident, self.next_ident + 1
        return ident

    async def plumb_network(self, tap_name: str) -> None:
        found = json.loads(await run_child(network.plumb_command(tap_name), 30, "network"))
        if found:
            log.debug("network: %s", found)
            await self.channel.request(F.NETWORK, None, plan_mod.records(network.agent_records(found)))

    async def to_agent(self, kind: F, ident: int, payload: bytes = b"") -> None:
        """A request about a container; in a frozen VM it is sent without waiting, and the agent finds it
        when the VM thaws."""
        if self.paused:
            self.channel.send(kind, ident, payload)
        else:
            await self.channel.request(kind, ident, payload)

    async def pause_vm(self) -> None:
        await (await self.qmp_client()).execute("stop")
        self.paused = True

    async def resume_vm(self) -> None:
        await (await self.qmp_client()).execute("cont")
        self.paused = False
        await self.memory.thawed()

