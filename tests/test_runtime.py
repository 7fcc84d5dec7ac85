"""The runc-compatible lifecycle, driven through the CLI against real VMs."""
import concurrent.futures
import json
import os
import signal
import subprocess
import time

import pytest

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("code", [0, 3])
def test_run_prints_output_and_exits_with_the_process_code(runtime, bundle, code):
    path = bundle("sh", "-c", f"echo out; echo err >&2; exit {code}")
    result = runtime("run", "--bundle", path, f"exit{code}")
    assert (result.returncode, result.stdout, result.stderr) == (code, b"out\n", b"err\n")
    assert runtime.leftovers() == []


def test_lifecycle_states_list_and_pid_file(runtime, bundle, tmp_path, subreaper):
    path = bundle("sh", "-c", "read line; echo got $line; exit 7")
    pid_file = tmp_path / "pid"
    reader, writer = os.pipe()
    runtime.detached("create", "--bundle", path, "--pid-file", pid_file, "life", stdin=reader)
    os.close(reader)
    monitor_pid = int(pid_file.read_text())
    state = runtime.state("life")
    assert (state["status"], state["pid"], state["bundle"]) == ("created", monitor_pid, str(path))
    listed = runtime("list", "--format", "json", check=True)
    assert [(c["id"], c["status"]) for c in json.loads(listed.stdout)] == [("life", "created")]
    assert b"life" in runtime("list", check=True).stdout

    runtime("start", "life", check=True)
    assert runtime.state("life")["status"] == "running"
    assert os.waitpid(monitor_pid, os.WNOHANG) == (0, 0), "the pid-file process lives while the container runs"
    os.write(writer, b"hello\n")
    os.close(writer)
    _, status = os.waitpid(monitor_pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    assert runtime.state("life")["status"] == "stopped"
    runtime("delete", "life", check=True)
    assert runtime.leftovers() == []


def test_the_pid_file_process_dies_of_the_signal_that_killed_the_container(runtime, bundle, tmp_path, subreaper):
    path = bundle("sleep", "600")
    pid_file = tmp_path / "pid"
    runtime.detached("create", "--bundle", path, "--pid-file", pid_file, "sig")
    runtime("start", "sig", check=True)
    runtime("kill", "sig", "9", check=True)
    _, status = os.waitpid(int(pid_file.read_text()), 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    runtime("delete", "sig", check=True)


def test_signals_to_the_monitor_reach_the_container(runtime, bundle, subreaper, tmp_path):
    path = bundle("sh", "-c", "trap 'echo got TERM; exit 42' TERM; echo ready; while true; do sleep 0.1; done")
    pid_file = tmp_path / "pid"
    out = tmp_path / "out"
    with open(out, "wb") as f:
        subprocess.run(runtime.argv("create", "--bundle", path, "--pid-file", pid_file, "fwd"), stdout=f,
                       check=True, timeout=120)
    runtime("start", "fwd", check=True)
    deadline = time.monotonic() + 30
    while b"ready" not in out.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    _, status = os.waitpid(int(pid_file.read_text()), 0)
    assert os.waitstatus_to_exitcode(status) == 42
    assert out.read_bytes() == b"ready\ngot TERM\n"
    runtime("delete", "fwd", check=True)


def test_delete_force_of_a_running_container_leaves_nothing(runtime, bundle):
    path = bundle("sleep", "600")
    runtime.detached("run", "--detach", "--bundle", path, "busy")
    assert runtime.state("busy")["status"] == "running"
    refused = runtime("delete", "busy")
    assert refused.returncode == 1 and b"not stopped" in refused.stderr
    runtime("delete", "--force", "busy", check=True)
    assert runtime.leftovers() == []
    assert runtime("state", "busy").returncode == 1


def _one_line_error(result):
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr
    return result.stderr.decode()


def test_bad_input_gives_one_line_errors_and_leaves_nothing(runtime, bundle, tmp_path):
    good = bundle("sleep", "600")
    malformed = bundle("true")
    (malformed / "config.json").write_text("{not json")
    invalid = bundle("true", edit=lambda c: c["process"].update(args="true"))
    no_rootfs = bundle("true", edit=lambda c: c["root"].update(path="missing"))
    cases = {
        "not JSON": (("create", "--bundle", malformed, "c1"), "config.json"),
        "process.args": (("create", "--bundle", invalid, "c2"), "process.args"),
        "rootfs": (("create", "--bundle", no_rootfs, "c3"), "rootfs"),
        "no bundle": (("create", "--bundle", tmp_path / "nowhere", "c4"), "config.json"),
        "bad id": (("create", "--bundle", good, "../escape"), "invalid container id"),
        "unknown id": (("state", "ghost"), "does not exist"),
        "unknown id kill": (("kill", "ghost"), "does not exist"),
        "bad signal": (("kill", "ghost", "NOPE"), "invalid signal"),
    }
    for name, (args, expected) in cases.items():
        message = _one_line_error(runtime(*args))
        assert expected in message, (name, message)
    assert runtime.leftovers() == []

    runtime.detached("create", "--bundle", good, "dup")
    assert "exists" in _one_line_error(runtime("create", "--bundle", good, "dup"))
    assert "created" in _one_line_error(runtime("pause", "dup"))
    runtime("start", "dup", check=True)
    assert "running" in _one_line_error(runtime("start", "dup"))
    runtime("delete", "--force", "dup", check=True)
    assert runtime.leftovers() == []


def test_ten_containers_created_and_deleted_concurrently(runtime, bundle):
    path = bundle("sleep", "600")

    def lifecycle(n):
        created = runtime.detached("create", "--bundle", path, f"par{n}", check=False)
        deleted = runtime("delete", "--force", f"par{n}")
        return created.returncode, deleted.returncode, created.stderr + deleted.stderr
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lifecycle, range(10)))
    assert all(r[:2] == (0, 0) for r in results), results
    assert runtime.leftovers() == []
