"""The per-container monitor: the process whose pid `create` writes to --pid-file.

It owns the VM (virtiofsd, QEMU, QMP) and the guest channel, relays the stdio it inherited from
`create`, forwards the signals it receives, serves the CLI's control socket, and finally exits with
the container's status: its exit code, or death by the same signal.

sandbox.launch forks it from the CLI. The child starts the VM at once, with the modules the CLI has
loaded (`Monitor.start_vm`), then execs a fresh interpreter (`main`), which takes the running VM over
(`Monitor.adopt`) and imports the rest (service.py) while QEMU boots. The fresh interpreter keeps none of
the CLI's modules (click, jsonschema) in its memory for the container's lifetime."""
import contextlib
import ctypes
import dataclasses
import os
import socket
import sys

from .. import jsonlite, logs
from ..config import Config
from ..errors import PyrunvError
from ..host import mounts
from ..host import network
from ..host.signals import exit_like
from ..host.sockets import socket_path
from ..state import store as state
from ..vm import daemon, qemu
from ..vm import plan as plan_mod
from ..vm import template as template_mod

log = logs.log
PR_SET_NAME = 15


def main(data: dict, report_fd: int) -> None:
    """The monitor's fresh interpreter, as `launch` describes it (`handover`): it serves the VM the forked
    child started."""
    try:
        logs.configure(**data["log"])
        exit_like(*Monitor.from_json(data).serve(data["vm"], report_fd))
    finally:
        os._exit(1)


def _close_fds_except(keep: list) -> None:
    keep = sorted(keep)
    for low, high in zip([3] + [fd + 1 for fd in keep], keep + [1 << 16]):
        os.closerange(low, high)


class Monitor:
    def __init__(self, store, record, plan, config, terminal, console_socket, console_size, restore_from):
        self.store, self.record, self.plan, self.config = store, record, plan, config
        self.terminal, self.console_socket, self.console_size = terminal, console_socket, console_size
        # A saved VM's incoming (snapshot.Source.open): QEMU loads it from its URI (file: or fd:), no boot
        self.restore_from = restore_from
        uri = restore_from["uri"] if restore_from else ""
        self.incoming_fd = int(uri[3:]) if uri.startswith("fd:") else None  # a streamed one's, from the CLI
        self.state_dir = store.path(record.id)
        self.tap_name = None  # the VM's tap, if the spec has a network namespace (see network.py)

    def to_json(self) -> dict:
        """What from_json makes the same monitor of, in the fresh interpreter."""
        return {"root": self.store.root, "record": self.record.to_json(), "plan": plan_mod.to_json(self.plan),
                "config": dataclasses.asdict(self.config), "terminal": self.terminal,
                "console_socket": self.console_socket, "console_size": self.console_size,
                "restore_from": self.restore_from}

    @classmethod
    def from_json(cls, data: dict) -> "Monitor":
        size = data["console_size"]
        return cls(state.Store(data["root"]), state.Record(**data["record"]), plan_mod.from_json(data["plan"]),
                   Config(**data["config"]), data["terminal"], data["console_socket"], tuple(size) if size else None,
                   data["restore_from"])

    def start_vm(self, report_fd: int, cgroup) -> dict:
        """In the child `launch` forked, before its exec: the monitor's session and namespaces, and the VM
        started. Returns what the fresh interpreter needs to take the VM over (`adopt`); the fds it names
        are made inheritable. On an error, what it started is gone before it raises."""
        if cgroup:  # first: QEMU's and virtiofsd's memory is charged there from their first page
            cgroup.add(os.getpid(), cpu_time=False)
        inherited = [self.incoming_fd] if self.incoming_fd is not None else []
        os.setsid()
        _close_fds_except([report_fd] + inherited)
        logs.set_fallback(self.path("monitor.log"))  # our stderr is the container's
        # Namespaces while the process has a single thread: unshare needs one.
        mounts.private_namespace()
        if self.plan.network_namespace is not None:
            mounts.network_namespace(self.plan.network_namespace)
        with contextlib.ExitStack() as stack:
            accel = self._start_vm(stack)
            sockets = {"agent": self.agent_socket, "qmp": self.qmp_socket, "display": self.display_listener}
            handover = {"accel": accel, "tap_name": self.tap_name,
                        "template": self.template and self.template.to_json(),
                        "fds": {name: s.fileno() for name, s in sockets.items() if s is not None},
                        "helpers": [helper.handover() for helper in (self.virtiofsd, self.qemu)]}
            for fd in list(handover["fds"].values()) + inherited:
                os.set_inheritable(fd, True)
            stack.pop_all()  # the VM runs on: the fresh interpreter owns it now
        return handover

    def serve(self, handover: dict, report_fd: int) -> tuple:
        """In the fresh interpreter: serves the VM start_vm started, until its container has ended; returns
        the status to exit like."""
        status = (1, 0)
        try:
            with contextlib.ExitStack() as stack:
                self.adopt(handover, stack)
                logs.reopen(self.path("monitor.log"))
                ctypes.CDLL(None).prctl(PR_SET_NAME, b"pyrunv-monitor")
                # asyncio imports ssl if it can (2-4 MiB of PSS per monitor) and manages without it: the monitor
                # speaks no TLS. Whatever imports ssl later (qemu.qmp, on the first QMP command) gets it then.
                blocked = sys.modules.setdefault("ssl", None) is None
                import asyncio
                if blocked:
                    del sys.modules["ssl"]
                from .service import Service
                status = asyncio.run(Service(self, handover["accel"]).run(report_fd))
        except PyrunvError as e:
            self.report(report_fd, str(e))  # only now: everything the boot started is gone
        except BaseException as e:  # the monitor must always report and exit
            log.exception("monitor failed")
            self.report(report_fd, f"monitor failed: {e}")
        return status

    def adopt(self, handover: dict, stack: contextlib.ExitStack) -> None:
        """The VM that start_vm started, with the same teardown: QEMU stopped first, then virtiofsd."""
        self.virtiofsd, self.qemu = (stack.enter_context(daemon.Daemon.adopt(**helper)) for helper in handover["helpers"])
        fds = handover["fds"]
        self.agent_socket = stack.enter_context(socket.socket(fileno=fds["agent"]))
        self.qmp_socket = stack.enter_context(socket.socket(fileno=fds["qmp"]))
        self.display_listener = stack.enter_context(socket.socket(fileno=fds["display"])) if "display" in fds else None
        self.tap_name = handover["tap_name"]
        self.template = None
        if handover["template"]:
            self.template = template_mod.Template(*handover["template"])  # what QEMU was started for

    @staticmethod
    def report(report_fd: int, message: str) -> bool:
        """Tells `create` how the boot went; False if create is gone and nobody will own this container."""
        try:
            os.write(report_fd, message.encode())
            return True
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.close(report_fd)

    def path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    def _start_vm(self, stack: contextlib.ExitStack) -> str:
        """Share, sockets, virtiofsd and QEMU; returns the accelerator. `stack` tears it all down."""
        from ..vm import accelerator, virtiofsd  # the forked child's alone: the fresh interpreter starts no VM
        share = self.path("share")
        os.mkdir(share, 0o711)  # a user namespace's root passes through it in the guest; the state dir keeps it private
        mounts.shared_directory(share)
        for shared in self.plan.shared:
            mounts.bind(shared.source, os.path.join(share, shared.name), shared.readonly)
        self.plan = dataclasses.replace(self.plan, machine=template_mod.machine(self.config, self.plan))
        accel = accelerator.choose(self.config, self.plan)

        # Every socket is made here and handed over as an fd: no daemon races us for a path.
        listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        fs_client = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        with socket_path(self.state_dir, "fs.sock") as path:
            listener.bind(path)
            listener.listen(1)
            fs_client.connect(path)
            os.unlink(path)
        # QMP for people (`pyrunv qmp`), beside the monitor's own: QEMU listens on the socket we made.
        user_qmp = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        with socket_path(self.state_dir, qemu.QMP_SOCKET) as path:
            user_qmp.bind(path)
            os.chmod(path, 0o600)
        user_qmp.listen(1)
        self.display_listener = None  # the service hands each client that connects to QEMU's VNC server
        if self.plan.display:
            self.display_listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            with socket_path(self.state_dir, qemu.VNC_SOCKET) as path:
                self.display_listener.bind(path)
                os.chmod(path, 0o600)
            self.display_listener.listen(4)
        self.agent_socket, agent_guest = socket.socketpair()
        self.qmp_socket, qmp_guest = socket.socketpair()
        for s in (self.agent_socket, agent_guest, self.qmp_socket, qmp_guest):
            stack.enter_context(s)

        self.virtiofsd = stack.enter_context(
            virtiofsd.daemon(self.config, share, listener.fileno(), self.path("virtiofsd.log")))
        console = os.open(self.path("console.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        stack.callback(os.close, console)
        # A container with a network namespace gets a NIC; at start it takes the engine's veth's place.
        handed = [agent_guest, qmp_guest, fs_client, user_qmp]
        tap = None
        if self.plan.network_namespace is not None:
            tap_fd, self.tap_name = network.make_tap()
            tap = stack.enter_context(open(tap_fd, "rb", buffering=0))
            handed.append(tap)
        # The host's block devices, opened here: QEMU may run as a user who could not open them. QEMU takes
        # from the fd set the fd whose access mode it asks for: read-only to probe, then read-write.
        disks = []
        for path, serial in self.plan.disks:
            try:
                disks.append(([stack.enter_context(open(path, mode, buffering=0)).fileno() for mode in ("rb", "r+b")],
                              serial))
            except OSError as e:
                raise PyrunvError(f"cannot open block device {path}: {e.strerror}") from None
        self.template = template_mod.choose(self.config, self.plan) if self.restore_from is None else None
        argv = qemu.qemu_argv(self.config, self.plan, accel, agent_fd=agent_guest.fileno(),
                            qmp_fd=qmp_guest.fileno(), fs_fd=fs_client.fileno(), console_fd=console,
                            tap_fd=tap.fileno() if tap else None, user_qmp_fd=user_qmp.fileno(), disks=disks,
                            incoming=self.restore_from is not None,
                            plug_share=self.template is not None and self.template.plugged)
        if self.template:
            self.template.locate(self.config, self.plan, argv, self.virtiofsd.argv)
            if self.template.exists:
                argv += ["-incoming", "defer"]  # loaded below, once QEMU runs
        log.debug("starting %s", " ".join(argv))
        self.qemu = stack.enter_context(daemon.Daemon(
            "qemu", argv, [f.fileno() for f in handed] + [console] + [fd for fds, _ in disks for fd in fds],
            self.path("qemu.log"),
            user=self.config.qemu_user))
        for s in [listener] + handed:
            s.close()
        with open(self.path("helpers.json"), "w") as f:
            f.write(jsonlite.dumps([(d.pid, state.process_start_time(d.pid)) for d in (self.qemu, self.virtiofsd)]))
        if self.template and self.template.exists:
            with socket_path(self.state_dir, qemu.QMP_SOCKET) as path:  # the people's QMP, free till create ends
                self.template.load(self.plan, self.qemu.pid, path, self.config.boot_timeout)
        return accel
