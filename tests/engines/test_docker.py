"""docker (dockerd 20.10, pyrunv its default runtime) driving pyrunv: run, exit codes, stdin, tty, exec, stop,
kill, pause, rm. `docker top` runs the host's ps on the pids pyrunv reports, so it cannot show guest processes
and is not tested."""
import time

import pytest

from conftest import IMAGE, TRAP_TERM, TRAP_USR1, TTY_AND_SIZE, inspect, listed, logs, run_detached, tty_run, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.vm]


@pytest.fixture
def cid(docker, name):
    """The test's container name; the container is removed afterwards, whatever happened."""
    yield name
    docker("rm", "--force", name)


def gone(docker, cid):
    # With --rm, dockerd removes the container once it has exited: allow it a moment.
    return wait_for(lambda: not listed(docker, cid), timeout=10)


def test_run_rm_echo(docker, cid):
    result = docker("run", "--rm", "--name", cid, IMAGE, "echo", "hello")
    assert (result.returncode, result.stdout) == (0, "hello\n"), result.stderr
    assert gone(docker, cid)


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code(docker, cid, code):
    result = docker("run", "--rm", "--name", cid, IMAGE, "sh", "-c", f"exit {code}")
    assert (result.returncode, result.stdout) == (code, ""), result.stderr


def test_sigkill_exit_137(docker, cid):
    run_detached(docker, cid, "sleep", "600")
    assert inspect(docker, cid, ".HostConfig.Runtime") == "pyrunv"
    docker("kill", "--signal", "KILL", cid, check=True)
    assert docker("wait", cid).stdout == "137\n"
    assert inspect(docker, cid, ".State.ExitCode") == "137"


def test_piped_stdin(docker, cid):
    result = docker("run", "--rm", "-i", "--name", cid, IMAGE, "cat", input="piped\n")
    assert (result.returncode, result.stdout) == (0, "piped\n"), result.stderr


def test_tty(docker, cid):
    output, code = tty_run(docker.argv("run", "--rm", "-it", "--name", cid, IMAGE, "sh", "-c", TTY_AND_SIZE),
                           env=docker.env)
    assert code == 0, output
    assert "/dev/pts/0\n" in output and "33 111\n" in output, output


def test_exec(docker, cid):
    run_detached(docker, cid, "sleep", "600")
    result = docker("exec", cid, "sh", "-c", "echo exec-ok; exit 4")
    assert (result.returncode, result.stdout) == (4, "exec-ok\n"), result.stderr
    output, code = tty_run(docker.argv("exec", "-it", cid, "tty"), env=docker.env)
    assert code == 0 and "/dev/pts/" in output, output


def test_stop_trapped_term(docker, cid):
    run_detached(docker, cid, "sh", "-c", TRAP_TERM)
    assert wait_for(lambda: "ready" in logs(docker, cid))
    began = time.monotonic()
    docker("stop", "--time", "20", cid, check=True)
    assert time.monotonic() - began < 10
    assert inspect(docker, cid, ".State.ExitCode") == "0"


def test_stop_ignored_term(docker, cid):
    # sleep as PID 1 has no handler for SIGTERM, so the signal is ignored (as under runc): stop kills.
    run_detached(docker, cid, "sleep", "600")
    began = time.monotonic()
    docker("stop", "--time", "2", cid, check=True)
    assert time.monotonic() - began >= 2
    assert inspect(docker, cid, ".State.ExitCode") == "137"


def test_kill_usr1(docker, cid):
    run_detached(docker, cid, "sh", "-c", TRAP_USR1)
    assert wait_for(lambda: "ready" in logs(docker, cid))
    docker("kill", "--signal", "USR1", cid, check=True)
    assert wait_for(lambda: "got USR1\n" in logs(docker, cid)), logs(docker, cid)
    assert inspect(docker, cid, ".State.Status") == "running"


def test_pause_unpause(docker, cid):
    run_detached(docker, cid, "sleep", "600")
    docker("pause", cid, check=True)
    assert inspect(docker, cid, ".State.Status") == "paused"
    docker("unpause", cid, check=True)
    assert inspect(docker, cid, ".State.Status") == "running"
    result = docker("exec", cid, "echo", "alive")
    assert (result.returncode, result.stdout) == (0, "alive\n"), result.stderr


def test_rm_force_running(docker, cid):
    run_detached(docker, cid, "sleep", "600")
    assert inspect(docker, cid, ".State.Status") == "running"
    docker("rm", "--force", cid, check=True)
    assert gone(docker, cid)
