"""Runtime settings: /etc/pyrunv/config.toml (or $PYRUNV_CONFIG), then $PYRUNV_ACCEL; see docs/configuration.md."""
import dataclasses
import os

from .errors import PyrunvError

DEFAULT_PATH = "/etc/pyrunv/config.toml"
GUEST_DIR = os.environ.get("PYRUNV_GUEST_DIR", "/var/lib/pyrunv/guest")
ANNOTATION_PREFIX = "io.pyrunv.vm."
MACHINES = ("auto", "microvm", "q35")  # auto: q35 where a template needs it (template.machine), else microvm
ACCELS = ("auto", "kvm", "tcg")
SHARE_CACHES = ("auto", "always", "never")
TEMPLATES = ("auto", "off")


@dataclasses.dataclass
class Config:
    qemu: str = "/usr/bin/qemu-system-x86_64"
    # Debian 13's Rust virtiofsd, else Debian 12's C one, which came with QEMU (vm.virtiofsd knows both).
    virtiofsd: str = next((p for p in ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd") if os.path.exists(p)),
                          "/usr/lib/qemu/virtiofsd")
    kernel: str = os.path.join(GUEST_DIR, "vmlinux")
    initrd: str = os.path.join(GUEST_DIR, "initrd.img")
    vcpus: int = 1
    max_vcpus: int = 0             # vCPUs `update` may bring online; 0: the host's cores, at most 16
    memory_mib: int = 128          # guest memory when the spec sets no limit
    max_memory_mib: int = 0        # guest memory `update` may grow to; 0: a quarter of the host's, at most 4096
    guest_overhead_mib: int = 32   # added to a spec's memory limit: the guest kernel and agent
    # The host cgroup's memory limit is the guest's RAM plus this: QEMU itself, its TCG translation
    # cache, virtiofsd and the monitor (docs/configuration.md has the measured figures).
    host_overhead_mib: int = 128
    host_pids_limit: int = 1024    # the host cgroup's pids.max where the spec limits pids: QEMU, virtiofsd, monitor threads
    machine: str = "auto"
    accel: str = "auto"
    boot_timeout: float = 30.0
    tcg_tb_size_mib: int = 16       # TCG translation cache: 24 MiB saved ~45 ms of boot but cost 8 MiB PSS
    kernel_params: str = ""
    share_cache: str = "auto"      # virtiofsd's --cache: auto, always or never (docs/configuration.md)
    share_threads: int = 0         # virtiofsd's --thread-pool-size; 0 serves requests on its queue thread
    qemu_user: str = ""            # run QEMU as this unprivileged user
    template: str = "auto"         # auto: VMs load a booted one of their shape where QEMU can (template.py); off
    template_dir: str = "/var/lib/pyrunv/templates"
    # Annotations may come from untrusted pod specs: only these keys (after the prefix) are honoured.
    annotations_allowed: list = dataclasses.field(
        default_factory=lambda: ["memory_mib", "vcpus", "kernel_params", "machine", "accel"])


def load(path: str | None = None) -> Config:
    path = path or os.environ.get("PYRUNV_CONFIG") or DEFAULT_PATH
    values: dict = {}
    if os.path.exists(path):
        import tomllib
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise PyrunvError(f"config file {path}: {e}") from None
    known = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in values.items():
        if key not in known:
            raise PyrunvError(f"config file {path}: unknown setting {key!r}")
    config = Config(**values)
    if os.environ.get("PYRUNV_ACCEL"):
        config.accel = os.environ["PYRUNV_ACCEL"]
    check(config, f"config file {path}")
    return config


def check(config: Config, where: str) -> None:
    if config.machine not in MACHINES:
        raise PyrunvError(f"{where}: machine must be one of {', '.join(MACHINES)}, not {config.machine!r}")
    if config.accel not in ACCELS:
        raise PyrunvError(f"{where}: accel must be one of {', '.join(ACCELS)}, not {config.accel!r}")
    if config.share_cache not in SHARE_CACHES:
        raise PyrunvError(f"{where}: share_cache must be one of {', '.join(SHARE_CACHES)}, not {config.share_cache!r}")
    if config.template not in TEMPLATES:
        raise PyrunvError(f"{where}: template must be one of {', '.join(TEMPLATES)}, not {config.template!r}")
    if not 0 <= int(config.share_threads) <= 64:
        raise PyrunvError(f"{where}: share_threads must be between 0 and 64, not {config.share_threads}")
    if not 1 <= int(config.vcpus) <= 16:
        raise PyrunvError(f"{where}: vcpus must be between 1 and 16, not {config.vcpus}")
    if not 0 <= int(config.max_vcpus) <= 16:
        raise PyrunvError(f"{where}: max_vcpus must be between 0 and 16, not {config.max_vcpus}")
    if not 32 <= int(config.memory_mib) <= 65536:
        raise PyrunvError(f"{where}: memory_mib must be between 32 and 65536, not {config.memory_mib}")
    if not 0 <= int(config.max_memory_mib) <= 65536:
        raise PyrunvError(f"{where}: max_memory_mib must be between 0 and 65536, not {config.max_memory_mib}")
