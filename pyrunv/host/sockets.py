"""Unix socket paths in state directories, however long those are."""
import contextlib
import os

SUN_PATH_MAX = 107


@contextlib.contextmanager
def socket_path(directory: str, name: str):
    """A path for bind/connect even where directory/name is longer than sun_path allows
    (docker's state directories are): it goes through /proc/self/fd of the opened directory."""
    full = os.path.join(directory, name)
    if len(full.encode()) <= SUN_PATH_MAX:
        yield full
        return
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)
