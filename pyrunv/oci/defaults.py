"""Documents pyrunv prints: the default config.json of `spec` and the `features` document."""
from .. import config
from . import resources, seccomp
from .spec import CAPABILITIES, HOOK_KINDS

DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


def spec(rootless: bool) -> dict:
    document = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": True, "user": {"uid": 0, "gid": 0}, "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {k: list(DEFAULT_CAPS) for k in ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "pyrunv",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                            "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
    if rootless:
        document["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 0, "size": 1}]
        document["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 0, "size": 1}]
        document["linux"]["namespaces"].append({"type": "user"})
    return document


ANNOTATIONS = {
    "memory_mib": "guest memory in MiB (default: the memory limit plus the guest's overhead)",
    "vcpus": "number of virtual CPUs (default: ceil(cpu quota / period))",
    "kernel_params": "extra guest kernel command-line parameters",
    "machine": "QEMU machine type: microvm, q35, or auto (q35 where a template needs it, else microvm)",
    "accel": "auto, kvm or tcg",
    "kernel": "path of the guest kernel (only if the config file allows it)",
    "display": "vnc: a virtio-gpu display served over VNC (`pyrunv display`; only if the config file allows it)",
}


def features(checkpoint_refusal: str | None) -> dict:
    """The features document; checkpoint_refusal says why this host cannot save a VM (None if it can)."""
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.0.2",
        "hooks": list(HOOK_KINDS),
        "mountOptions": ["ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "bind", "rbind",
                         "private", "rprivate", "shared", "rshared", "slave", "rslave", "noatime", "relatime",
                         "strictatime", "tmpcopyup"],
        "linux": {
            # network: the VM's, which the engine's namespace on the host is plumbed into
            "namespaces": ["mount", "uts", "ipc", "pid", "network", "user", "cgroup"],
            "capabilities": list(CAPABILITIES),
            # The VM's processes in the host's cgroups, v1 or v2; the systemd form of cgroupsPath is mapped onto
            # cgroupfs (no scope is asked of systemd). The container's own limits are its cgroup's in the guest.
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False, "rdma": False},
            # Compiled on the host for the guest's x86_64 kernel (oci/seccomp.py), installed by the agent.
            "seccomp": {"enabled": True, "actions": sorted(seccomp.ACTIONS), "operators": list(seccomp.OPERATORS),
                        "archs": list(seccomp.ARCHITECTURES), "knownFlags": list(seccomp.FLAGS),
                        "supportedFlags": list(seccomp.FLAGS)},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "io.github.pyrunv.vm": "each container runs in a QEMU virtual machine: its own, or its pod's sandbox's",
            **{config.ANNOTATION_PREFIX + k: v for k, v in ANNOTATIONS.items()},
            # checkpoint and restore save and resume the whole VM, where this host's QEMU and virtiofsd can
            "io.pyrunv.checkpoint": f"not available: {checkpoint_refusal}" if checkpoint_refusal else "available",
            "io.pyrunv.resources.not-applied": ", ".join(f"linux.resources.{name}" for name in resources.NOT_APPLIED),
        },
    }
