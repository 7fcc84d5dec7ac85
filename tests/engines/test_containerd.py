"""containerd (ctr, the runc v2 shim with --runc-binary) driving pyrunv: run, exit codes, stdin, tty, exec,
signals in place of stop, kill, pause, forced delete.

ctr has no stop, logs or wait verbs: a container whose output or exit status matters runs under a `ctr run`
in the background, and its output and exit status are that process's."""
import os
import select
import subprocess
import time

import pytest

from conftest import IMAGE, TRAP_TERM, TRAP_USR1, TTY_AND_SIZE, tty_run, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.vm]


@pytest.fixture
def cid(containerd, name):
    """The test's container ID; its task and the container are deleted afterwards, whatever happened."""
    yield name
    containerd("tasks", "delete", "--force", name)  # kills a task that still runs
    containerd("containers", "delete", name)


@pytest.fixture
def background(containerd, cid):
    """Starts `ctr run ... IMAGE cid COMMAND` in the background; afterwards the task is killed and ctr reaped."""
    procs = []

    def start(*command):
        proc = subprocess.Popen(containerd.argv("run", "--rm", *containerd.runtime_flags, IMAGE, cid, *command),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.seen = b""
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            containerd("tasks", "kill", "--signal", "SIGKILL", cid)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def run(containerd, cid, *command, input=None):
    return containerd("run", "--rm", *containerd.runtime_flags, IMAGE, cid, *command, input=input)


def run_detached(containerd, cid, *command):
    containerd("run", "--detach", *containerd.runtime_flags, IMAGE, cid, *command, check=True)


def status(containerd, cid):
    """The task's status in `ctr tasks ls` (RUNNING, PAUSED, STOPPED), or None if there is no task."""
    for line in containerd("tasks", "ls", check=True).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return None


def containers(containerd):
    return containerd("containers", "ls", "--quiet", check=True).stdout.split()


def read_until(proc, text, timeout=60):
    """Reads the background ctr's stdout until `text` has appeared in it; returns everything read so far."""
    deadline = time.monotonic() + timeout
    while text.encode() not in proc.seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        proc.seen += chunk
    return proc.seen.decode()


def started(containerd, cid, proc):
    return wait_for(lambda: status(containerd, cid) == "RUNNING" or proc.poll() is not None, timeout=120) \
        and proc.poll() is None


def test_run_rm_echo(containerd, cid):
    result = run(containerd, cid, "echo", "hello")
    assert (result.returncode, result.stdout) == (0, "hello\n"), result.stderr
    assert cid not in containers(containerd)
    assert status(containerd, cid) is None


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code(containerd, cid, code):
    result = run(containerd, cid, "sh", "-c", f"exit {code}")
    assert (result.returncode, result.stdout) == (code, ""), result.stderr


def test_sigkill_exit_137(containerd, cid, background):
    proc = background("sleep", "600")
    assert started(containerd, cid, proc), proc.stderr.read()
    containerd("tasks", "kill", "--signal", "SIGKILL", cid, check=True)
    assert proc.wait(60) == 137


def test_piped_stdin(containerd, cid):
    # ctr does not pass stdin's EOF on (not with runc either), so the container reads one line only.
    result = run(containerd, cid, "sh", "-c", "read x; echo got $x", input="piped\n")
    assert (result.returncode, result.stdout) == (0, "got piped\n"), result.stderr


def test_tty(containerd, cid):
    argv = containerd.argv("run", "--rm", "--tty", *containerd.runtime_flags, IMAGE, cid, "sh", "-c", TTY_AND_SIZE)
    output, code = tty_run(argv)
    assert code == 0, output
    assert "/dev/pts/0\n" in output and "33 111\n" in output, output


def test_exec(containerd, cid):
    run_detached(containerd, cid, "sleep", "600")
    result = containerd("tasks", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo exec-ok; exit 4")
    assert (result.returncode, result.stdout) == (4, "exec-ok\n"), result.stderr
    output, code = tty_run(containerd.argv("tasks", "exec", "--tty", "--exec-id", "e2", cid, "tty"))
    assert code == 0 and "/dev/pts/" in output, output


def test_sigterm_trapped(containerd, cid, background):
    proc = background("sh", "-c", TRAP_TERM)
    assert "ready" in read_until(proc, "ready"), proc.seen
    began = time.monotonic()
    containerd("tasks", "kill", cid, check=True)  # SIGTERM
    assert proc.wait(60) == 0
    assert time.monotonic() - began < 10


def test_sigterm_ignored_then_sigkill(containerd, cid, background):
    # sleep as PID 1 has no handler for SIGTERM, so the signal is ignored, as under runc.
    proc = background("sleep", "600")
    assert started(containerd, cid, proc), proc.stderr.read()
    containerd("tasks", "kill", cid, check=True)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(2)
    assert status(containerd, cid) == "RUNNING"
    containerd("tasks", "kill", "--signal", "SIGKILL", cid, check=True)
    assert proc.wait(60) == 137


def test_kill_usr1(containerd, cid, background):
    proc = background("sh", "-c", TRAP_USR1)
    assert "ready" in read_until(proc, "ready"), proc.seen
    containerd("tasks", "kill", "--signal", "SIGUSR1", cid, check=True)
    assert "got USR1\n" in read_until(proc, "got USR1\n"), proc.seen
    assert status(containerd, cid) == "RUNNING"


def test_pause_resume(containerd, cid):
    run_detached(containerd, cid, "sleep", "600")
    containerd("tasks", "pause", cid, check=True)
    assert status(containerd, cid) == "PAUSED"
    containerd("tasks", "resume", cid, check=True)
    assert status(containerd, cid) == "RUNNING"
    result = containerd("tasks", "exec", "--exec-id", "alive", cid, "echo", "alive")
    assert (result.returncode, result.stdout) == (0, "alive\n"), result.stderr


def test_delete_force_running(containerd, cid):
    run_detached(containerd, cid, "sleep", "600")
    assert status(containerd, cid) == "RUNNING"
    containerd("tasks", "delete", "--force", cid, check=True)
    containerd("containers", "delete", cid, check=True)
    assert status(containerd, cid) is None
    assert cid not in containers(containerd)


def test_task_metrics_show_the_vms_cpu_and_memory(containerd, cid, background):
    proc = background("sh", "-c", "while :; do :; done")
    assert started(containerd, cid, proc), proc.stderr.read()

    def metrics():
        return dict(line.split(None, 1) for line in containerd("tasks", "metrics", cid, check=True).stdout.splitlines()
                    if len(line.split(None, 1)) == 2)
    assert wait_for(lambda: int(metrics().get("cpuacct.usage", "0").strip() or 0) > 0, timeout=60), metrics()
    assert int(metrics()["memory.usage_in_bytes"]) > 16 << 20, metrics()  # QEMU and the guest's RAM it touched
    containerd("tasks", "kill", "--signal", "SIGKILL", cid, check=True)
    assert proc.wait(60) == 137
