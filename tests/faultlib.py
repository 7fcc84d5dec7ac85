"""Small helpers shared by the fault, robustness, isolation and fuzz tests (not a test module)."""
import contextlib
import os
import signal
import time

DEADLINE = 30.0  # generous: TCG on 2 cores, with other VM tests running beside us


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


def reap_zombie_children(names=(b"qemu", b"virtiofsd", b"pyrunv", b"python")):
    """As a subreaper we adopt the helpers of a monitor that died: reap those that are zombies now."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1:stat.rindex(b")")]
        fields = stat.rsplit(b")", 1)[1].split()
        if fields[0] == b"Z" and int(fields[1]) == me and comm.startswith(names):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


def process_alive(pid, start_time):
    """True if pid is still the process that had start_time (and not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != b"Z" and int(fields[19]) == start_time


def holders(root):
    """Processes (but this one) with a file or their cwd under root: a monitor no longer names --root
    in its command line, but it keeps its log and control socket open in its state directory."""
    root = str(root)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            links = [os.readlink(f"/proc/{entry}/cwd")]
            for fd in fds:
                with contextlib.suppress(OSError):
                    links.append(os.readlink(f"/proc/{entry}/fd/{fd}"))
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # gone meanwhile
        held = [link for link in links if link == root or link.startswith(root + "/")]
        if held:
            found.append(f"process {entry} ({comm}) holds {held[0]}")
    return found
