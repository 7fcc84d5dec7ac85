"""`checkpoint`: the monitor saves its VM to a directory, or streams it to a `restore --listen` on another
host (vm/snapshot.py has the format and the restoring side)."""
import json
import os
import socket
import time

from ..errors import PyrunvError
from ..monitor import control
from ..vm import snapshot


def save(container, image_path: str | None, leave_running: bool, config, page_server: str | None = None) -> None:
    """The VM of `container` (a Container that owns its VM) into image_path, or streamed to the
    `restore --listen` at page_server (HOST:PORT)."""
    snapshot.refuse_without_support(f"checkpoint {container.id}", config)
    if page_server:
        with _connect(page_server, f"checkpoint {container.id}") as stream:
            control.call(container.vm_dir, "checkpoint", timeout=2 * 120 + 30, fds=[stream.fileno()],
                         leave_running=leave_running)
        return
    image_path = os.path.abspath(image_path)
    try:
        os.makedirs(image_path, exist_ok=True)
    except OSError as e:
        raise PyrunvError(f"cannot checkpoint {container.id}: {image_path}: {e.strerror}") from None
    reply = control.call(container.vm_dir, "checkpoint", timeout=180, path=os.path.join(image_path, snapshot.STATE),
                         leave_running=leave_running)
    with open(os.path.join(image_path, snapshot.METADATA), "w") as f:
        json.dump(snapshot.metadata(container.id, reply["plan"], reply.get("mapped_ram", False)), f)
    open(os.path.join(image_path, snapshot.PODMAN_PROBE), "w").close()


def _connect(address: str, what: str) -> socket.socket:
    deadline = time.monotonic() + snapshot.CONNECT_TIMEOUT
    while True:
        try:
            return socket.create_connection(snapshot.host_port(address, what), timeout=snapshot.CONNECT_TIMEOUT)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise PyrunvError(f"{what}: nothing listens on {address} (pyrunv restore --listen)") from None
            time.sleep(0.1)
        except OSError as e:
            raise PyrunvError(f"{what}: cannot connect to {address}: {e.strerror or e}") from None
