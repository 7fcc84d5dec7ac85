"""The VM's display: each VNC client that connects to vnc.sock is handed to QEMU's VNC server."""
import asyncio
import socket

from ..errors import PyrunvError
from ..logs import log
from ..vm import migration


async def serve(service, listener: socket.socket) -> None:
    """Each VNC client that connects to vnc.sock goes to QEMU's VNC server over QMP (getfd, add_client)."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    while True:
        conn, _ = await loop.sock_accept(listener)
        with conn:
            try:
                qmp = await service.qmp_client()
                await migration.hand_fd(qmp, conn, "vnc")
                await qmp.execute("add_client", {"protocol": "vnc", "fdname": "vnc", "skipauth": True})
            except Exception as e:  # one client's failure must not end the display for the next
                log.warning("display client: %s", e)


async def op_display_client(service, request, fds, conn):
    """A client of `display --listen`, handed to QEMU's VNC server: asked for the password where one is set."""
    if len(fds) != 1:
        raise PyrunvError("display_client: one socket expected")
    with socket.socket(fileno=fds[0]) as client:
        qmp = await service.qmp_client()
        await migration.hand_fd(qmp, client, "vnc")
        await qmp.execute("add_client", {"protocol": "vnc", "fdname": "vnc", "skipauth": not request.get("auth")})
    return {"ok": True}


async def op_display_password(service, request, fds, conn):
    await (await service.qmp_client()).execute("set_password", {"protocol": "vnc", "password": request["password"]})
    return {"ok": True}
