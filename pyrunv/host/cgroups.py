"""The host cgroup of a container: where the engine's cgroupsPath says, on cgroup v1 or v2.

Every host process that runs the container (the VM's monitor, QEMU, virtiofsd; a pod member's waiter)
lives there, so that engines read its usage and limit it as they would a runc container's. pyrunv
creates the directories that are not there yet, remembers which, and removes only those. Without a
cgroupsPath the processes stay in the engine's cgroup."""
import contextlib
import os
import time

from ..errors import PyrunvError

ROOT = "/sys/fs/cgroup"
CPU_TIME = ("cpu", "cpuacct")
UNLIMITED_V1 = 1 << 62  # v1 reads "no limit" as the largest page-aligned counter, 9223372036854771712


def version() -> int:
    """2 on a unified hierarchy, 1 where controllers have hierarchies of their own (hybrid included)."""
    return 2 if os.path.exists(os.path.join(ROOT, "cgroup.controllers")) else 1


def hierarchies() -> dict:
    """controller -> the mount point of its hierarchy ('' -> the unified one on cgroup v2)."""
    found, unified = {}, version() == 2
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            fstype, options = fields[separator + 1], fields[separator + 3]
            if fstype == "cgroup2" and unified:
                found[""] = fields[4]
            elif fstype == "cgroup":
                for option in options.split(","):
                    if option in ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer",
                                  "net_cls", "net_prio", "perf_event", "hugetlb", "rdma", "misc"):
                        found[option] = fields[4]
    return found


def _expand_slice(name: str) -> str:
    """systemd's slice nesting: a-b.slice lives in a.slice."""
    if not name.endswith(".slice") or "/" in name:
        raise PyrunvError(f"invalid cgroupsPath: {name!r} is not a systemd slice")
    stem = name[:-len(".slice")]
    if stem == "-":
        return ""
    path, prefix = "", ""
    for part in stem.split("-"):
        if not part:
            raise PyrunvError(f"invalid cgroupsPath: slice {name!r} has an empty part")
        prefix = f"{prefix}-{part}" if prefix else part
        path += f"/{prefix}.slice"
    return path


def relative_path(cgroups_path: str, systemd: bool) -> str:
    """The cgroup's path under each hierarchy's root. With --systemd-cgroup, `slice:prefix:name` maps onto
    cgroupfs as runc maps it where systemd does not run (pyrunv does not ask systemd to make scopes)."""
    if systemd:
        parts = cgroups_path.split(":")
        if len(parts) != 3:
            raise PyrunvError(f"invalid cgroupsPath {cgroups_path!r}: expected slice:prefix:name with --systemd-cgroup")
        slice_, prefix, name = parts
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope"
        path = f"{_expand_slice(slice_ or 'system.slice')}/{unit}"
    else:
        path = "/" + cgroups_path.lstrip("/")
    components = [c for c in path.split("/") if c]
    if ".." in components or "." in components or not components:
        raise PyrunvError(f"invalid cgroupsPath {cgroups_path!r}: it must name a cgroup below the cgroup root")
    return "/".join(components)


class HostCgroup:
    """The container's directory in each hierarchy. `created` lists those pyrunv made, deepest last."""

    def __init__(self, directories: dict, created: list):
        self.directories, self.created = directories, created

    @classmethod
    def create(cls, cgroups_path: str, systemd: bool) -> "HostCgroup":
        relative = relative_path(cgroups_path, systemd)
        directories, created = {}, []
        try:
            for controller, mount in sorted(hierarchies().items()):
                directory = os.path.join(mount, relative)
                directories[controller] = directory
                created += _make_dirs(mount, relative, controller == "cpuset")
        except OSError as e:
            cls({}, created).remove()
            raise PyrunvError(f"cannot create cgroup {relative}: {e.strerror}") from None
        return cls(directories, created)

    def memory_room(self, above: bool = False) -> int | None:
        """The smallest memory limit from this cgroup (above: from its parent) up to its hierarchy's root, in
        bytes: what all the processes in it may use together (a kubelet's pod cgroup bounds its containers');
        None if none."""
        unified = "" in self.directories
        directory = self.directories.get("" if unified else "memory")
        if directory and above:
            directory = os.path.dirname(directory)
        limits = []
        while directory and directory.startswith(ROOT + "/"):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(directory, "memory.max" if unified else "memory.limit_in_bytes")) as f:
                    limits.append(int(f.read()))  # v2's "max" is no limit: ValueError
            directory = os.path.dirname(directory)
        limits = [limit for limit in limits if limit < UNLIMITED_V1]
        return min(limits) if limits else None

    def memory_limit_path(self) -> str | None:
        """The file of this cgroup's own memory limit (v2's memory.max, v1's memory.limit_in_bytes)."""
        unified = "" in self.directories
        directory = self.directories.get("" if unified else "memory")
        return os.path.join(directory, "memory.max" if unified else "memory.limit_in_bytes") if directory else None

    def set(self, files: list) -> None:
        """Writes (file, value) pairs; a file named controller.x goes to that controller's hierarchy."""
        if "" in self.directories:
            _enable_controllers(self.directories[""], {name.split(".")[0] for name, _ in files})
        for name, value in files:
            directory = self.directories.get("") or self.directories.get(name.split(".")[0])
            if directory is None:
                raise PyrunvError(f"cgroup: no {name.split('.')[0]} controller on this host for {name}")
            try:
                with open(os.path.join(directory, name), "w") as f:
                    f.write(str(value))
            except OSError as e:
                raise PyrunvError(f"cgroup {directory}: {name} {value}: {e.strerror}") from None

    def add_tree(self, pid: int, cpu_time: bool) -> None:
        """Moves a process and all its descendants (a VM's monitor, QEMU, virtiofsd) into the hierarchies
        that count CPU time (cpu_time) or into the others."""
        for member in _family(pid):
            self.add(member, cpu_time)

    def add(self, pid: int, cpu_time: bool | None = None) -> None:
        """Into every hierarchy, or only those that count CPU time (True) or the others (False). On cgroup v2
        one hierarchy does both: it is the CPU time's."""
        chosen = {directory for controller, directory in self.directories.items()
                  if cpu_time is None or (controller in CPU_TIME or controller == "") == cpu_time}
        for directory in sorted(chosen):
            try:
                with open(os.path.join(directory, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
            except ProcessLookupError:
                return  # it exited meanwhile (a short-lived child of the monitor's)
            except OSError as e:
                raise PyrunvError(f"cannot move process {pid} into cgroup {directory}: {e.strerror}") from None

    def remove(self, timeout: float = 5.0) -> None:
        """Removes the directories pyrunv made, once the processes that were in them are gone."""
        deadline = time.monotonic() + timeout
        for directory in reversed(self.created):
            while True:
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the last exiting processes leave it
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.01)


def _family(pid: int) -> list:
    """pid and its descendants, from /proc's children lists. Not psutil: this is on every engine's `start`,
    where its import would cost some 13 ms."""
    family, queue = [], [pid]
    while queue:
        current = queue.pop()
        family.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue  # gone meanwhile
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    queue += [int(child) for child in f.read().split()]
            except OSError:
                pass
    return family


def _make_dirs(mount: str, relative: str, cpuset: bool) -> list:
    """mkdir -p under the mount; returns the directories it made. A new cpuset gets its parent's CPUs and
    memory nodes, without which no process may enter it."""
    made, path = [], mount
    for part in relative.split("/"):
        parent, path = path, os.path.join(path, part)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            continue
        made.append(path)
        if cpuset:
            for name in ("cpuset.cpus", "cpuset.mems"):
                with open(os.path.join(parent, name)) as src, open(os.path.join(path, name), "w") as dst:
                    dst.write(src.read().strip() or "\n")
    return made


def _enable_controllers(directory: str, controllers: set) -> None:
    """cgroup v2: a controller's files exist in a cgroup only once every ancestor delegates it."""
    parent = os.path.dirname(directory)
    chain = []
    while parent.startswith(ROOT) and parent != os.path.dirname(ROOT):
        chain.append(parent)
        parent = os.path.dirname(parent)
    for ancestor in reversed(chain):
        for controller in controllers:
            with contextlib.suppress(OSError), open(os.path.join(ancestor, "cgroup.subtree_control"), "w") as f:
                f.write(f"+{controller}")
