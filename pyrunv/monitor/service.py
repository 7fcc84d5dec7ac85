"""The monitor's service once its VM is started: the guest channel, the containers' stdio, signal
forwarding, the CLI's control socket, and the wait for the VM's own container (the pod's sandbox) to end.

Other containers of a pod join the running VM through `create` requests. Each such request's connection
comes from that container's pid-file process (its waiter) and stays open until the container exits."""
import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import struct
import time

from . import control
from ..host import mounts as hostmount
from ..host import network
from ..vm import migration
from ..vm import plan as plan_mod
from ..vm import guest_ram, qemu, versions
from ..spec import pod
from ..spec import oci as spec_mod
from ..state import store as state
from .channel import FLAG, PAIR, STDERR, STDOUT, WINDOW, Channel, F, ProcessIO
from ..errors import PyrunvError
from ..logs import log
from ..host.terminal import open_console, raw_terminal
from ..host.signals import FORWARDED
from ..host.sockets import socket_path

INIT_ID = state.VM_INIT
BALLOON_TIMEOUT = 10.0
RESTORED = struct.Struct("<qI")  # the host's clock for the agent's RESTORED: seconds, nanoseconds; then entropy
SCM_MAX_FD = 253  # the kernel's limit of fds in one message: stdio and a container's mount trees


class Service:
    def __init__(self, monitor, accel: str):
        self.monitor, self.accel = monitor, accel
        self.config, self.plan = monitor.config, monitor.plan
        self.qemu, self.virtiofsd = monitor.qemu, monitor.virtiofsd
        self.paused = False
        self.next_ident = INIT_ID + 1
        self.members: dict[str, tuple] = {}  # a pod's other containers: ID -> (ident, names in the share)
        self._qmp = None

    def _path(self, *names: str) -> str:
        return os.path.join(self.monitor.state_dir, *names)

    async def run(self, report_fd: int) -> tuple:
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=64)
        async with contextlib.AsyncExitStack() as stack:
            await self._attach(stack)
            if not self.monitor.report(report_fd, f"ok {self.accel}"):
                return (1, 0)  # create died before it could record us: tear everything down
            status = await self._serve()
            ended = {"exit": status[0], "signal": status[1], "oom_kills": self.init.oom_kills}
            with contextlib.suppress(OSError):  # a full disk must not change the status the engine sees
                with open(self._path(state.EXIT_FILE), "w") as f:
                    json.dump(ended, f)
            return status

    async def _attach(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        self.boot_deadline = time.monotonic() + self.config.boot_timeout
        self.qemu_gone = self._exit_of(self.qemu.pid)
        self.virtiofsd_gone = self._exit_of(self.virtiofsd.pid)
        self.channel = Channel(self.monitor.agent_socket)
        await self.channel.open()
        stack.push_async_callback(self._disconnect_qmp)
        stack.push_async_callback(self._power_off)
        template = self.monitor.template
        if self.monitor.restore_from:
            await self._booting(self._restore(self.monitor.restore_from))
        elif template and template.exists:
            try:
                await self._booting(self._refresh(template.plugged))  # the child that started QEMU loaded it
                template.used()
                self.channel.ready.set_result("template")
            except PyrunvError as e:
                raise template.failed(str(e)) from None
        else:
            log.debug("agent ready: %s", await self._booting(self.channel.ready))
            if template:
                await self._save_template(template)
                if template.plugged:
                    await self._booting(self._plug_share(await self._qmp_client()))
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
            self.display_server = loop.create_task(self._serve_display(self.monitor.display_listener))
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._forward, sig)
        self.shutdown = loop.create_future()

    async def _restore(self, incoming: dict) -> None:
        """A saved VM instead of a boot: QEMU loads the state and the VM runs on from where it was saved.
        A streamed one (fd:) hears "ok" back once it runs here: its source ends only then (snapshot.py)."""
        qmp = await self._qmp_client()
        stream = socket.socket(fileno=self.monitor.incoming_fd) if self.monitor.incoming_fd is not None else None
        try:
            uri = await migration.hand_fd(qmp, stream, "incoming") if stream else incoming["uri"]
            await migration.load(qmp, uri, migration.MAPPED_RAM if incoming["mapped_ram"] else None)
            await self._refresh()
            if stream:
                stream.setblocking(False)  # QEMU's channel shared the file's flags
                await asyncio.get_running_loop().sock_sendall(stream, b"ok\n")
        finally:
            if stream:
                stream.close()
        self.channel.ready.set_result("restored")
        # A restore is a create and a start: the new namespace's veth takes over the VM's NIC, as at start.
        if self.monitor.tap_name and network.interfaces_to_plumb():
            await self._plumb_network(self.monitor.tap_name)

    async def _refresh(self, mount_share: bool = False) -> None:
        """A loaded VM runs with the host's time and fresh randomness; with mount_share, it mounts its share,
        plugged in before it ran, once the guest's hot-plug has brought it up."""
        now = time.time_ns()
        refresh = RESTORED.pack(now // 10**9, now % 10**9) + os.urandom(32)
        restored = asyncio.ensure_future(asyncio.wait_for(self.channel.request(F.RESTORED, None, refresh), 10))
        mounted = asyncio.ensure_future(self._mount_share()) if mount_share else None  # the agent's next frame
        try:
            await restored
        except PyrunvError as e:  # an agent saved before it knew RESTORED
            log.info("the restored guest kept its clock and randomness: %s", e)
        finally:
            if mounted:
                await mounted

    async def _save_template(self, template) -> None:
        """This VM, just booted and with no container yet, saved as the template of its shape. A failure
        costs this container only the time it took."""
        qmp = await self._qmp_client()
        await qmp.execute("stop")
        saving = None
        try:
            saving = template.saving()
            if template.plugged:
                await template.save_with_ram(qmp, self.qemu.pid, saving)
            else:
                await self._save(qmp, f"file:{saving}", "template", migration.MAPPED_RAM)
            template.saved(saving)
            log.info("VM saved as template %s", template.path)
        except Exception as e:  # PyrunvError, OSError, or QMP's
            log.warning("VM not saved as template %s: %s", template.path, e)
            if saving:
                with contextlib.suppress(OSError):
                    os.unlink(saving)
        finally:
            await qmp.execute("cont")

    async def _save(self, qmp, uri: str, what: str, capability: str | None) -> None:
        """QEMU saves the stopped VM to uri. The guest RAM its save allocated by reading it is given back."""
        try:
            ram = guest_ram.GuestRam(self.qemu.pid)
            holes = ram.holes()
        except OSError as e:
            log.warning("%s: the guest RAM the save reads stays allocated: %s", what, e)
            ram = None
        try:
            await migration.save(qmp, uri, what, capability)
        finally:
            if ram:
                try:
                    ram.punch(holes)
                except OSError as e:
                    log.warning("%s: the guest RAM the save reads stays allocated: %s", what, e)
                ram.close()

    async def _plug_share(self, qmp) -> None:
        """The share of a VM whose template holds none: plugged into its empty PCIe port, then mounted."""
        await qmp.execute("device_add", qemu.share_device(self.plan, plugged=True))
        await self._mount_share()

    async def _mount_share(self) -> None:
        await self.channel.request(F.SHARE, None, b"")  # the agent waits for the device, within 10 s
        log.debug("share plugged in")

    async def _op_checkpoint(self, request, fds, conn):
        """Saves the VM to request["path"], or streams it to the socket it was sent (a `restore --listen`):
        stopped first, so that nothing changes while it is written. It then runs on (leave_running), or ends
        as a container killed by SIGKILL would; on failure, or if the restore does not say "ok", it runs on."""
        qmp = await self._qmp_client()
        stream = socket.socket(fileno=fds.pop()) if fds else None
        # In a file, the RAM at fixed offsets: a restore then writes only the pages that are not zero.
        mapped_ram = not stream and versions.qemu_release(self.config.qemu) >= versions.MAPPED_RAM_QEMU
        was_running = not self.paused
        if was_running:
            await qmp.execute("stop")
            self.paused = True
        try:
            if stream:
                from ..vm import snapshot
                stream.setblocking(False)
                saved = snapshot.metadata(self.monitor.record.id, plan_mod.to_json(self.plan))
                await asyncio.get_running_loop().sock_sendall(stream, snapshot.stream_header(saved))
                uri = await migration.hand_fd(qmp, stream, "checkpoint")
            else:
                uri = f"file:{request['path']}"
            await self._save(qmp, uri, "checkpoint", migration.MAPPED_RAM if mapped_ram else None)
            if stream:
                await self._resumed_at_the_other_end(stream)
        except BaseException:
            if was_running:
                await self._resume_vm()
            raise
        finally:
            if stream:
                stream.close()
        if request.get("leave_running"):
            if was_running:
                await self._resume_vm()
        elif not self.shutdown.done():
            self.shutdown.set_result(None)
        return {"ok": True, "plan": plan_mod.to_json(self.plan), "mapped_ram": mapped_ram}

    @staticmethod
    async def _resumed_at_the_other_end(stream: socket.socket) -> None:
        stream.setblocking(False)  # QEMU's channel shared the file's flags
        try:
            answer = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(stream, 3), migration.TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            answer = b""
        if answer != b"ok\n":
            raise PyrunvError("checkpoint: the restore at the other end did not resume the VM")

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

    async def _qmp_client(self):
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

    async def _booting(self, awaitable):
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
            with open(self._path("console.log"), "rb") as f:
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

    async def _serve_display(self, listener: socket.socket) -> None:
        """Each VNC client that connects to vnc.sock goes to QEMU's VNC server over QMP (getfd, add_client)."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while True:
            conn, _ = await loop.sock_accept(listener)
            with conn:
                try:
                    qmp = await self._qmp_client()
                    await migration.hand_fd(qmp, conn, "vnc")
                    await qmp.execute("add_client", {"protocol": "vnc", "fdname": "vnc", "skipauth": True})
                except Exception as e:  # one client's failure must not end the display for the next
                    log.warning("display client: %s", e)

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

    def _ident(self, request) -> int:
        """The id in the VM of the container a request names: the VM's own (the sandbox), or a member's."""
        name = request.get("container")
        if name is None or name == self.monitor.record.id:
            return INIT_ID
        if name not in self.members:
            raise PyrunvError(f"container {name} is not in the VM of {self.monitor.record.id}")
        return self.members[name][0]

    def _new_ident(self) -> int:
        ident, self.next_ident = self.next_ident, self.next_ident + 1
        return ident

    async def _op_start(self, request, fds, conn):
        ident = self._ident(request)
        # The engine's network is in place by now: CNI and netavark set it up before create, docker in
        # a prestart hook during create. A pod's containers share the VM's network.
        if ident == INIT_ID and self.monitor.tap_name and network.interfaces_to_plumb():
            await self._plumb_network(self.monitor.tap_name)
        await self.channel.request(F.START, ident)
        if ident == INIT_ID and pod.is_sandbox(self.monitor.record.annotations):
            self.executor.submit(spec_mod.schema_validator)  # the pod's containers will come: see _op_validate
        return {"ok": True}

    async def _op_validate(self, request, fds, conn):
        """A pod's container's config.json against the schema, here where the validator stays loaded."""
        await asyncio.get_running_loop().run_in_executor(self.executor, spec_mod.validate, request["document"])
        return {"ok": True}

    async def _plumb_network(self, tap_name: str) -> None:
        child = await asyncio.create_subprocess_exec(*network.plumb_command(tap_name), stdin=asyncio.subprocess.DEVNULL,
                                                     stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(child.communicate(), 30)
        except asyncio.TimeoutError:
            child.kill()
            await child.wait()
            raise PyrunvError("network: joining the namespace's interface to the VM took over 30s") from None
        if child.returncode:
            lines = err.decode(errors="replace").strip().splitlines()
            raise PyrunvError(f"network: {lines[-1] if lines else 'failed'}")
        found = json.loads(out)
        if found:
            log.debug("network: %s", found)
            await self.channel.request(F.NETWORK, None, plan_mod.records(network.agent_records(found)))

    async def _op_signal(self, request, fds, conn):
        ident = self._ident(request)
        sig, everyone = int(request["signal"]), bool(request.get("all"))
        if self.paused:
            if sig != signal.SIGKILL or ident != INIT_ID:
                asyncio.get_running_loop().create_task(self._signal(ident, sig, everyone))
                return {"ok": True}  # delivered when the VM thaws, as a frozen cgroup does
            await self._resume_vm()  # the VM's own container is killed now: with it the VM ends
        await self.channel.request(F.SIGNAL, ident, PAIR.pack(sig, int(everyone)))
        return {"ok": True}

    async def _op_pause(self, request, fds, conn):
        """The VM's own container freezes the whole VM; a member of the pod, its cgroup in the guest."""
        ident = self._ident(request)
        if ident != INIT_ID:
            await self._freeze(ident, True)
        else:
            await (await self._qmp_client()).execute("stop")
            self.paused = True
        return {"ok": True}

    async def _op_resume(self, request, fds, conn):
        ident = self._ident(request)
        if ident != INIT_ID:
            await self._freeze(ident, False)
        else:
            await self._resume_vm()
        return {"ok": True}

    async def _freeze(self, ident: int, frozen: bool) -> None:
        await self._to_agent(F.FREEZE, ident, FLAG.pack(int(frozen)))

    async def _to_agent(self, kind: F, ident: int, payload: bytes = b"") -> None:
        """A request about a container; in a frozen VM it is sent without waiting, and the agent finds it
        when the VM thaws."""
        if self.paused:
            self.channel.send(kind, ident, payload)
        else:
            await self.channel.request(kind, ident, payload)

    async def _resume_vm(self) -> None:
        await (await self._qmp_client()).execute("cont")
        self.paused = False

    async def _op_ps(self, request, fds, conn):
        text = (await self.channel.request(F.PS, self._ident(request))).decode()
        rows = [line.split(" ", 3) for line in text.splitlines() if line]
        return {"processes": [{"pid": int(p), "ppid": int(pp), "uid": int(u), "cmd": c} for p, pp, u, c in rows]}

    async def _op_stats(self, request, fds, conn):
        return {"stats": await self._stats(self._ident(request))}

    async def _stats(self, container: int) -> dict:
        if self.channel.closed.done() or self.paused:
            raise PyrunvError("the VM cannot answer")
        text = (await asyncio.wait_for(self.channel.request(F.STATS, container), 10)).decode()
        return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line)}

    async def _op_kmsg(self, request, fds, conn):
        """The guest's kernel log to the console log, from its start and as it grows (`pyrunv console`)."""
        if not self.paused:
            await asyncio.wait_for(self.channel.request(F.KMSG), 10)
        return {"ok": True}

    async def _op_update(self, request, fds, conn):
        """New limits: the container's cgroup in the guest and, for the VM's own container, the VM's memory
        through the balloon. A frozen VM takes them when it thaws."""
        await self._to_agent(F.UPDATE, self._ident(request), bytes.fromhex(request["records"]))
        if request.get("memory_mib"):
            await self._balloon(request["memory_mib"] << 20)
        return {"ok": True}

    async def _balloon(self, target: int) -> None:
        """Sets the guest's RAM to target bytes; a running guest is given BALLOON_TIMEOUT to get there."""
        qmp = await self._qmp_client()
        await qmp.execute("balloon", {"value": target})
        deadline = time.monotonic() + BALLOON_TIMEOUT
        while not self.paused and time.monotonic() < deadline:
            if (await qmp.execute("query-balloon"))["actual"] <= target:
                return
            await asyncio.sleep(0.05)

    async def _op_create(self, request, fds, conn):
        """A container of the pod joins this VM: its share entries, then its init, prepared and waiting for
        START. The reply comes at once; the connection then waits for the container's exit."""
        name = request["container"]
        if name == self.monitor.record.id or name in self.members:
            raise PyrunvError(f"container {name} is already in this VM")
        if self.paused:
            raise PyrunvError(f"the VM of pod {self.monitor.record.id} is paused")
        ident = self._new_ident()
        terminal = bool(request.get("terminal"))
        stdio = (fds[0],) * 3 if terminal else tuple(fds[:3])
        trees = fds[1 if terminal else 3:]  # the CLI's copies of the rootfs and binds (hostmount.detached_copy)
        names = request["shared"]
        if len(trees) != len(names):
            raise PyrunvError(f"create {name}: {len(trees)} mount trees for {len(names)} share entries")
        self.members[name] = (ident, tuple(names))
        try:
            for tree, entry in zip(trees, names):
                hostmount.attach(tree, self._path("share", entry))
            io = ProcessIO(self.channel, ident, stdio, self.executor, tty=terminal)
            try:
                await self.channel.request(F.CREATE, ident, bytes.fromhex(request["records"]))
            except BaseException:
                self.channel.detach(ident)
                raise
        except BaseException:
            self._unshare(name)
            raise  # _handle closes the fds and tells the waiter
        io.start_relay()
        return await self._serve_process(conn, ident, io, fds, {"ok": True, "ident": ident}, container=True)

    async def _op_remove(self, request, fds, conn):
        """A member leaves the VM: whatever of it still runs is killed, and its share entries go."""
        name = request["container"]
        if name not in self.members:
            return {"ok": True}
        await self._to_agent(F.REMOVE, self.members[name][0])
        self._unshare(name)  # in a frozen VM too: the guest's processes keep what they hold
        return {"ok": True}

    def _unshare(self, name: str) -> None:
        _, names = self.members.pop(name)
        for entry in reversed(names):
            hostmount.unbind(self._path("share", entry))
        with contextlib.suppress(OSError):
            os.rmdir(self._path("share", name))

    async def _op_shutdown(self, request, fds, conn):
        if not self.shutdown.done():
            self.shutdown.set_result(None)
        return {"ok": True}

    async def _op_exec(self, request, fds, conn):
        container = self._ident(request)
        process = spec_mod.parse_process(request["process"])
        ident = self._new_ident()
        stdio = (fds[0], fds[0], fds[0]) if process.terminal else tuple(fds)
        io = ProcessIO(self.channel, ident, stdio, self.executor, tty=process.terminal)
        try:
            await self.channel.request(F.EXEC, ident, plan_mod.records(
                plan_mod.process_pairs(process) + [("container", container)]))
        except BaseException:
            self.channel.detach(ident)
            raise  # _handle closes the fds and tells the waiter
        io.start_relay()
        return await self._serve_process(conn, ident, io, fds, {"ok": True})

    async def _serve_process(self, conn: socket.socket, ident: int, io: ProcessIO, fds, first_reply: dict,
                             container: bool = False) -> dict:
        """Tells the waiter the process is there, relays its signals, and answers with the exit status (and for
        a container's init, how many of its processes the OOM killer took)."""
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(conn, json.dumps(first_reply).encode() + b"\n")
        relay = loop.create_task(self._waiter_signals(conn, ident))
        code, sig = await io.wait()
        relay.cancel()
        for fd in set(fds):
            os.close(fd)
        return {"exit": code, "signal": sig, **({"oom_kills": io.oom_kills} if container else {})}

    async def _waiter_signals(self, conn: socket.socket, ident: int) -> None:
        """The waiter forwards the signals it gets as JSON lines."""
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
