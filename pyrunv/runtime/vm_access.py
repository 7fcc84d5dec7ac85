"""The container's VM itself, for people: its QMP monitor, its console and its display.

QEMU listens for QMP on `qmp.sock` in the state directory of the VM's own container (0600, root's); the
monitor keeps a QMP connection of its own. The serial console goes to `console.log` there. A VM with a
display has `vnc.sock` there too: the monitor hands each client that connects to QEMU's VNC server."""
import json
import os
import select
import socket
import sys
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


def display(vm_dir: str, listen: str | None, password_file: str | None, alive) -> None:
    """Prints the VNC socket's path; with listen (HOST:PORT), hands each client of that TCP port to the VM's VNC
    server while alive(): with a password, QEMU asks each for it (VNC authentication). Anywhere but on a
    loopback address a password is required: the port would show the VM's screen to whoever reaches it."""
    _require_root()
    if not os.path.exists(os.path.join(vm_dir, qemu.VNC_SOCKET)):
        raise PyrunvError("the VM has no display (annotation io.pyrunv.vm.display=vnc)")
    if listen is None:
        print(os.path.join(vm_dir, qemu.VNC_SOCKET))
        return
    try:
        host, port = network.host_port(listen)
    except ValueError:
        raise PyrunvError(f"display: cannot listen on {listen!r}: not HOST:PORT") from None
    password = _password(password_file) if password_file else None
    if password is None and not _is_loopback(host):
        raise PyrunvError(f"display: listening on {listen} needs --password-file: the VM's screen would be open "
                          "to anyone who can reach the port (loopback addresses need none)")
    try:
        server = socket.create_server((host, port))
    except OSError as e:
        raise PyrunvError(f"display: cannot listen on {listen!r}: {e.strerror or e}") from None
    from ..monitor import control
    with server:
        if password is not None:
            _display_request(control, vm_dir, {"op": "display_password", "password": password})
        print("%s:%d" % server.getsockname()[:2], flush=True)  # the port chosen, where PORT was 0
        while alive():
            if not select.select([server], [], [], 0.2)[0]:
                continue
            client, _ = server.accept()
            with client:
                try:
                    _display_request(control, vm_dir, {"op": "display_client", "auth": password is not None},
                                     [client.fileno()])
                except (OSError, PyrunvError):
                    continue  # the VM is ending; alive() says so next


def _display_request(control, vm_dir: str, request: dict, fds=()) -> None:
    conn = control.Connection(vm_dir, timeout=10)
    try:
        conn.send(request, fds)
        conn.receive()
    finally:
        conn.close()


def _password(path: str) -> str:
    """The first line of the file: QEMU's VNC authentication uses its first 8 characters."""
    try:
        with open(path) as f:
            password = f.readline().rstrip("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise PyrunvError(f"display: --password-file {path}: {getattr(e, 'strerror', None) or e}") from None
    if not password:
        raise PyrunvError(f"display: --password-file {path}: its first line is empty")
    return password


def _is_loopback(host: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


