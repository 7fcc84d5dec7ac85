"""From a validated Spec and the runtime Config to a VM plan: VM size, shared paths, and the agent's records.

The monitor reads a VmPlan before it starts QEMU: the spec's and the resources' modules load only where a
plan is made, not on that path."""
from __future__ import annotations

import dataclasses
import os

from .. import config as config_mod
from ..errors import PyrunvError

TYPE_CHECKING = False  # typing's own flag, without importing typing
if TYPE_CHECKING:
    from ..oci.spec import Mount, Process, Spec

ROOTFS_NAME = "rootfs"  # the rootfs's name inside the share
MIB = 1 << 20

_FLAGS = {"ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8, "sync": 0x10, "mand": 0x40,
          "dirsync": 0x80, "noatime": 0x400, "nodiratime": 0x800, "relatime": 1 << 21,
          "strictatime": 1 << 24, "bind": 0x1000, "rbind": 0x1000 | 0x4000}
_CLEARS = {"rw", "suid", "dev", "exec", "async", "nomand", "atime", "diratime", "norelatime", "nostrictatime"}
_PROPAGATION = {"private": 1 << 18, "rprivate": 1 << 18 | 0x4000, "slave": 1 << 19, "rslave": 1 << 19 | 0x4000,
                "shared": 1 << 20, "rshared": 1 << 20 | 0x4000, "unbindable": 1 << 17,
                "runbindable": 1 << 17 | 0x4000}


@dataclasses.dataclass(frozen=True)
class SharedPath:
    source: str     # host path
    name: str       # its name inside the share directory
    readonly: bool


@dataclasses.dataclass(frozen=True)
class VmPlan:
    machine: str
    accel: str
    vcpus: int              # online at boot
    memory_mib: int
    kernel: str
    initrd: str
    kernel_params: str
    shared: tuple           # SharedPath, the rootfs first
    init_records: bytes     # the agent's CREATE payload
    network_namespace: str | None = None  # where the monitor and QEMU live (see host/mounts.py)
    disks: tuple = ()       # (host block device, serial): virtio-blk disks for the spec's block devices
    display: str = ""       # "vnc": a virtio-gpu display, served by QEMU's VNC server (runtime/vm_access.py)
    max_vcpus: int = 0      # present, for `update` to bring online (qemu.py); 0: as many as vcpus
    max_memory_mib: int = 0  # RAM QEMU holds for `update` to add (qemu.py); 0: as much as memory_mib


def to_json(plan: VmPlan) -> dict:
    """The plan as JSON carries it: to the monitor, and into a checkpoint."""
    return dict(dataclasses.asdict(plan), init_records=plan.init_records.hex())


def from_json(data: dict) -> VmPlan:
    """The plan to_json wrote; ValueError, KeyError or TypeError for anything else (a checkpoint's metadata may
    come from a peer on the network)."""
    plan = VmPlan(**dict(data, init_records=bytes.fromhex(data["init_records"]),
                         shared=tuple(SharedPath(**shared) for shared in data["shared"]),
                         disks=tuple(map(tuple, data["disks"]))))
    numbers = (plan.vcpus, plan.memory_mib, plan.max_vcpus, plan.max_memory_mib)
    texts = (plan.machine, plan.accel, plan.kernel, plan.initrd, plan.kernel_params, plan.display)
    paths = [field for entry in plan.shared for field in (entry.source, entry.name)]
    if (any(type(n) is not int or not 0 <= n <= 65536 for n in numbers) or not 1 <= plan.vcpus <= 16
            or any(type(t) is not str for t in texts + tuple(paths) + tuple(f for d in plan.disks for f in d))
            or any(len(d) != 2 for d in plan.disks) or any(type(e.readonly) is not bool for e in plan.shared)
            or type(plan.network_namespace) not in (str, type(None))):
        raise ValueError("not a VM plan")
    return plan


def records(pairs) -> bytes:
    """The agent's wire form: NUL-terminated key=value records (docs/protocol.md)."""
    out = bytearray()
    for key, value in pairs:
        text = f"{key}={value}"
        if "\0" in text:
            raise PyrunvError(f"{key}: value contains a NUL byte")
        try:
            out += text.encode() + b"\0"
        except UnicodeEncodeError:  # JSON can carry lone surrogates, which no UTF-8 string holds
            raise PyrunvError(f"{key}: value is not valid Unicode") from None
    return bytes(out)


def process_pairs(p: Process) -> list:
    from ..oci.spec import CAP_SETS, CAPABILITIES, RLIMITS
    pairs = [("arg", a) for a in p.args] + [("env", e) for e in p.env]
    pairs += [("cwd", p.cwd), ("uid", p.uid), ("gid", p.gid)] + [("group", g) for g in p.additional_gids]
    if p.umask is not None:
        pairs.append(("umask", f"{p.umask:o}"))
    pairs += [("rlimit", f"{RLIMITS[name]} {soft} {hard}") for name, soft, hard in p.rlimits]
    if p.capabilities is not None:
        masks = [sum(1 << CAPABILITIES[c] for c in p.capabilities[s]) for s in CAP_SETS]
        pairs.append(("caps", " ".join(f"{m:x}" for m in masks)))
    if p.no_new_privileges:
        pairs.append(("nnp", 1))
    if p.terminal:
        pairs.append(("terminal", 1))
    if p.oom_score_adj is not None:
        pairs.append(("oom_score_adj", p.oom_score_adj))
    return pairs


def mount_record(m: Mount, shared_name: str | None) -> str:
    flags = propagation = 0
    data = []
    for option in m.options:
        if option in _FLAGS:
            flags |= _FLAGS[option]
        elif option in _CLEARS:
            pass
        elif option in _PROPAGATION:
            propagation |= _PROPAGATION[option]
        else:
            data.append(option)
    kind, source = ("bind", shared_name) if m.is_bind else (m.type, m.source or m.type)
    fields = (f"{flags:x}", f"{propagation:x}", kind, source, m.destination, ",".join(data))
    if any("\t" in f for f in fields):
        raise PyrunvError(f"invalid config.json: mount {m.destination!r}: tab in a mount field")
    return "\t".join(fields)


def _annotation(spec: Spec, config: config_mod.Config, key: str, default, convert):
    name = config_mod.ANNOTATION_PREFIX + key
    if name not in spec.annotations or key not in config.annotations_allowed:
        return default
    try:
        return convert(spec.annotations[name])
    except ValueError:
        raise PyrunvError(f"annotation {name}: invalid value {spec.annotations[name]!r}") from None


@dataclasses.dataclass(frozen=True)
class ContainerPlan:
    """One container inside a VM: what the share must hold for it, and the agent's CREATE records."""
    shared: tuple           # SharedPath, the rootfs first
    records: bytes
    disks: tuple = ()       # (host block device, serial in the guest)


def container(spec: Spec, share_prefix: str = "", joins=()) -> ContainerPlan:
    """The container's share entries (named under share_prefix) and its CREATE records; `joins` are
    (namespace kind, container ident) pairs of a pod's namespaces it shares."""
    from ..oci import resources as resources_mod
    shared = [SharedPath(spec.rootfs, share_prefix + ROOTFS_NAME, False)]
    pairs = [("root", share_prefix + ROOTFS_NAME)] + process_pairs(spec.process)
    pairs += [("join", f"{kind} {ident}") for kind, ident in joins]
    pairs += resources_mod.guest_records(spec.resources)
    if spec.uid_mappings:
        pairs += [("userns", 1)] + [("uidmap", " ".join(map(str, m))) for m in spec.uid_mappings]
        pairs += [("gidmap", " ".join(map(str, m))) for m in spec.gid_mappings]
    if spec.root_readonly:
        pairs.append(("root_readonly", 1))
    if spec.rootfs_propagation in _PROPAGATION:
        pairs.append(("root_propagation", f"{_PROPAGATION[spec.rootfs_propagation]:x}"))
    if spec.hostname:
        pairs.append(("hostname", spec.hostname))
    for m in spec.mounts:
        name = None
        if m.is_bind:
            name = f"{share_prefix}m{len(shared)}"
            shared.append(SharedPath(m.source, name, "ro" in m.options))
        pairs.append(("mount", mount_record(m, name)))
    pairs += [("masked", p) for p in spec.masked_paths] + [("readonly", p) for p in spec.readonly_paths]
    pairs += [("sysctl", f"{k}={v}") for k, v in spec.sysctl]
    if spec.seccomp:
        from ..oci import seccomp
        pairs += [("seccomp", seccomp.to_bpf(spec.seccomp).hex()), ("seccomp_flags", spec.seccomp.flags)]
    disks = []
    for d in spec.devices:
        if d.type == "b" and spec.privileged:
            continue  # the host's disks stay the host's: a privileged container is privileged in its VM
        serial = ""
        host_device = host_block_device(d) if d.type == "b" else None
        if host_device:  # the host's device, as a virtio-blk disk the agent finds by its serial
            serial = f"pyrunv{len(disks)}"
            disks.append((host_device, serial))
        pairs.append(("device", f"{d.type} {d.major} {d.minor} {d.mode:o} {d.uid} {d.gid} {d.path} {serial}".rstrip()))
    return ContainerPlan(shared=tuple(shared), records=records(pairs), disks=tuple(disks))


def host_block_device(device) -> str | None:
    """The host's block device with the spec's numbers (engines name devices by numbers, not paths); None if
    the host has none: then, as runc does, the container gets a node with those numbers (the agent refuses
    numbers of a disk of the VM's)."""
    try:
        with open(f"/sys/dev/block/{device.major}:{device.minor}/uevent") as f:
            return "/dev/" + dict(line.strip().split("=", 1) for line in f if "=" in line)["DEVNAME"]
    except (OSError, KeyError):
        return None


# What containerd's CRI plugin says of a pod's resources in the sandbox's spec (where it knows them).
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"


def _pod_resource(spec: Spec, key: str) -> int:
    try:
        return max(int(spec.annotations.get(key, 0)), 0)
    except ValueError:
        raise PyrunvError(f"annotation {key}: invalid value {spec.annotations[key]!r}") from None


def vm_memory_mib(limit: int, config: config_mod.Config) -> int:
    """The guest's RAM for a memory limit in bytes: the limit, and the guest kernel's and agent's share."""
    return -(-limit // MIB) + config.guest_overhead_mib  # exact: JSON integers are unbounded


def present_cpus(plan: VmPlan) -> int:
    """The VM's vCPUs, online or not: a guest without ACPI cannot be given more after its boot."""
    return max(plan.vcpus, plan.max_vcpus)


def vcpus_for(quota: int, period: int) -> int:
    """The vCPUs a CPU quota needs (a period of 0 is the kernel's default); 0 for no quota."""
    if quota <= 0:
        return 0
    return min(16, -(-quota // (period or 100000)))  # exact: JSON integers are unbounded


def max_vcpus(config: config_mod.Config) -> int:
    return int(config.max_vcpus) or min(16, os.cpu_count() or 1)


def ram_mib(plan: VmPlan) -> int:
    """The VM's RAM in QEMU: the guest's kernel uses memory_mib of it at boot, and `update` adds the rest."""
    return max(plan.memory_mib, plan.max_memory_mib)


def max_memory_mib(config: config_mod.Config) -> int:
    if config.max_memory_mib:
        return int(config.max_memory_mib)
    return min(4096, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4 // MIB)


def make(spec: Spec, config: config_mod.Config) -> VmPlan:
    """The VM of a container that has one of its own: a single container, or a pod's sandbox."""
    quota = spec.resources.cpu_quota or _pod_resource(spec, SANDBOX_CPU_QUOTA)
    period = spec.resources.cpu_period or _pod_resource(spec, SANDBOX_CPU_PERIOD)
    vcpus = vcpus_for(quota, period) if period > 0 else 0
    vcpus = vcpus or config.vcpus
    limit = spec.resources.memory_limit or _pod_resource(spec, SANDBOX_MEMORY)
    memory = vm_memory_mib(limit, config) if limit > 0 else config.memory_mib
    sized = dataclasses.replace(
        config,
        vcpus=_annotation(spec, config, "vcpus", vcpus, int),
        memory_mib=_annotation(spec, config, "memory_mib", memory, int),
        machine=_annotation(spec, config, "machine", config.machine, str),
        accel=_annotation(spec, config, "accel", config.accel, str),
        kernel=_annotation(spec, config, "kernel", config.kernel, str))
    from_annotations = any(config_mod.ANNOTATION_PREFIX + k in spec.annotations for k in config.annotations_allowed)
    config_mod.check(sized, "annotations" if from_annotations else "the spec's resources")
    extra_params = _annotation(spec, config, "kernel_params", "", str)
    init = container(spec)
    return VmPlan(
        machine=sized.machine, accel=sized.accel, vcpus=int(sized.vcpus), memory_mib=int(sized.memory_mib),
        max_vcpus=max(int(sized.vcpus), max_vcpus(config)), max_memory_mib=max_memory_mib(config),
        kernel=sized.kernel, initrd=config.initrd,
        kernel_params=" ".join(p for p in (config.kernel_params, extra_params) if p),
        shared=init.shared, init_records=init.records, network_namespace=spec.network_namespace, disks=init.disks,
        display=_display(spec, config))


MIN_GUEST_MIB = 64  # below it the guest kernel and agent leave a container next to nothing


def fit(plan: VmPlan, room: int | None, config: config_mod.Config) -> VmPlan:
    """The VM within room, the smallest memory limit of its host cgroup and that cgroup's ancestors, in bytes.
    A kubelet limits a pod's cgroup to the sum of its containers' limits (plus the RuntimeClass's overhead,
    where set): the guest gets what is left of it once QEMU, virtiofsd and the monitor have
    host_overhead_mib, so that a container that outgrows the VM meets the guest's OOM killer and QEMU
    never meets the host's."""
    if room is None:
        return plan
    guest = room // MIB - config.host_overhead_mib
    if guest < MIN_GUEST_MIB:
        raise PyrunvError(
            f"a memory limit of {room // MIB} MiB on the host cgroup is too small for a VM: it needs "
            f"{MIN_GUEST_MIB + config.host_overhead_mib} MiB at least ({config.host_overhead_mib} MiB for QEMU, "
            f"virtiofsd and the monitor, host_overhead_mib); give the pod's RuntimeClass an overhead "
            f"(docs/kubernetes.md)")
    return plan if plan.memory_mib <= guest else dataclasses.replace(plan, memory_mib=guest)


DISPLAYS = ("", "vnc")


def _display(spec: Spec, config: config_mod.Config) -> str:
    """A display costs a device and a server in QEMU: refused, not ignored, unless the config allows it."""
    name = config_mod.ANNOTATION_PREFIX + "display"
    if name not in spec.annotations:
        return ""
    if "display" not in config.annotations_allowed:
        raise PyrunvError(f"annotation {name}: not allowed by the config file (annotations_allowed)")
    value = spec.annotations[name]
    if value not in DISPLAYS:
        raise PyrunvError(f"annotation {name}: invalid value {value!r} (vnc, or empty for none)")
    return value
