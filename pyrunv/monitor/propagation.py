"""Mount propagation from a container to the host (rshared; Kubernetes' Bidirectional).

A mount made in the guest is the guest kernel's: the host never sees it. The agent reports the
mountinfo of each container that has a shared mount, as it was made and whenever it changes (before the
exit of the process that changed it). A new mount below a shared mount, of a directory that is itself on
the share, is bound here, on the host's copy of the shared mount in the share: that copy is a peer of the
host's mount where the host's mount is shared, so the kernel takes the mount on to the host, exactly as far
as runc's would go. When the guest unmounts it, so does the host. Mounts of anything else (a tmpfs, a
block device's file system) have nothing on the host to bind and stay in the guest.

The guest sees each entry of the share as a file system of its own (virtio-fs submounts), so a guest
mount's device says which entry it is on: the container's records say which entry each of its own mounts
binds, and the first report says which device each has."""
import contextlib
import os
import re
from dataclasses import dataclass

from ..host import mounts
from ..logs import log

SHARE_FSTYPE = "virtiofs"


@dataclass(frozen=True)
class GuestMount:
    device: str       # major:minor
    root: str         # the path within its file system
    mount_point: str  # in the container
    shared: bool
    on_share: bool


def parse(mountinfo: str) -> dict:
    """{mount ID: GuestMount} of a mountinfo text (proc(5))."""
    found = {}
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        with contextlib.suppress(ValueError, IndexError):
            tail = fields.index("-")
            found[int(fields[0])] = GuestMount(
                fields[2], _unescape(fields[3]), _unescape(fields[4]),
                any(tag.startswith("shared:") for tag in fields[6:tail]), fields[tail + 1] == SHARE_FSTYPE)
    return found


def share_entries(records: bytes) -> dict:
    """{destination in the container: entry of the share} of a container's records: its root and binds."""
    entries = {}
    for record in records.decode(errors="surrogateescape").split("\0"):
        key, _, value = record.partition("=")
        if key == "root":
            entries["/"] = value
        elif key == "mount":
            fields = value.split("\t")
            if len(fields) == 6 and fields[2] == "bind":
                entries[fields[4]] = fields[3]
    return entries


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _below(path: str, top: str) -> str | None:
    """path relative to top ("" for top itself), or None if path is not in top's tree."""
    if path == top:
        return ""
    prefix = top.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else None


@dataclass
class _Container:
    entries: dict         # destination -> entry of the share (share_entries)
    made: dict = None     # mount ID -> GuestMount, as the container was made
    devices: dict = None  # device -> (entry, its root there)
    mirrored: dict = None  # mount ID -> host target, or None for one that stays in the guest


class Propagation:
    """The mounts of the VM's containers, mirrored into the share as they come and go."""

    def __init__(self, share_dir: str):
        self.share_dir = share_dir
        self._containers: dict[int, _Container] = {}

    def expect(self, ident: int, records: bytes) -> None:
        """A container is being made from these records."""
        self._containers[ident] = _Container(share_entries(records))

    def forget(self, ident: int) -> None:
        """The container is gone. What it propagated goes with its share entries (ops._unshare): their
        unmount propagates too."""
        self._containers.pop(ident, None)

    def report(self, ident: int, mountinfo: str) -> None:
        container = self._containers.get(ident)
        if container is None:
            return
        now = parse(mountinfo)
        if container.made is None:
            container.made, container.mirrored = now, {}
            container.devices = {m.device: (container.entries[m.mount_point], m.root) for m in now.values()
                                 if m.on_share and m.mount_point in container.entries}
            return
        for mount_id in sorted(set(container.mirrored) - set(now), reverse=True):
            target = container.mirrored.pop(mount_id)
            if target:
                with contextlib.suppress(OSError):
                    mounts.unmount(target)
        for mount_id in sorted(set(now) - set(container.made) - set(container.mirrored)):
            container.mirrored[mount_id] = self._mirror(container, now[mount_id])

    def _host_path(self, container: _Container, mount: GuestMount, rest: str = "") -> str | None:
        """Where the host has what the guest's mount shows (at rest below it), in the share."""
        if mount.device not in container.devices:
            return None
        entry, root = container.devices[mount.device]
        inside = _below(mount.root, root)
        return None if inside is None else os.path.join(self.share_dir, entry, *(part for part in (inside, rest) if part))

    def _mirror(self, container: _Container, new: GuestMount) -> str | None:
        anchors = [(len(m.mount_point), m, rest) for m in container.made.values()
                   if m.shared and (rest := _below(new.mount_point, m.mount_point)) is not None]
        if not anchors:
            return None  # under no shared mount: private to the container
        _, anchor, rest = max(anchors, key=lambda found: found[0])
        target, source = self._host_path(container, anchor, rest), self._host_path(container, new)
        if not (target and source):
            log.info("mount at %s: nothing on the host stands for it; it stays in the guest", new.mount_point)
            return None
        try:
            mounts.mount(source, target, None, mounts.MS_BIND)
        except OSError as e:
            log.warning("mount at %s: cannot propagate it to the host: %s", new.mount_point, e.strerror)
            return None
        return target
