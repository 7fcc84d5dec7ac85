"""Port forwarding: a connection made to the pod's localhost on the host reaches the guest's localhost.

containerd's port-forward (`kubectl port-forward`) dials 127.0.0.1:PORT inside the pod's network
namespace on the host, where the monitor lives and nothing of the VM listens. One listener of the
monitor's takes every such connection, on any port, with nothing set up per port: a nat OUTPUT rule in
that namespace redirects TCP to 127.0.0.1 there, on any port but the listener's own, to the listener, and
SO_ORIGINAL_DST says which port was dialled. The agent connects to that port on the guest's 127.0.0.1
(CONNECT, docs/protocol.md), and the bytes flow like a process's stdio, with the same credit."""
import asyncio
import contextlib
import os
import socket
import struct

from ..errors import PyrunvError
from ..logs import log
from .channel import FLAG, F, ProcessIO
from .child import run_child

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
REDIRECT_TIMEOUT = 10.0


async def listen(service) -> None:
    """Takes the pod's localhost connections from now on; returns once the redirect is in place. Without
    iptables on the host, port forwarding is off and the pod runs as it would."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.setblocking(False)
        port = str(listener.getsockname()[1])
        await run_child(["iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1",
                         "!", "--dport", port, "-j", "REDIRECT", "--to-ports", port], REDIRECT_TIMEOUT,
                        "port forwarding")
    except (PyrunvError, OSError) as e:
        log.warning("port forwarding is off: %s", e)
        listener.close()
        return
    asyncio.get_running_loop().create_task(_accept(service, listener))


async def _accept(service, listener: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with listener:  # for the VM's life: the monitor ends with it
        while True:
            conn, _ = await loop.sock_accept(listener)
            loop.create_task(_relay(service, conn))


async def _relay(service, conn: socket.socket) -> None:
    with conn:
        try:
            port = struct.unpack_from("!2xH", conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))[0]
        except OSError:
            return  # made to the listener's own port: nothing was redirected
        conn.setblocking(True)  # the relay reads and writes it in threads, as it does a process's stdio
        ident = service.new_ident()
        output = os.dup(conn.fileno())
        try:
            io = ProcessIO(service.channel, ident, (conn.fileno(), output, None), service.executor, stderr=False)
            try:
                await service.channel.request(F.CONNECT, ident, FLAG.pack(port))
            except PyrunvError as e:
                service.channel.detach(ident)
                log.info("port forward: %s", e)
                return
            io.start_relay()
            await io.wait()
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # ends the blocked read of what the client sends
            await io.input_done()
        finally:
            os.close(output)
