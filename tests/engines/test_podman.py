"""podman (with conmon) driving pyrunv: run, exit codes, stdin, tty, exec, stop, kill, pause, rm, rlimits."""
import time

import pytest

from conftest import IMAGE, TRAP_TERM, TRAP_USR1, TTY_AND_SIZE, inspect, listed, logs, run_detached, tty_run, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.vm]


@pytest.fixture
def cid(podman, name):
    """The test's container name; the container is removed afterwards, whatever happened."""
    yield name
    podman("rm", "--force", "--time", "0", name)


def test_run_rm_echo(podman, cid):
    result = podman("run", "--rm", "--name", cid, IMAGE, "echo", "hello")
    assert (result.returncode, result.stdout) == (0, "hello\n"), result.stderr
    assert not listed(podman, cid)


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code(podman, cid, code):
    result = podman("run", "--rm", "--name", cid, IMAGE, "sh", "-c", f"exit {code}")
    assert (result.returncode, result.stdout) == (code, ""), result.stderr


def test_sigkill_exit_137(podman, cid):
    run_detached(podman, cid, "sleep", "600")
    podman("kill", "--signal", "KILL", cid, check=True)
    assert podman("wait", cid).stdout == "137\n"
    assert inspect(podman, cid, ".State.ExitCode") == "137"


def test_piped_stdin(podman, cid):
    result = podman("run", "--rm", "-i", "--name", cid, IMAGE, "cat", input="piped\n")
    assert (result.returncode, result.stdout) == (0, "piped\n"), result.stderr


def test_tty(podman, cid):
    output, code = tty_run(podman.argv("run", "--rm", "-it", "--name", cid, IMAGE, "sh", "-c", TTY_AND_SIZE),
                           env=podman.env)
    assert code == 0, output
    assert "/dev/pts/0\n" in output and "33 111\n" in output, output


def test_exec(podman, cid):
    run_detached(podman, cid, "sleep", "600")
    result = podman("exec", cid, "sh", "-c", "echo exec-ok; exit 4")
    assert (result.returncode, result.stdout) == (4, "exec-ok\n"), result.stderr
    output, code = tty_run(podman.argv("exec", "-it", cid, "tty"), env=podman.env)
    assert code == 0 and "/dev/pts/" in output, output


def test_stop_trapped_term(podman, cid):
    run_detached(podman, cid, "sh", "-c", TRAP_TERM)
    assert wait_for(lambda: "ready" in logs(podman, cid))
    began = time.monotonic()
    podman("stop", "--time", "20", cid, check=True)
    assert time.monotonic() - began < 10
    assert inspect(podman, cid, ".State.ExitCode") == "0"


def test_stop_ignored_term(podman, cid):
    # sleep as PID 1 has no handler for SIGTERM, so the signal is ignored (as under runc): stop kills.
    run_detached(podman, cid, "sleep", "600")
    began = time.monotonic()
    podman("stop", "--time", "2", cid, check=True)
    assert time.monotonic() - began >= 2
    assert inspect(podman, cid, ".State.ExitCode") == "137"


def test_kill_usr1(podman, cid):
    run_detached(podman, cid, "sh", "-c", TRAP_USR1)
    assert wait_for(lambda: "ready" in logs(podman, cid))
    podman("kill", "--signal", "USR1", cid, check=True)
    assert wait_for(lambda: "got USR1\n" in logs(podman, cid)), logs(podman, cid)
    assert inspect(podman, cid, ".State.Status") == "running"


def test_pause_unpause(podman, cid):
    run_detached(podman, cid, "sleep", "600")
    podman("pause", cid, check=True)
    assert inspect(podman, cid, ".State.Status") == "paused"
    podman("unpause", cid, check=True)
    assert inspect(podman, cid, ".State.Status") == "running"
    result = podman("exec", cid, "echo", "alive")
    assert (result.returncode, result.stdout) == (0, "alive\n"), result.stderr


def test_rm_force_running(podman, cid):
    run_detached(podman, cid, "sleep", "600")
    assert inspect(podman, cid, ".State.Status") == "running"
    podman("rm", "--force", cid, check=True)
    assert not listed(podman, cid)


def test_default_rlimits_applied_in_guest(podman, cid):
    # podman's default nofile (1048576) is above this host's hard limit and runc could not set it here
    # (no CAP_SYS_RESOURCE); pyrunv sets rlimits in the guest.
    result = podman("run", "--rm", "--name", cid, IMAGE, "sh", "-c", "ulimit -n; ulimit -Hn")
    assert (result.returncode, result.stdout) == (0, "1048576\n1048576\n"), result.stderr
