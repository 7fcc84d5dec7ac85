"""The monitor's own namespaces, and the share directory's bind mounts made in them.

The monitor unshares its mount namespace first, so the share's bind mounts exist only there: when the
monitor and virtiofsd are gone, so are the mounts, even after a SIGKILL. It also enters the network
namespace the spec asks for, so that hooks which plumb "the container's" netns (docker's
libnetwork-setkey reads /proc/PID/ns/net of the state's pid) touch that one, never the host's."""
import ctypes
import os
import stat

from ..errors import PyrunvError

MS_RDONLY = 0x1
MS_REMOUNT, MS_BIND, MS_REC = 0x20, 0x1000, 0x4000
MS_SLAVE, MS_SHARED = 1 << 19, 1 << 20
MNT_DETACH = 2
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _call(name: str, *args) -> None:
    if getattr(_lib(), name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), None)


def private_namespace() -> None:
    """A mount namespace of our own that still receives the host's later mounts (slave)."""
    _call("unshare", CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_SLAVE)


def shared_directory(path: str) -> None:
    """Makes path a mount of its own whose later submounts propagate to the namespaces copied from this
    one: virtiofsd's sandbox sees a pod's containers arrive in the share while it runs."""
    mount(path, path, None, MS_BIND)
    mount(None, path, None, MS_SHARED)


def network_namespace(path: str | None) -> None:
    """Joins the netns at `path`, or makes a new one when path is empty."""
    try:
        if path:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _call("setns", fd, CLONE_NEWNET)
            finally:
                os.close(fd)
        else:
            _call("unshare", CLONE_NEWNET)
    except OSError as e:
        raise PyrunvError(f"network namespace {path or '(new)'}: {e.strerror}") from None


def bind(source: str, target: str, readonly: bool) -> None:
    """Binds a file or directory at target, creating the mount point; read-only on the host too."""
    try:
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        mount(source, target, None, MS_BIND | MS_REC)
        if readonly:
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    except OSError as e:
        raise PyrunvError(f"cannot share {source} with the VM: {e.strerror}") from None


def unmount(target: str) -> None:
    """Detaches the mount at target: its users keep what they hold."""
    _call("umount2", target.encode(), MNT_DETACH)


def unbind(target: str) -> None:
    """Undoes `bind`: unmounts, and removes the mount point."""
    try:
        unmount(target)
    except OSError:
        pass  # not mounted (a bind that failed half way): the mount point still goes
    try:
        os.rmdir(target) if os.path.isdir(target) else os.unlink(target)
    except OSError:
        pass


# The new mount API (Linux 5.12+): a copy of a mount tree that is in no namespace until it is attached.
# It carries a mount the engine made on the host after the monitor's namespace was copied (containerd
# mounts each container's rootfs at its create) into that namespace, which never receives host mounts
# on hosts whose / is private.
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH, MOUNT_ATTR_RDONLY = 1, 4, 1


def detached_copy(source: str, readonly: bool) -> int:
    """An fd of a copy of the mount tree at source (read-only all through if asked), to `attach` elsewhere."""
    syscall = _lib().syscall
    fd = syscall(SYS_OPEN_TREE, AT_FDCWD, source.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE)
    if fd < 0:
        err = ctypes.get_errno()
        raise PyrunvError(f"cannot share {source} with the VM: {os.strerror(err)}")
    if readonly:
        attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)
        if syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | AT_RECURSIVE, ctypes.byref(attr),
                   ctypes.sizeof(attr)) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise PyrunvError(f"cannot share {source} read-only with the VM: {os.strerror(err)}")
    return fd


def attach(tree: int, target: str) -> None:
    """Attaches a `detached_copy` at target, creating the mount point."""
    try:
        if stat.S_ISDIR(os.fstat(tree).st_mode):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        _call("syscall", SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH)
    except OSError as e:
        raise PyrunvError(f"cannot share {target} with the VM: {e.strerror}") from None
