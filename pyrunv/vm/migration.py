"""QEMU's migration over QMP: a VM saved to a file or a stream, or loaded from one. The monitor's service
saves and restores checkpoints and saves templates with it; the child that starts a VM loads its template
with it (template.load). Each function takes a connected qemu.qmp client."""
import asyncio
import time

from ..errors import PyrunvError

TIMEOUT = 120.0  # saving or loading a VM's RAM to a file
# Capabilities: RAM at fixed offsets in a file (a load writes only what is not zero); RAM left out, for a
# template whose RAM the monitor saves itself (template.py).
MAPPED_RAM, IGNORE_SHARED = "mapped-ram", "x-ignore-shared"


async def hand_fd(qmp, file, name: str) -> str:
    """Gives QEMU a copy of a socket's or file's fd under name; returns the migration URI that names it."""
    qmp.send_fd_scm(file.fileno())
    await qmp.execute("getfd", {"fdname": name})
    return f"fd:{name}"


async def save(qmp, uri: str, what: str, capability: str | None = None) -> None:
    """QEMU saves the stopped VM to uri."""
    if capability:
        await _capability(qmp, capability, True)
    try:
        await qmp.execute("migrate", {"uri": uri})
        await _done(qmp, what)
    finally:
        if capability:
            await _capability(qmp, capability, False)  # the next save may not want it


async def load(qmp, uri: str, capability: str | None = None, plug: dict | None = None, loaded=None) -> None:
    """QEMU, started with -incoming defer, loads a saved VM from uri, which then runs; plug is a device to
    add before it runs (the share of a template that has none), loaded() a coroutine to await before then
    (the VM was saved stopped, so it waits for our `cont`)."""
    if capability:
        await _capability(qmp, capability, True)
    await qmp.execute("migrate-incoming", {"uri": uri})
    await _done(qmp, "restore", loading=True)
    if loaded:
        await loaded()
    if plug:
        await qmp.execute("device_add", plug)
    await qmp.execute("cont")
    if capability:
        await _capability(qmp, capability, False)  # it stays set for this QEMU's own saves otherwise


async def _loaded(qmp) -> bool:
    """QEMU's destination side answers query-migrate with {} both once the load is done and before it has
    begun (a file: or fd: channel starts it only when readable); the VM is still "inmigrate" in the latter."""
    return (await qmp.execute("query-status"))["status"] != "inmigrate"


async def _capability(qmp, name: str, on: bool) -> None:
    await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": name, "state": on}]})


async def _done(qmp, what: str, loading: bool = False) -> None:
    """Waits for QEMU's migration (a save or a load) to end; the user's error if it failed."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        info = await qmp.execute("query-migrate")
        if info.get("status") == "completed" or (loading and not info and await _loaded(qmp)):
            return
        if info.get("status") in ("failed", "cancelled"):
            raise PyrunvError(f"{what}: QEMU: {info.get('error-desc', info['status'])}")
        if time.monotonic() > deadline:
            raise PyrunvError(f"{what}: QEMU's migration did not end within {TIMEOUT:g}s")
        await asyncio.sleep(0.005)
