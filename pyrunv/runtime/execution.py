"""`exec`: the process description, and the waiter that stands for the process on the host.

The waiter hands its stdio (or a pty slave) to the monitor over the control socket, forwards the
signals it receives, and exits with the process's status."""
import contextlib
import os

from ..errors import PyrunvError
from ..host.terminal import open_console, raw_terminal
from ..monitor import control
from ..oci import spec as spec_mod
from ..state import store as state
from ..host import waiter


def build_process(record: state.Record, process_file, command, *, cwd, env, tty, user, additional_gids,
                  no_new_privs, caps) -> dict:
    """As runc does: --process, or the container's own process with the given args and overrides."""
    if process_file:
        process = spec_mod.read_json(process_file, "process.json")
    else:
        if not command:
            raise PyrunvError("exec: no command given: pass args or --process")
        config = spec_mod.read_json(os.path.join(record.bundle, "config.json"), "config.json")
        process = dict(config.get("process", {}), args=list(command), terminal=tty)
        overrides = {e.split("=", 1)[0] for e in env}
        process["env"] = [e for e in process.get("env", []) if e.split("=", 1)[0] not in overrides] + list(env)
        if cwd:
            process["cwd"] = cwd
        if user:
            uid, _, gid = user.partition(":")
            try:
                process["user"] = dict(process.get("user", {}), uid=int(uid), gid=int(gid or 0))
            except ValueError:
                raise PyrunvError(f"exec: invalid --user {user!r}: expected UID[:GID]") from None
        if additional_gids:
            process.setdefault("user", {})["additionalGids"] = list(additional_gids)
        if no_new_privs:
            process["noNewPrivileges"] = True
        if caps and "capabilities" in process:  # without capabilities the process keeps them all
            process["capabilities"] = {k: sorted(set(process["capabilities"].get(k, [])) | set(caps))
                                       for k in spec_mod.CAP_SETS}
    if not isinstance(process, dict):
        raise PyrunvError("invalid process.json: not an object")
    spec_mod.validate({"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": process}, "process")
    if not process.get("args"):
        raise PyrunvError("invalid process: args must not be empty")
    spec_mod.parse_process(process)
    return process


def stdio(terminal: bool, console_socket, console_size, detach: bool, what: str = "exec --tty") -> list:
    """The fds a guest process's stdio is relayed to: ours, or a pty slave (its master goes to the
    console socket, or it is the person's own terminal, as `run` uses it)."""
    if not terminal:
        return [0, 1, 2]
    if console_socket:
        return [open_console(console_socket, console_size)]
    if detach or not os.isatty(0):
        raise PyrunvError(f"{what} needs --console-socket, or a terminal on stdin without --detach")
    return [os.dup(0)]


def run(state_dir: str, container: str, process: dict, console_socket, detach: bool, pid_file) -> int:
    """Runs the process in the container; in the foreground, returns its exit code (128+N for a signal,
    as `runc exec` does), else starts its waiter."""
    size = process.get("consoleSize")
    fds = stdio(bool(process.get("terminal")), console_socket,
                (size["height"], size["width"]) if size else None, detach)
    conn = control.Connection(state_dir, timeout=60)
    conn.send({"op": "exec", "container": container, "process": process}, fds)
    conn.receive()  # raises the agent's error, e.g. an executable that is not there
    if process.get("terminal"):
        os.close(fds[0])
    if detach:
        write_pid_file(pid_file, start_waiter(conn))
        return 0
    write_pid_file(pid_file, os.getpid())
    conn.sock.settimeout(None)  # from here on we wait as long as the process runs
    own_terminal = process.get("terminal") and not console_socket
    with raw_terminal(0) if own_terminal else contextlib.nullcontext():
        # 128+N for a signal: the foreground never dies of the process's signal itself
        return waiter.wait(conn.sock, conn.pending())["exit"]


def start_waiter(conn: control.Connection, exit_file: str = "") -> int:
    """Starts the waiter (host/waiter.py) on the connection, detached from the CLI; returns its pid. For a
    container's init it writes the exit status to exit_file before it exits."""
    fd = conn.sock.fileno()
    argv = waiter.exec_argv(fd, exit_file, conn.pending())
    pid = os.fork()
    if pid:
        conn.close()
        return pid
    try:
        os.setsid()
        os.closerange(3, fd)  # nothing of the CLI's, such as a container's lock, may outlive it
        os.closerange(fd + 1, 1 << 16)
        os.set_inheritable(fd, True)
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)  # the monitor has the real ones: the engine's pipes close with the process
        os.execv(argv[0], argv)
    finally:
        os._exit(127)


def write_pid_file(path: str | None, pid: int) -> None:
    if not path:
        return
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(str(pid))
        os.rename(tmp, path)
    except OSError as e:
        raise PyrunvError(f"cannot write pid file {path}: {e.strerror}") from None
