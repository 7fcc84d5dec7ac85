"""Boot to "agent ready": the median time from QEMU's exec to the agent's READY frame.

The VM is the one `create` boots (same kernel, initrd, devices and virtiofsd), driven without the
rest of the runtime, so this is the floor that pyrunv's own start-up sits on. `boot_phases` also
times the teardown (QEMU and virtiofsd stopped and reaped), which makes it the bare-QEMU floor of a
whole `pyrunv run` in the suite (`python -m benchmarks`); `probe_once` times the agent's probe mode
(`pyrunv.probe`: the agent reboots as soon as it runs, QEMU exits with -no-reboot)."""
import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from pyrunv import config as config_mod
from pyrunv.vm import daemon, qemu, virtiofsd
from pyrunv.monitor.channel import F, HEADER
from pyrunv.vm.plan import VmPlan


def plan_for(config, accel: str) -> VmPlan:
    return VmPlan(machine=qemu.booted_machine(config.machine), accel=accel, vcpus=1, memory_mib=config.memory_mib,
                  kernel=config.kernel, initrd=config.initrd, kernel_params=config.kernel_params,
                  shared=(), init_records=b"")


def console_fd(stack: contextlib.ExitStack, path: str) -> int:
    """QEMU takes its console as an fd (qemu.qemu_argv); this one is closed with `stack`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    stack.callback(os.close, fd)
    return fd


def boot_phases(config, accel: str, extra_params: str = "", deadline: float = 60.0,
                tmp_dir: str | None = None) -> dict:
    """One boot: {"ready": QEMU exec -> READY, "total": virtiofsd exec -> READY -> QEMU and virtiofsd
    stopped and reaped}, in seconds."""
    with tempfile.TemporaryDirectory(prefix="pyrunv-boot-", dir=tmp_dir) as tmp, contextlib.ExitStack() as sockets:
        share = os.path.join(tmp, "share")
        os.mkdir(share)
        listener = sockets.enter_context(socket.socket(socket.AF_UNIX))
        listener.bind(os.path.join(tmp, "fs.sock"))
        listener.listen(1)
        fs_client = sockets.enter_context(socket.socket(socket.AF_UNIX))
        fs_client.connect(os.path.join(tmp, "fs.sock"))
        agent_host, agent_guest = (sockets.enter_context(s) for s in socket.socketpair())
        qmp_host, qmp_guest = (sockets.enter_context(s) for s in socket.socketpair())
        console = console_fd(sockets, os.path.join(tmp, "console.log"))
        argv = qemu.qemu_argv(config, plan_for(config, accel), accel, agent_fd=agent_guest.fileno(),
                            qmp_fd=qmp_guest.fileno(), fs_fd=fs_client.fileno(),
                            console_fd=console, extra_params=extra_params)
        fds = (agent_guest.fileno(), qmp_guest.fileno(), fs_client.fileno(), console)
        started = time.monotonic()
        with virtiofsd.daemon(config, share, listener.fileno(), os.path.join(tmp, "virtiofsd.log")):
            qemu_started = time.monotonic()
            with daemon.Daemon("qemu", argv, fds, os.path.join(tmp, "qemu.log")):
                agent_host.settimeout(deadline)
                try:
                    header = agent_host.recv(HEADER.size, socket.MSG_WAITALL)
                except socket.timeout:
                    header = b""
                ready = time.monotonic() - qemu_started
                if len(header) < HEADER.size or HEADER.unpack(header)[0] != F.READY:
                    raise RuntimeError("no READY from the agent")
        return {"ready": ready, "total": time.monotonic() - started}


def boot_once(config, accel: str, extra_params: str = "", deadline: float = 60.0) -> float:
    """Seconds from QEMU's exec to READY; the VM is killed right after."""
    return boot_phases(config, accel, extra_params, deadline)["ready"]


def probe_once(config, accel: str, deadline: float = 60.0, tmp_dir: str | None = None) -> float:
    """Seconds from QEMU's exec to its exit in the agent's probe mode (no virtio-fs: the probe stops
    before the agent mounts it). Raises if the guest did not print the probe line."""
    with tempfile.TemporaryDirectory(prefix="pyrunv-probe-", dir=tmp_dir) as tmp, contextlib.ExitStack() as sockets:
        console = os.path.join(tmp, "console.log")
        agent_host, agent_guest = (sockets.enter_context(s) for s in socket.socketpair())
        qmp_host, qmp_guest = (sockets.enter_context(s) for s in socket.socketpair())
        console_out = console_fd(sockets, console)
        argv = qemu.qemu_argv(config, plan_for(config, accel), accel, agent_fd=agent_guest.fileno(),
                            qmp_fd=qmp_guest.fileno(), fs_fd=None, console_fd=console_out,
                            extra_params="pyrunv.probe")
        started = time.monotonic()
        with daemon.Daemon("qemu (probe)", argv, (agent_guest.fileno(), qmp_guest.fileno(), console_out),
                       os.path.join(tmp, "qemu.log")) as probed:
            try:
                probed.proc.wait(deadline)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"probe boot did not end within {deadline:g}s") from None
            elapsed = time.monotonic() - started
        with open(console, "rb") as f:
            if b"pyrunv-agent: probe ok" not in f.read():
                raise RuntimeError("probe boot ended without 'pyrunv-agent: probe ok'")
        return elapsed


def measure(runs: int, accel: str, extra_params: str = "") -> list:
    config = config_mod.load()
    return [boot_once(config, accel, extra_params) for _ in range(runs)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--accel", choices=["tcg", "kvm"], default="tcg")
    parser.add_argument("--params", default="", help="extra kernel parameters")
    args = parser.parse_args(argv)
    times = measure(args.runs, args.accel, args.params)
    print(f"boot to agent ready ({args.accel}, {args.runs} runs): median {statistics.median(times) * 1000:.0f} ms, "
          f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
