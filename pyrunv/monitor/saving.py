"""Saving and loading the VM: a saved VM loaded instead of a boot (restore, templates), the first VM of a shape
saved as its template, and `checkpoint` to a file or a stream (vm/snapshot.py has the format)."""
import asyncio
import contextlib
import os
import socket
import struct
import time

from ..errors import PyrunvError
from ..host import network
from ..logs import log
from ..vm import migration, qemu, versions
from ..vm import plan as plan_mod
from .channel import F

RESTORED = struct.Struct("<qI")  # the host's clock for the agent's RESTORED: seconds, nanoseconds; then entropy


async def restore(service, incoming: dict) -> None:
    """A saved VM instead of a boot: QEMU loads the state and the VM runs on from where it was saved.
    A streamed one (fd:) hears "ok" back once it runs here: its source ends only then (vm/snapshot.py)."""
    qmp = await service.qmp_client()
    stream = socket.socket(fileno=service.monitor.incoming_fd) if service.monitor.incoming_fd is not None else None
    try:
        uri = await migration.hand_fd(qmp, stream, "incoming") if stream else incoming["uri"]
        if incoming["mapped_ram"]:  # only the pages that are not zero are loaded
            await migration.load(qmp, uri, migration.MAPPED_RAM)
        else:
            await migration.load(qmp, uri, loaded=lambda: asyncio.get_running_loop().run_in_executor(
                service.executor, _give_back_zeros, service))
        await refresh(service)
        if stream:
            stream.setblocking(False)  # QEMU's channel shared the file's flags
            await asyncio.get_running_loop().sock_sendall(stream, b"ok\n")
    finally:
        if stream:
            stream.close()
    service.channel.ready.set_result("restored")
    # A restore is a create and a start: the new namespace's veth takes over the VM's NIC, as at start.
    if service.monitor.tap_name and network.interfaces_to_plumb():
        await service.plumb_network(service.monitor.tap_name)


async def refresh(service, plugged: bool = False) -> None:
    """A loaded VM runs with the host's time and fresh randomness; if its share was plugged in before it ran,
    it mounts it once the guest's hot-plug has brought it up."""
    now = time.time_ns()
    payload = RESTORED.pack(now // 10**9, now % 10**9) + os.urandom(32)
    restored = asyncio.ensure_future(asyncio.wait_for(service.channel.request(F.RESTORED, None, payload), 10))
    mounted = asyncio.ensure_future(mount_share(service)) if plugged else None  # the agent's next frame
    try:
        await restored
    except PyrunvError as e:  # an agent saved before it knew RESTORED
        log.info("the restored guest kept its clock and randomness: %s", e)
    finally:
        if mounted:
            await mounted


async def save_template(service, template) -> None:
    """This VM, just booted and with no container yet, saved as the template of its shape. A failure
    costs this container only the time it took."""
    qmp = await service.qmp_client()
    await qmp.execute("stop")
    saving = None
    try:
        saving = template.saving()
        if template.plugged:
            await template.save_with_ram(qmp, service.qemu.pid, saving)
        else:
            await save(service, qmp, f"file:{saving}", "template", migration.MAPPED_RAM)
        template.saved(saving)
        log.info("VM saved as template %s", template.path)
    except Exception as e:  # PyrunvError, OSError, or QMP's
        log.warning("VM not saved as template %s: %s", template.path, e)
        if saving:
            with contextlib.suppress(OSError):
                os.unlink(saving)
    finally:
        await qmp.execute("cont")


def _give_back_zeros(service) -> None:
    """QEMU's load of a stream checks every page it is sent as zero by reading it, which allocates it: the
    RAM the guest never had, up to max_memory_mib. What holds only zeros is given back, before the VM runs."""
    from ..vm import guest_ram
    try:
        ram = guest_ram.GuestRam(service.qemu.pid)
        try:
            ram.punch(ram.zero_runs())
        finally:
            ram.close()
    except OSError as e:
        log.warning("restore: the guest RAM the load allocated stays allocated: %s", e)


async def save(service, qmp, uri: str, what: str, capability: str | None) -> None:
    """QEMU saves the stopped VM to uri. The guest RAM its save allocated by reading it is given back."""
    from ..vm import guest_ram  # saves alone need it
    try:
        ram = guest_ram.GuestRam(service.qemu.pid)
        holes = ram.holes()
    except OSError as e:
        log.warning("%s: the guest RAM the save reads stays allocated: %s", what, e)
        ram = None
    with _room_to_read(service, what):
        try:
            await migration.save(qmp, uri, what, capability)
        finally:
            if ram:
                try:
                    ram.punch(holes)
                except OSError as e:
                    log.warning("%s: the guest RAM the save reads stays allocated: %s", what, e)
                ram.close()


@contextlib.contextmanager
def _room_to_read(service, what: str):
    """QEMU's save reads every page of the VM's RAM, and so allocates those the guest never had, up to
    max_memory_mib. While the VM is stopped, the host cgroup's own memory limit makes room for them, and it is
    set back once they are given back. An ancestor's limit (a kubelet's pod) that cannot hold them refuses
    the save, which would otherwise end the VM with the host's OOM killer."""
    from ..host.cgroups import UNLIMITED_V1, HostCgroup
    hidden = (plan_mod.ram_mib(service.plan) - service.plan.memory_mib) * plan_mod.MIB
    cgroup = HostCgroup(**service.monitor.record.cgroup) if service.monitor.record.cgroup else None
    path = cgroup.memory_limit_path() if cgroup and hidden else None
    try:
        with open(path) as f:
            limit = int(f.read())
    except (TypeError, OSError, ValueError):  # no cgroup, nothing hidden, or no limit of its own ("max")
        limit = UNLIMITED_V1
    if limit >= UNLIMITED_V1:
        yield
        return
    room = cgroup.memory_room(above=True)
    if room is not None and room < limit + hidden:
        raise PyrunvError(f"{what}: the save reads all {plan_mod.ram_mib(service.plan)} MiB of the VM's RAM, more "
                          f"than the host cgroup's parents allow ({room >> 20} MiB); lower max_memory_mib")
    with open(path, "w") as f:
        f.write(str(limit + hidden))
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(str(limit))


async def plug_share(service, qmp) -> None:
    """The share of a VM whose template holds none: plugged into its empty PCIe port, then mounted."""
    await qmp.execute("device_add", qemu.share_device(service.plan, plugged=True))
    await mount_share(service)


async def mount_share(service) -> None:
    await service.channel.request(F.SHARE, None, b"")  # the agent waits for the device, within 10 s
    log.debug("share plugged in")


async def op_checkpoint(service, request, fds, conn):
    """Saves the VM to request["path"], or streams it to the socket it was sent (a `restore --listen`):
    stopped first, so that nothing changes while it is written. It then runs on (leave_running), or ends
    as a container killed by SIGKILL would; on failure, or if the restore does not say "ok", it runs on."""
    qmp = await service.qmp_client()
    stream = socket.socket(fileno=fds.pop()) if fds else None
    # In a file, the RAM at fixed offsets: a restore then writes only the pages that are not zero.
    mapped_ram = not stream and versions.qemu_release(service.config.qemu) >= versions.MAPPED_RAM_QEMU
    was_running = not service.paused
    if was_running:
        await service.pause_vm()
    try:
        if stream:
            from ..vm import snapshot
            stream.setblocking(False)
            saved = snapshot.metadata(service.monitor.record.id, plan_mod.to_json(service.plan))
            await asyncio.get_running_loop().sock_sendall(stream, snapshot.stream_header(saved))
            uri = await migration.hand_fd(qmp, stream, "checkpoint")
        else:
            uri = f"file:{request['path']}"
        await save(service, qmp, uri, "checkpoint", migration.MAPPED_RAM if mapped_ram else None)
        if stream:
            await _resumed_at_the_other_end(stream)
    except BaseException:
        if was_running:
            await service.resume_vm()
        raise
    finally:
        if stream:
            stream.close()
    if request.get("leave_running"):
        if was_running:
            await service.resume_vm()
    elif not service.shutdown.done():
        service.shutdown.set_result(None)
    return {"ok": True, "plan": plan_mod.to_json(service.plan), "mapped_ram": mapped_ram}


async def _resumed_at_the_other_end(stream: socket.socket) -> None:
    stream.setblocking(False)  # QEMU's channel shared the file's flags
    try:
        answer = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(stream, 3), migration.TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        answer = b""
    if answer != b"ok\n":
        raise PyrunvError("checkpoint: the restore at the other end did not resume the VM")
