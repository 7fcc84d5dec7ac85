"""The monitor's own namespaces, and the share directory's bind mounts made in them.

The monitor unshares its mount namespace first, so the share's bind mounts exist only there: when the
monitor and virtiofsd are gone, so are the mounts, even after a SIGKILL. It also enters the network
namespace the spec asks for, so that hooks which plumb "the container's" netns (docker's
libnetwork-setkey reads /proc/PID/ns/net of the state's pid) touch that one, never the host's."""
import ctypes
import os

from .errors import PyrunvError

MS_RDONLY = 0x1
MS_REMOUNT, MS_BIND, MS_REC = 0x20, 0x1000, 0x4000
MS_SLAVE = 1 << 19
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000

_libc = None


def _call(name: str, *args) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), None)


def private_namespace() -> None:
    """A mount namespace of our own that still receives the host's later mounts (slave)."""
    _call("unshare", CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_SLAVE)


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
