"""KVM or TCG: the KVM probe boots our guest, since an openable /dev/kvm proves nothing on some hosts."""
import os
import socket
import subprocess
import time

from ..config import Config
from ..logs import log
from . import qemu, versions
from .daemon import Daemon
from .plan import VmPlan


def probe(config: Config, plan: VmPlan, accel: str, deadline: float = 5.0) -> bool:
    """Whether the guest boots under accel. For KVM, opening /dev/kvm proves nothing (a PVM host aborts or
    hangs a normal guest): boot the guest and see."""
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    import tempfile
    with tempfile.TemporaryDirectory(prefix="pyrunv-probe-") as tmp:
        console = os.path.join(tmp, "console.log")
        agent_host, agent_guest = socket.socketpair()
        qmp_host, qmp_guest = socket.socketpair()
        console_fd = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        argv = qemu.qemu_argv(config, plan, accel, agent_fd=agent_guest.fileno(), qmp_fd=qmp_guest.fileno(),
                              fs_fd=None, console_fd=console_fd, extra_params="pyrunv.probe")
        fds = (agent_guest.fileno(), qmp_guest.fileno(), console_fd)
        with agent_host, qmp_host, agent_guest, qmp_guest, Daemon(f"qemu ({accel} probe)", argv, fds,
                                                                   os.path.join(tmp, "qemu.log")) as probed:
            os.close(console_fd)
            try:
                probed.proc.wait(deadline)
            except subprocess.TimeoutExpired:
                return False
            try:
                with open(console, "rb") as f:
                    return b"pyrunv-agent: probe ok" in f.read()
            except FileNotFoundError:
                return False  # QEMU refused to start with this accelerator


VERDICT_PATH = "/run/pyrunv-accel.json"  # tmpfs: a reboot or a new kvm module asks again


def choose(config: Config, plan: VmPlan) -> str:
    """KVM if it really boots our guest, else TCG. The verdict is remembered until the host reboots."""
    if plan.accel != "auto":
        return plan.accel

    def probe_kvm() -> str:
        started = time.monotonic()
        accel = "kvm" if probe(config, plan, "kvm") else "tcg"
        log.info("accel probe: %s in %.2fs", accel, time.monotonic() - started)
        return accel
    key = f"{config.qemu} {plan.kernel} {os.stat(plan.kernel).st_mtime_ns if os.path.exists(plan.kernel) else 0}"
    return versions.remembered(VERDICT_PATH, key, probe_kvm)
