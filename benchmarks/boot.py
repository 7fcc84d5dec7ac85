"""Boot to "agent ready": the median time from QEMU's exec to the agent's READY frame.

The VM is the one `create` boots (same kernel, initrd, devices and virtiofsd), driven without the
rest of the runtime, so this is the floor that pyrunv's own start-up sits on."""
import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

from pyrunv import config as config_mod, vm
from pyrunv.channel import F, HEADER
from pyrunv.plan import VmPlan


def plan_for(config, accel: str) -> VmPlan:
    return VmPlan(machine=config.machine, accel=accel, vcpus=1, memory_mib=config.memory_mib,
                  kernel=config.kernel, initrd=config.initrd, kernel_params=config.kernel_params,
                  shared=(), init_records=b"")


def boot_once(config, accel: str, extra_params: str = "", deadline: float = 60.0) -> float:
    """Seconds from QEMU's exec to READY; the VM is killed right after."""
    with tempfile.TemporaryDirectory(prefix="pyrunv-boot-") as tmp:
        share = os.path.join(tmp, "share")
        os.mkdir(share)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(os.path.join(tmp, "fs.sock"))
        listener.listen(1)
        fs_client = socket.socket(socket.AF_UNIX)
        fs_client.connect(os.path.join(tmp, "fs.sock"))
        agent_host, agent_guest = socket.socketpair()
        qmp_host, qmp_guest = socket.socketpair()
        argv = vm.qemu_argv(config, plan_for(config, accel), accel, agent_fd=agent_guest.fileno(),
                            qmp_fd=qmp_guest.fileno(), fs_fd=fs_client.fileno(),
                            console_log=os.path.join(tmp, "console.log"), extra_params=extra_params)
        fds = (agent_guest.fileno(), qmp_guest.fileno(), fs_client.fileno())
        with vm.virtiofsd(config, share, listener.fileno(), os.path.join(tmp, "virtiofsd.log")):
            started = time.monotonic()
            with vm.Daemon("qemu", argv, fds, os.path.join(tmp, "qemu.log")):
                agent_host.settimeout(deadline)
                header = agent_host.recv(HEADER.size, socket.MSG_WAITALL)
                elapsed = time.monotonic() - started
                if len(header) < HEADER.size or HEADER.unpack(header)[0] != F.READY:
                    raise RuntimeError("no READY from the agent")
        for s in (listener, fs_client, agent_host, agent_guest, qmp_host, qmp_guest):
            s.close()
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
