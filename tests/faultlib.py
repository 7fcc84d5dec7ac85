"""Small helpers shared by the fault, robustness, isolation and fuzz tests (not a test module)."""
import contextlib
import os
import select
import signal
import socket
import time

import psutil

DEADLINE = 30.0  # generous: TCG on 2 cores, with other VM tests running beside us

# What test_faults.py's SIGKILL of one piece found: (component, state) -> (waiter status, state after).
# A report, not a test: conftest.py prints it with the session's summary.
COMPONENTS = ("qemu", "virtiofsd", "monitor")
STATES = ("created", "running", "paused")
FAULT_MATRIX = {}


def fault_matrix_lines() -> list:
    """The fault matrix as a table, component by state; empty if no SIGKILL test ran."""
    if not FAULT_MATRIX:
        return []
    lines = [f"{'':<10}" + "".join(f"{s:<20}" for s in STATES)]
    for component in COMPONENTS:
        cells = [" / ".join(FAULT_MATRIX[(component, s)]) if (component, s) in FAULT_MATRIX else "-" for s in STATES]
        lines.append(f"{component:<10}" + "".join(f"{c:<20}" for c in cells))
    return lines


def wait_until(predicate, timeout=DEADLINE, interval=0.05):
    """Polls predicate() until it is true or the deadline passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_pid(pid, timeout=DEADLINE):
    """waitpid() with a deadline: the raw status, or AssertionError if the child is still alive."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not exit within {timeout:g}s")
        time.sleep(0.02)


def describe_status(status):
    """'SIGKILL' for death by signal 9, 'exit N' for an exit code."""
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit {os.WEXITSTATUS(status)}"


def one_line_error(result):
    """Asserts a clean failure of the CLI: non-zero, one 'pyrunv: ...' line on stderr, no traceback."""
    err = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else result.stderr
    assert result.returncode != 0, f"expected a failure, got 0: {err!r}"
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n") and err.startswith("pyrunv: "), repr(err)
    return err.strip()


def reap_zombie_children(names=("qemu", "virtiofsd", "pyrunv", "python")):
    """As a subreaper we adopt the helpers of a monitor that died: reap those that are zombies now."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess, ChildProcessError):
            if child.status() == psutil.STATUS_ZOMBIE and child.name().startswith(names):
                os.waitpid(child.pid, os.WNOHANG)


def process_alive(pid, start_time):
    """True if pid is still the process that had start_time (clock ticks since boot) and not a zombie."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            ticks = round((proc.create_time() - psutil.boot_time()) * os.sysconf("SC_CLK_TCK"))
            return proc.status() != psutil.STATUS_ZOMBIE and ticks == start_time
    except psutil.NoSuchProcess:
        return False


def fd_targets(pid):
    """Where the process's open fds point. By hand: psutil's open_files() lists only regular files that still
    exist, and a directory or a deleted file held under a state directory is a leftover too."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def holders(root):
    """Processes (but this one) with a file or their cwd under root: a monitor no longer names --root
    in its command line, but it keeps its log and control socket open in its state directory."""
    root = str(root)
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            links = [proc.cwd(), *fd_targets(proc.pid)]
            comm = proc.name()
        except (OSError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # gone meanwhile
        held = [link for link in links if link == root or link.startswith(root + "/")]
        if held:
            found.append(f"process {proc.pid} ({comm}) holds {held[0]}")
    return found


class ConsoleSocket:
    """The receiving end of --console-socket, as conmon and the containerd shim have it."""

    def __init__(self, path):
        self.path = str(path)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(1)
        self.server.settimeout(60)

    def master(self):
        conn, _ = self.server.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
        return fds[0]


def reaches_eof(fd, timeout=DEADLINE) -> bool:
    """Whether every writer of the pipe fd closes it within timeout (what is read before that is dropped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0] and not os.read(fd, 65536):
            return True
    return False


def read_until(fd, marker, timeout=30):
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out
