"""The state store: one 0700 directory per container under --root, an atomic state.json, a lock per container."""
import errno
import fcntl
import os
import time

from .. import jsonlite
from ..errors import PyrunvError
from .lifecycle import Status

DEFAULT_ROOT = "/run/pyrunv"
STATE_FILE = "state.json"
EXIT_FILE = "exit"  # written by the monitor once the container's init has exited
VM_INIT = 1  # the id in the VM of the init of the VM's own container (the sandbox's, in a pod)


class Record:
    """A container's state.json. Not a dataclass: `state` is the verb engines call most, and the dataclasses
    module alone costs it some 15 ms of imports."""
    # Every field after the first four, with its default (a type: a new empty one each time).
    DEFAULTS = {
        "pid": 0,           # the monitor: what --pid-file names and engines wait for
        "pid_start": 0,     # its start time, so that a reused pid is not taken for it
        "created": "",
        "owner": "",
        "annotations": dict,
        "accel": "",
        # The hooks that run after create, kept from the config.json validated then: like runc, start and
        # delete neither read the bundle again nor pay for validating it.
        "hooks": dict,
        # A container of a pod runs in its sandbox's VM: `sandbox` is that container's ID ("" for a container
        # with a VM of its own). `ident` is its init's id in the VM (docs/protocol.md), 0 until it has one.
        "sandbox": "",
        "ident": 0,
        # The host cgroup: each hierarchy's directory, and those pyrunv created (removed by delete).
        "cgroup": dict,
        "resources": dict,  # the limits in force (resources.Resources)
        "memory_mib": 0,    # the VM's RAM at boot, for a container that owns its VM
        "max_memory_mib": 0,  # the most `update` may grow it to
        "vcpus": 0,         # its vCPUs online at boot, and those `update` may bring online
        "max_vcpus": 0,
    }

    def __init__(self, id: str, bundle: str, rootfs: str, status: str, **fields):
        unknown = fields.keys() - self.DEFAULTS.keys()
        if unknown:
            raise TypeError(f"Record has no field {sorted(unknown)[0]!r}")
        self.id, self.bundle, self.rootfs, self.status = id, bundle, rootfs, status
        for name, default in self.DEFAULTS.items():
            setattr(self, name, fields[name] if name in fields else default() if isinstance(default, type) else default)

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in ("id", "bundle", "rootfs", "status", *self.DEFAULTS)}

    def __eq__(self, other) -> bool:
        return isinstance(other, Record) and self.to_json() == other.to_json()

    def oci_state(self, status: Status) -> dict:
        state = {"ociVersion": "1.0.2", "id": self.id, "status": status.value,
                 "pid": self.pid if status is not Status.STOPPED else 0,
                 "bundle": self.bundle, "rootfs": self.rootfs, "created": self.created,
                 "owner": self.owner}
        if self.annotations:
            state["annotations"] = self.annotations
        return state


def process_start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot, 0 if it does not exist (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0
    return 0 if fields[0] == b"Z" else int(fields[19])


def valid_id(name: str) -> bool:
    """runc's rule, ^[\\w+\\-.]+$ (\\w: what str.isalnum() takes, and '_'): with no '/', no ID names a path
    outside --root."""
    return (0 < len(name) <= 1024 and name not in (".", "..")
            and all(c.isalnum() or c in "_+-." for c in name))


def validate_id(container_id: str) -> str:
    if not valid_id(container_id):
        raise PyrunvError(f"invalid container id format: {container_id!r}")
    return container_id


class Held:
    """A locked state directory, as a `with` block holds it: its fd closes, and the lock goes, at the end.
    A class, not contextlib's decorator: `state` does not import contextlib."""
    def __init__(self, fd: int, value=None):
        self.fd, self.value = fd, value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


class Store:
    def __init__(self, root: str = DEFAULT_ROOT):
        self.root = os.path.abspath(root)

    def path(self, container_id: str, *parts: str) -> str:
        return os.path.join(self.root, validate_id(container_id), *parts)

    def ensure_root(self) -> None:
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        except OSError as e:
            raise PyrunvError(f"cannot create root directory {self.root}: {e.strerror}") from None

    def create(self, record: Record) -> "Held":
        """Claims record.id and holds its lock, with the first state.json already in place: the directory
        is made under a hidden name, locked, filled and renamed into place. Of two creates of one ID
        exactly one wins, and no other command ever sees the directory without its state or its lock."""
        self.ensure_root()
        path = self.path(record.id)
        cradle = os.path.join(self.root, f".creating:{record.id}:{os.getpid()}")
        try:
            os.mkdir(cradle, 0o700)
        except OSError as e:
            raise PyrunvError(f"cannot create state directory {path}: {e.strerror}") from None
        fd = os.open(cradle, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the lock is on the directory itself: it moves with it
            try:
                self._write(cradle, record)
                try:
                    os.rename(cradle, path)  # refused if a container's (never empty) directory is there
                except OSError as e:
                    taken = e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR)
                    raise PyrunvError(f"container with id exists: {record.id}" if taken
                                      else f"cannot create state directory {path}: {e.strerror}") from None
            except BaseException:
                import shutil
                shutil.rmtree(cradle, ignore_errors=True)
                raise
        except BaseException:
            os.close(fd)
            raise
        return Held(fd, path)

    def exists(self, container_id: str) -> bool:
        return os.path.isfile(self.path(container_id, STATE_FILE))

    def load(self, container_id: str) -> Record:
        try:
            with open(self.path(container_id, STATE_FILE)) as f:
                return Record(**jsonlite.loads(f.read()))
        except FileNotFoundError:
            raise PyrunvError(f"container {container_id} does not exist") from None
        except (ValueError, TypeError):
            raise PyrunvError(f"container {container_id}: state file is corrupt") from None

    def save(self, record: Record) -> None:
        self._write(self.path(record.id), record)

    @staticmethod
    def _write(directory: str, record: Record) -> None:
        path = os.path.join(directory, STATE_FILE)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(jsonlite.dumps(record.to_json()))
            os.rename(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise PyrunvError(f"cannot write state of {record.id}: {e.strerror}") from None

    def status(self, record: Record) -> Status:
        """What is really alive decides: a dead monitor or an exited init means stopped."""
        recorded = Status(record.status)
        if recorded is Status.CREATING:
            return recorded
        # A start time of 0 was recorded for a monitor that was already dead (or a zombie) then.
        if (not record.pid or not record.pid_start or process_start_time(record.pid) != record.pid_start
                or os.path.exists(self.path(record.id, EXIT_FILE))):
            return Status.STOPPED
        return recorded

    def lock(self, container_id: str, timeout: float = 60.0) -> "Held":
        """Serialises commands on one container. Fails clearly if the holder does not let go in time."""
        path = self.path(container_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PyrunvError(f"container {container_id} does not exist") from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise PyrunvError(f"container {container_id} is busy: another pyrunv command holds its lock") from None
                    time.sleep(0.02)
            # A delete that held the lock before us may have removed the directory.
            if os.fstat(fd).st_nlink == 0:
                raise PyrunvError(f"container {container_id} does not exist")
        except BaseException:
            os.close(fd)
            raise
        return Held(fd)

    def remove(self, container_id: str) -> None:
        path = self.path(container_id)
        # Rename first so that the ID is free and no reader sees a half-removed directory. The ':' is
        # outside the ID alphabet, so a grave never collides with, nor is listed as, a container.
        grave = os.path.join(self.root, f".deleted:{container_id}:{os.getpid()}")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return
        import shutil
        shutil.rmtree(grave, ignore_errors=True)

    def records(self):
        """Every container's record, in ID order; one deleted meanwhile is passed over."""
        for container_id in self.ids():
            try:
                yield self.load(container_id)
            except PyrunvError:
                continue

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if valid_id(n) and os.path.isfile(os.path.join(self.root, n, STATE_FILE)))
