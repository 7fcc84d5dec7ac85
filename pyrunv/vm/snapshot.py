"""Checkpoint and restore: a container's whole VM saved to a directory and resumed from it. QEMU saves
the RAM and the devices (QMP `migrate` to a file), the Rust virtiofsd the open files of the share
(`--migration-mode=find-paths`); no CRIU, and none of its limits. QEMU >= 8.2 and virtiofsd >= 1.11 can
(versions.checkpoint_refusal); elsewhere both verbs refuse in one line and change nothing.

The same state goes to another host over TCP (`checkpoint --page-server`, `restore --listen`): a header with
the metadata, then QEMU's migration stream; the restoring side answers "ok" once its VM runs, and only then
does the source end.

Here: the format, and where a restore's VM comes from. The saving side is the monitor's (monitor/saving.py),
asked by `checkpoint` (runtime/checkpoint.py)."""
import dataclasses
import json
import os
import socket
import struct
import sys

from ..errors import PyrunvError
from ..host import network
from . import plan as plan_mod
from .plan import VmPlan

METADATA = "pyrunv-checkpoint.json"
STATE = "vm.state"
PODMAN_PROBE = "inventory.img"  # CRIU's file, whose presence podman checks before it calls restore
FORMAT = "pyrunv-checkpoint/1"
STREAM_MAGIC = b"PYRUNVCK"
HEADER = struct.Struct("!8sI")  # the magic, then the length of the metadata's JSON
MAX_METADATA = 4 << 20  # a plan with docker's seccomp profile is about 30 KB: a peer may not make us hold GiBs
CONNECT_TIMEOUT = 30.0  # the restoring side may be started a little after the checkpoint
LISTEN_TIMEOUT = 300.0  # a restore waits this long for its checkpoint to arrive


def refuse_without_support(what: str, config) -> None:
    from . import versions
    refusal = versions.checkpoint_refusal(config)
    if refusal:
        raise PyrunvError(f"cannot {what}: {refusal}")


def metadata(container_id: str, plan_json: dict, mapped_ram: bool = False) -> dict:
    """mapped_ram: QEMU's capability of that name was on for the save; the load needs it on as well."""
    return {"format": FORMAT, "id": container_id, "plan": plan_json, "mapped_ram": mapped_ram}


def stream_header(saved: dict) -> bytes:
    """What the monitor sends before QEMU's stream: the metadata a file checkpoint keeps beside it."""
    data = json.dumps(saved).encode()
    return HEADER.pack(STREAM_MAGIC, len(data)) + data


def host_port(address: str, what: str) -> tuple:
    try:
        return network.host_port(address)
    except ValueError:
        raise PyrunvError(f"{what}: {address!r} is not HOST:PORT") from None


@dataclasses.dataclass
class Source:
    """Where a restore's VM comes from: a checkpoint's directory, or a stream that comes to `listen`."""
    image_path: str | None = None
    listen: str | None = None

    def open(self, container_id: str, fresh: VmPlan, config) -> tuple:
        """(the saved VM's plan, its incoming: QEMU's URI and whether the save used mapped-ram, the socket the
        monitor must inherit for it, or None)"""
        if self.listen:
            plan, stream = receive(self.listen, container_id, fresh, config)
            return plan, {"uri": f"fd:{stream.fileno()}", "mapped_ram": False}, stream
        plan, state_file, mapped_ram = load(self.image_path, container_id, fresh, config)
        return plan, {"uri": f"file:{state_file}", "mapped_ram": mapped_ram}, None


def receive(address: str, container_id: str, fresh: VmPlan, config) -> tuple:
    """(the plan, the connected socket whose rest is QEMU's stream) of a checkpoint that comes to address."""
    what = f"restore {container_id}"
    refuse_without_support(what, config)
    try:
        server = socket.create_server(host_port(address, what))
    except OSError as e:
        raise PyrunvError(f"{what}: cannot listen on {address!r}: {e.strerror or e}") from None
    with server:
        if address.endswith(":0"):  # the port chosen, for the checkpoint's --page-server
            print("pyrunv: %s: listening on %s:%d" % ((what,) + server.getsockname()[:2]), file=sys.stderr,
                  flush=True)
        server.settimeout(LISTEN_TIMEOUT)
        try:
            stream, peer = server.accept()
        except socket.timeout:
            raise PyrunvError(f"{what}: no checkpoint came to {address} within {LISTEN_TIMEOUT:g}s") from None
    try:
        stream.settimeout(CONNECT_TIMEOUT)
        plan = from_stream(stream, f"what {peer[0]} sent", container_id, fresh)
        stream.settimeout(None)
        return plan, stream
    except BaseException:
        stream.close()
        raise


def from_stream(stream: socket.socket, source: str, container_id: str, fresh: VmPlan) -> VmPlan:
    """The saved plan in the metadata a stream begins with (stream_header), shaped like fresh; the user's error
    if it holds none."""
    try:
        head = stream.recv(HEADER.size, socket.MSG_WAITALL)
        magic, length = HEADER.unpack(head) if len(head) == HEADER.size else (None, 0)
        if magic != STREAM_MAGIC or length > MAX_METADATA:
            raise ValueError
        data = stream.recv(length, socket.MSG_WAITALL)
        if len(data) != length:
            raise ValueError
        saved = json.loads(data)
    except (OSError, ValueError, RecursionError):
        raise PyrunvError(f"{source} is not a pyrunv checkpoint") from None
    return _shaped_like(saved, source, container_id, fresh)


def load(image_path: str, container_id: str, fresh: VmPlan, config) -> tuple:
    """(the saved VM's plan with this bundle's share and network, its state file, whether it was saved with
    mapped-ram) of image_path."""
    image_path = os.path.abspath(image_path)
    try:
        with open(os.path.join(image_path, METADATA)) as f:
            saved = json.load(f)
        if not os.path.isfile(os.path.join(image_path, STATE)):
            raise ValueError
    except (OSError, ValueError, RecursionError):
        raise PyrunvError(f"{image_path} is not a pyrunv checkpoint") from None
    refuse_without_support(f"restore {container_id}", config)
    return (_shaped_like(saved, image_path, container_id, fresh), os.path.join(image_path, STATE),
            saved.get("mapped_ram") is True)


def _shaped_like(saved, source: str, container_id: str, fresh: VmPlan) -> VmPlan:
    """The saved plan with this bundle's share and network; refused unless the bundle has its shape."""
    try:
        if saved.get("format") != FORMAT:
            raise ValueError
        plan = plan_mod.from_json(saved["plan"])
    except (AttributeError, ValueError, KeyError, TypeError):
        raise PyrunvError(f"{source} is not a pyrunv checkpoint") from None
    if ([s.name for s in plan.shared] != [s.name for s in fresh.shared] or len(plan.disks) != len(fresh.disks)
            or (plan.network_namespace is None) != (fresh.network_namespace is None)):
        raise PyrunvError(f"cannot restore {container_id}: the bundle's mounts, devices or network are not "
                          "those of the checkpoint's container")
    # The files and the network are this bundle's: the same paths, maybe in another place or on another host.
    return dataclasses.replace(plan, shared=fresh.shared, disks=fresh.disks, network_namespace=fresh.network_namespace)
