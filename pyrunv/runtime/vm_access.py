"""The container's VM itself, for people: its QMP monitor, its console and its display.

QEMU listens for QMP on `qmp.sock` in the state directory of the VM's own container (0600, root's); the
monitor keeps a QMP connection of its own. The serial console goes to `console.log` there. A VM with a
display has `vnc.sock` there too: the monitor hands each client that connects to QEMU's VNC server."""
import json
import os
import select
import socket
import sys
import threading
import time

from ..errors import PyrunvError
from ..host import network
from ..host.sockets import socket_path
from ..vm import qemu


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PyrunvError("only root may reach a container's VM")


def qmp(vm_dir: str, command: str | None, arguments: str | None) -> None:
    """One command, its reply printed as JSON; without a command, qemu.qmp's interactive shell."""
    _require_root()
    args = None
    if arguments is not None:
        try:
            args = json.loads(arguments)
        except ValueError as e:
            raise PyrunvError(f"qmp: arguments are not JSON: {e}") from None
        if not isinstance(args, dict):
            raise PyrunvError("qmp: arguments must be a JSON object")
    from qemu.qmp.legacy import QEMUMonitorProtocol
    from qemu.qmp.qmp_shell import QMPShell
    with socket_path(vm_dir, qemu.QMP_SOCKET) as path:
        if command is None:
            with QMPShell(path, pretty=True) as shell:
                _connect(shell)
                for _ in shell.repl():
                    pass
            return
        with QEMUMonitorProtocol(path) as client:
            _connect(client)
            reply = client.cmd_raw(command, args)
    if "error" in reply:
        raise PyrunvError(f"qmp: {command}: {reply['error'].get('desc', reply['error'])}")
    print(json.dumps(reply.get("return"), indent=2))


def _connect(client) -> None:
    try:
        client.connect()
    except Exception as e:  # qemu.qmp's ConnectError and friends, with QEMU gone or busy with another client
        raise PyrunvError(f"qmp: cannot connect to the VM's QMP: {e}") from None


def console(vm_dir: str, follow: bool, alive) -> None:
    """Prints console.log from its start; with follow, goes on while alive() says the VM runs."""
    _require_root()
    try:
        f = open(os.path.join(vm_dir, "console.log"), "rb")
    except FileNotFoundError:
        raise PyrunvError("the VM has no console log") from None
    with f:
        while True:
            chunk = f.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                continue
            if not follow or not alive():
                return
            time.sleep(0.2)


def display(vm_dir: str, listen: str | None, alive) -> None:
    """Prints the VNC socket's path; with listen (HOST:PORT), relays that TCP port to it while alive()."""
    _require_root()
    if not os.path.exists(os.path.join(vm_dir, qemu.VNC_SOCKET)):
        raise PyrunvError("the VM has no display (annotation io.pyrunv.vm.display=vnc)")
    if listen is None:
        print(os.path.join(vm_dir, qemu.VNC_SOCKET))
        return
    try:
        server = socket.create_server(network.host_port(listen))
    except (ValueError, OSError) as e:
        raise PyrunvError(f"display: cannot listen on {listen!r}: {getattr(e, 'strerror', None) or e}") from None
    with server:
        print("%s:%d" % server.getsockname()[:2], flush=True)  # the port chosen, where PORT was 0
        while alive():
            if not select.select([server], [], [], 0.2)[0]:
                continue
            client, _ = server.accept()
            vnc = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with socket_path(vm_dir, qemu.VNC_SOCKET) as path:
                    vnc.connect(path)
            except OSError:
                client.close()
                vnc.close()
                continue  # the VM is ending; alive() says so next
            for source, sink in ((client, vnc), (vnc, client)):
                threading.Thread(target=_copy, args=(source, sink), daemon=True).start()


def _copy(source: socket.socket, sink: socket.socket) -> None:
    """One direction of a relayed connection; its end ends the other direction's writes."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
