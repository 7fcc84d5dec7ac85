"""Resource limits: the spec's linux.resources (or `update`'s), as the guest's cgroup v2 files of the
container, and as the host cgroup's values for the processes that run it, the VM's overhead added."""
import dataclasses

from ..errors import PyrunvError

MIB = 1 << 20
INT64_MAX = (1 << 63) - 1


UNLIMITED = -1  # in an update: lift the limit
# linux.resources fields accepted and not applied: the guest's cgroup v2 has no such file (swappiness, the
# kernel memory limits, disabling the OOM killer, network class ids), or pyrunv does not write it yet.
NOT_APPLIED = ("memory.swappiness", "memory.kernel", "memory.kernelTCP", "memory.disableOOMKiller",
               "memory.useHierarchy", "cpu.realtimeRuntime", "cpu.realtimePeriod", "blockIO", "hugepageLimits",
               "network", "rdma", "unified", "devices")


@dataclasses.dataclass(frozen=True)
class Resources:
    memory_limit: int = 0        # bytes; 0: not set (in an update: unchanged), UNLIMITED: none
    memory_reservation: int = 0
    memory_swap: int = 0         # memory + swap, as the runtime spec counts it; the guest has no swap
    cpu_shares: int = 0
    cpu_quota: int = 0           # microseconds per period; 0: none
    cpu_period: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    pids_limit: int = 0


def _limit(section: dict, key: str, what: str, update: bool) -> int:
    """A limit as the runtime spec gives it: absent or 0 mean none, and so does -1 (which an update keeps, as
    UNLIMITED: it lifts the limit in force); other negatives are refused."""
    value = section.get(key)
    if value == -1 and update and key in ("limit", "quota"):
        return UNLIMITED
    if value is None or value in (0, -1):
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= INT64_MAX:
        shown = repr(value) if len(repr(value)) <= 24 else repr(value)[:20] + "..."
        raise PyrunvError(f"invalid {what}: {shown} is not a limit (a positive integer up to 2^63-1, or -1 for none)")
    return value


def parse(resources: dict, where: str = "linux.resources", update: bool = False) -> Resources:
    memory, cpu, pids = (resources.get(k) or {} for k in ("memory", "cpu", "pids"))
    for name, section in (("memory", memory), ("cpu", cpu), ("pids", pids)):
        if not isinstance(section, dict):
            raise PyrunvError(f"invalid {where}.{name}: not an object")
    parsed = Resources(
        memory_limit=_limit(memory, "limit", f"{where}.memory.limit", update),
        memory_reservation=_limit(memory, "reservation", f"{where}.memory.reservation", update),
        memory_swap=_limit(memory, "swap", f"{where}.memory.swap", update),
        cpu_shares=_limit(cpu, "shares", f"{where}.cpu.shares", update),
        cpu_quota=_limit(cpu, "quota", f"{where}.cpu.quota", update),
        cpu_period=_limit(cpu, "period", f"{where}.cpu.period", update),
        cpuset_cpus=str(cpu.get("cpus") or ""), cpuset_mems=str(cpu.get("mems") or ""),
        pids_limit=_limit(pids, "limit", f"{where}.pids.limit", update))
    if 0 < parsed.memory_limit < 4 * MIB:
        raise PyrunvError(f"invalid {where}.memory.limit: {parsed.memory_limit} is below the 4 MiB a process needs")
    if parsed.cpu_period and not 1000 <= parsed.cpu_period <= 1000000:
        raise PyrunvError(f"invalid {where}.cpu.period: {parsed.cpu_period} is not between 1000 and 1000000")
    return parsed


def merge(current: Resources, update: Resources) -> Resources:
    """`update` changes what it names and keeps the rest."""
    return dataclasses.replace(current, **{f.name: getattr(update, f.name) for f in dataclasses.fields(update)
                                           if getattr(update, f.name)})


def cpu_weight(shares: int) -> int:
    """cgroup v1 shares (2..262144) as a v2 weight (1..10000), as runc converts them."""
    return min(10000, max(1, 1 + ((max(shares, 2) - 2) * 9999) // 262142))


def _max(value: int):
    return "max" if value == UNLIMITED else value


def guest_files(r: Resources) -> list:
    """(file, value) of the container's cgroup in the guest (cgroup v2) for what the limits set."""
    files = []
    if r.memory_limit:
        files.append(("memory.max", _max(r.memory_limit)))
    if r.memory_reservation:
        files.append(("memory.low", r.memory_reservation))
    if r.pids_limit:
        files.append(("pids.max", _max(r.pids_limit)))
    if r.cpu_quota or r.cpu_period:
        files.append(("cpu.max", f"{_max(r.cpu_quota or UNLIMITED)} {r.cpu_period or 100000}"))
    if r.cpu_shares:
        files.append(("cpu.weight", cpu_weight(r.cpu_shares)))
    return files


def guest_records(r: Resources) -> list:
    """The agent's `cgroup` records (docs/protocol.md)."""
    return [("cgroup", f"{name} {value}") for name, value in guest_files(r)]


def host_files(r: Resources, version: int, memory_mib: int, overhead_mib: int, pids: int) -> list:
    """(file, value) of the host cgroup that holds the VM's processes: memory_mib is the guest's RAM, and
    the processes need overhead_mib beyond it; `pids` bounds their processes and threads. A waiter alone
    (a pod's container) passes memory_mib 0: it gets the spec's values as they are."""
    files = []
    if r.memory_limit:
        limit = (memory_mib + overhead_mib) * MIB if memory_mib else r.memory_limit
        files.append(("memory.limit_in_bytes", limit) if version == 1 else ("memory.max", _max(limit)))
    if r.cpu_quota or r.cpu_period:
        if version == 1:
            files += [("cpu.cfs_period_us", r.cpu_period or 100000), ("cpu.cfs_quota_us", r.cpu_quota or -1)]
        else:
            files.append(("cpu.max", f"{_max(r.cpu_quota or UNLIMITED)} {r.cpu_period or 100000}"))
    if r.cpu_shares:
        files.append(("cpu.shares", r.cpu_shares) if version == 1 else ("cpu.weight", cpu_weight(r.cpu_shares)))
    if r.cpuset_cpus:
        files.append(("cpuset.cpus", r.cpuset_cpus))
    if r.cpuset_mems:
        files.append(("cpuset.mems", r.cpuset_mems))
    if r.pids_limit:
        files.append(("pids.max", "max" if r.pids_limit == UNLIMITED else pids))
    return files


def ram_in_bytes(text: str, flag: str) -> int:
    """runc's sizes: a number of bytes, or one with a b, k, m, g, t or p suffix (powers of 1024); -1 for none."""
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
    value = text.strip().lower()
    if value == "-1":
        return -1
    number, unit = value.rstrip("bkmgtpi"), value[len(value.rstrip("bkmgtpi")):].rstrip("bi") or ""
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise PyrunvError(f"invalid value for {flag}: {text!r}") from None


def from_update(document: dict | None, flags: dict) -> Resources:
    """`update`'s limits: --resources (linux.resources JSON), then the single flags over it."""
    if not isinstance(document, (dict, type(None))):
        raise PyrunvError("invalid --resources: not a JSON object")
    document = dict(document or {})
    for (section, key), value in flags.items():
        if value is not None:
            document[section] = dict(document.get(section) or {}, **{key: value})
    return parse(document, "update", update=True)
