"""The control socket's ops, one function per verb (`op_<verb>`), each acting on the monitor's Service.

A pod's other containers join the VM through `op_create`; a process in a container starts through
`op_exec`. Both connections stay open until the process exits: the waiter on the other end forwards
signals, and hears the exit status."""
import asyncio
import contextlib
import json
import os
import signal
import socket

from ..errors import PyrunvError
from ..host import mounts
from ..host import network
from ..logs import log
from ..oci import pod
from ..oci import spec as spec_mod
from ..state.store import VM_INIT as INIT_ID
from ..vm import plan as plan_mod
from . import display, forward, saving
from .channel import FLAG, PAIR, F, ProcessIO


async def op_start(service, request, fds, conn):
    ident = service.ident(request)
    # The engine's network is in place by now: CNI and netavark set it up before create, docker in
    # a prestart hook during create. A pod's containers share the VM's network.
    if ident == INIT_ID and service.monitor.tap_name and network.interfaces_to_plumb():
        await service.plumb_network(service.monitor.tap_name)
    await service.channel.request(F.START, ident)
    if ident == INIT_ID and pod.is_sandbox(service.monitor.record.annotations):
        service.executor.submit(spec_mod.schema_validator)  # the pod's containers will come: see op_validate
        service.executor.submit(service.zygote.start)  # and their waiters
        if service.monitor.tap_name:
            service.forwarding = asyncio.get_running_loop().create_task(forward.listen(service))
    return {"ok": True}


async def op_validate(service, request, fds, conn):
    """A pod's container's config.json against the schema, here where the validator stays loaded."""
    await asyncio.get_running_loop().run_in_executor(service.executor, spec_mod.validate, request["document"])
    return {"ok": True}


async def op_signal(service, request, fds, conn):
    ident = service.ident(request)
    sig, everyone = int(request["signal"]), bool(request.get("all"))
    if service.paused:
        if sig != signal.SIGKILL or ident != INIT_ID:
            asyncio.get_running_loop().create_task(service.signal(ident, sig, everyone))
            return {"ok": True}  # delivered when the VM thaws, as a frozen cgroup does
        await service.resume_vm()  # the VM's own container is killed now: with it the VM ends
    await service.channel.request(F.SIGNAL, ident, PAIR.pack(sig, int(everyone)))
    return {"ok": True}


async def op_pause(service, request, fds, conn):
    """The VM's own container freezes the whole VM; a member of the pod, its cgroup in the guest."""
    return await _set_frozen(service, service.ident(request), True)


async def op_resume(service, request, fds, conn):
    return await _set_frozen(service, service.ident(request), False)


async def _set_frozen(service, ident: int, frozen: bool) -> dict:
    if ident != INIT_ID:
        await service.to_agent(F.FREEZE, ident, FLAG.pack(int(frozen)))
    elif frozen:
        await service.pause_vm()
    else:
        await service.resume_vm()
    return {"ok": True}


async def op_ps(service, request, fds, conn):
    text = (await service.channel.request(F.PS, service.ident(request))).decode()
    rows = [line.split(" ", 3) for line in text.splitlines() if line]
    return {"processes": [{"pid": int(p), "ppid": int(pp), "uid": int(u), "cmd": c} for p, pp, u, c in rows]}


async def op_stats(service, request, fds, conn):
    return {"stats": await _stats(service, service.ident(request))}


async def _stats(service, container: int) -> dict:
    if service.channel.closed.done() or service.paused:
        raise PyrunvError("the VM cannot answer")
    text = (await asyncio.wait_for(service.channel.request(F.STATS, container), 10)).decode()
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line)}


async def op_kmsg(service, request, fds, conn):
    """The guest's kernel log to the console log, from its start and as it grows (`pyrunv console`)."""
    if not service.paused:
        await asyncio.wait_for(service.channel.request(F.KMSG), 10)
    return {"ok": True}


async def op_update(service, request, fds, conn):
    """New limits: the container's cgroup in the guest, then the VM's memory (memory.py): exactly what the
    VM's own container needs, or at least what a pod's members do. A frozen VM takes them when it thaws."""
    await service.to_agent(F.UPDATE, service.ident(request), bytes.fromhex(request["records"]))
    if request.get("memory_mib"):
        await service.memory.set(request["memory_mib"])
    elif request.get("grow_mib"):
        await service.memory.at_least(request["grow_mib"])
    return {"ok": True}


async def op_create(service, request, fds, conn):
    """A container of the pod joins this VM: its share entries, then its init, prepared and waiting for
    START. The reply comes at once; the connection then waits for the container's exit."""
    name = request["container"]
    if name == service.monitor.record.id or name in service.members:
        raise PyrunvError(f"container {name} is already in this VM")
    if service.paused:
        raise PyrunvError(f"the VM of pod {service.monitor.record.id} is paused")
    ident = service.new_ident()
    terminal = bool(request.get("terminal"))
    stdio = (fds[0],) * 3 if terminal else tuple(fds[:3])
    trees = fds[1 if terminal else 3:]  # the CLI's copies of the rootfs and binds (mounts.detached_copy)
    names = request["shared"]
    if len(trees) != len(names):
        raise PyrunvError(f"create {name}: {len(trees)} mount trees for {len(names)} share entries")
    if service.forwarding:
        await service.forwarding  # in place before any container of the pod can listen
    service.members[name] = (ident, tuple(names))
    try:
        for tree, entry in zip(trees, names):
            mounts.attach(tree, service.path("share", entry))
        io = ProcessIO(service.channel, ident, stdio, service.executor, tty=terminal)
        records = bytes.fromhex(request["records"])
        service.propagation.expect(ident, records)
        try:
            await service.channel.request(F.CREATE, ident, records)
        except BaseException:
            service.channel.detach(ident)
            raise
    except BaseException:
        _unshare(service, name)
        raise  # _handle closes the fds and tells the waiter
    io.start_relay()
    if not request.get("fork_waiter"):  # the CLI starts the waiter on this connection
        return await _serve_process(service, conn, ident, io, fds, {"ok": True, "ident": ident}, container=True)
    try:
        theirs, pid = await asyncio.get_running_loop().run_in_executor(
            service.executor, service.zygote.fork, request.get("exit_file", ""))
    except OSError as e:
        await service.signal(ident, signal.SIGKILL, True)
        raise PyrunvError(f"create {name}: {e}") from None
    asyncio.get_running_loop().create_task(_serve_waiter(service, theirs, ident, io, fds))
    return {"ok": True, "ident": ident, "pid": pid}


async def _serve_waiter(service, sock: socket.socket, ident: int, io: ProcessIO, fds) -> None:
    """A member's init for as long as it runs, then its exit status to its waiter."""
    sock.setblocking(False)
    reply = await _serve_process(service, sock, ident, io, fds, None, container=True)
    with contextlib.suppress(OSError):
        await asyncio.get_running_loop().sock_sendall(sock, json.dumps(reply).encode() + b"\n")
    sock.close()


async def op_remove(service, request, fds, conn):
    """A member leaves the VM: whatever of it still runs is killed, and its share entries go."""
    name = request["container"]
    if name not in service.members:
        return {"ok": True}
    await service.to_agent(F.REMOVE, service.members[name][0])
    _unshare(service, name)  # in a frozen VM too: the guest's processes keep what they hold
    return {"ok": True}


def _unshare(service, name: str) -> None:
    ident, names = service.members.pop(name)
    service.propagation.forget(ident)
    for entry in reversed(names):
        mounts.unbind(service.path("share", entry))
    with contextlib.suppress(OSError):
        os.rmdir(service.path("share", name))


async def op_shutdown(service, request, fds, conn):
    if not service.shutdown.done():
        service.shutdown.set_result(None)
    return {"ok": True}


async def op_exec(service, request, fds, conn):
    container = service.ident(request)
    process = spec_mod.parse_process(request["process"])
    ident = service.new_ident()
    stdio = (fds[0], fds[0], fds[0]) if process.terminal else tuple(fds)
    io = ProcessIO(service.channel, ident, stdio, service.executor, tty=process.terminal)
    try:
        await service.channel.request(F.EXEC, ident, plan_mod.records(
            plan_mod.process_pairs(process) + [("container", container)]))
    except BaseException:
        service.channel.detach(ident)
        raise  # _handle closes the fds and tells the waiter
    io.start_relay()
    return await _serve_process(service, conn, ident, io, fds, {"ok": True})


async def _serve_process(service, conn: socket.socket, ident: int, io: ProcessIO, fds, first_reply: dict | None,
                         container: bool = False) -> dict:
    """Tells the waiter the process is there (first_reply, unless it knows), relays its signals, and answers
    with the exit status (and for a container's init, how many of its processes the OOM killer took).

    A waiter that goes before its process takes the process with it: nobody on the host stands for it any
    more. containerd kills an exec's waiter when the exec's timeout runs out (a Kubernetes exec probe), and
    then waits for the exec's stdio to close: the process is killed (a container's init with everything in
    its cgroup), and its stdio is let go at once."""
    loop = asyncio.get_running_loop()
    ended = asyncio.ensure_future(io.wait())
    relay = None
    with contextlib.suppress(OSError):
        if first_reply is not None:
            await loop.sock_sendall(conn, json.dumps(first_reply).encode() + b"\n")
        relay = loop.create_task(_waiter_signals(service, conn, ident))
    if relay:
        await asyncio.wait([ended, relay], return_when=asyncio.FIRST_COMPLETED)
        relay.cancel()
    if not ended.done():
        log.info("process %d: its waiter is gone; killing it", ident)
        io.let_go()
        loop.create_task(service.signal(ident, signal.SIGKILL, container))  # in a frozen VM, once it thaws
    code, sig = await ended
    for fd in set(fds):
        os.close(fd)
    return {"exit": code, "signal": sig, **({"oom_kills": io.oom_kills} if container else {})}


async def _waiter_signals(service, conn: socket.socket, ident: int) -> None:
    """The waiter forwards the signals it gets as JSON lines; returns when it is gone."""
    loop = asyncio.get_running_loop()
    buffer = b""
    while True:
        try:
            chunk = await loop.sock_recv(conn, 4096)
        except OSError:
            return
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                loop.create_task(service.signal(ident, int(json.loads(line)["signal"]), False))


OPS = {"start": op_start, "validate": op_validate, "signal": op_signal, "pause": op_pause, "resume": op_resume,
       "ps": op_ps, "stats": op_stats, "kmsg": op_kmsg, "update": op_update, "create": op_create,
       "remove": op_remove, "shutdown": op_shutdown, "exec": op_exec, "checkpoint": saving.op_checkpoint,
       "display_client": display.op_display_client, "display_password": display.op_display_password}
