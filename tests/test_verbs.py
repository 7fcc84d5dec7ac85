"""The verbs engines call beyond the core lifecycle: exec, tty, ps, pause/resume, kill --all, events."""
import fcntl
import json
import os
import shlex
import signal
import struct
import subprocess
import termios
import time

import pytest
from faultlib import ConsoleSocket, reaches_eof, read_until, wait_pid, wait_until

pytestmark = pytest.mark.vm


@pytest.fixture
def running(runtime, bundle):
    """A running container whose init sleeps."""
    path = bundle("sleep", "600")
    runtime.detached("run", "--detach", "--bundle", path, "box")
    return "box"


def test_exec_runs_in_the_same_container_and_returns_its_code(runtime, running):
    result = runtime("exec", running, "sh", "-c", "echo $$ $(hostname); cat /proc/1/comm; exit 5")
    assert result.returncode == 5
    pid, hostname = result.stdout.decode().split("\n")[0].split()
    assert int(pid) > 1 and hostname == "pyrunv"
    assert result.stdout.decode().split("\n")[1] == "sleep"


def test_exec_with_a_process_file_env_cwd_and_user(runtime, running, tmp_path):
    process = {"args": ["sh", "-c", "echo $FOO; pwd; id -u; read x; echo got $x"], "cwd": "/tmp",
               "env": ["FOO=bar", "PATH=/bin"], "user": {"uid": 7, "gid": 7}}
    (tmp_path / "process.json").write_text(json.dumps(process))
    result = runtime("exec", "--process", tmp_path / "process.json", running, input=b"line\n")
    assert (result.returncode, result.stdout) == (0, b"bar\n/tmp\n7\ngot line\n"), result.stderr


def test_exec_pid_file_process_exits_with_the_code(runtime, running, tmp_path, subreaper):
    pid_file = tmp_path / "exec.pid"
    runtime.detached("exec", "--detach", "--pid-file", pid_file, running, "sh", "-c", "sleep 1; exit 9")
    _, status = os.waitpid(int(pid_file.read_text()), 0)
    assert os.waitstatus_to_exitcode(status) == 9


def test_an_exec_whose_waiter_is_killed_is_killed_and_lets_go_of_its_stdio(runtime, running, tmp_path, subreaper):
    """containerd stops an ExecSync whose timeout ran out by SIGKILL to the exec's pid-file process, then waits
    for the exec's output to close."""
    pid_file, (read_end, write_end) = tmp_path / "exec.pid", os.pipe()
    subprocess.run(runtime.argv("exec", "--detach", "--pid-file", pid_file, running, "sh", "-c",
                                "echo started; exec sleep 1000"),
                   stdin=subprocess.DEVNULL, stdout=write_end, stderr=write_end, timeout=120, check=True)
    os.close(write_end)
    assert read_until(read_end, b"started\n") == b"started\n"
    waiter = int(pid_file.read_text())
    os.kill(waiter, signal.SIGKILL)
    wait_pid(waiter)
    assert reaches_eof(read_end), "the exec's output stayed open"
    os.close(read_end)
    assert wait_until(lambda: json.loads(runtime("ps", "--format", "json", running, check=True).stdout) == [1]), \
        "the exec's process outlived its waiter"


def test_exec_of_a_missing_program_fails_clearly(runtime, running):
    result = runtime("exec", running, "/no/such")
    assert result.returncode == 1 and b"/no/such" in result.stderr and result.stderr.count(b"\n") == 1


def test_terminal_create_and_exec_tty(runtime, bundle, tmp_path):
    path = bundle("sh", edit=lambda c: c["process"].update(terminal=True))
    console = ConsoleSocket(tmp_path / "console.sock")
    create = subprocess.Popen(runtime.argv("create", "--bundle", path, "--console-socket", console.path, "tty"))
    master = console.master()
    assert create.wait(120) == 0
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    runtime("start", "tty", check=True)
    os.write(master, b"tty; stty size; echo do''ne\n")  # the echo of the input does not end the wait
    out = read_until(master, b"done\r\n")
    assert b"/dev/pts/0\r\n33 111\r\n" in out

    exec_console = ConsoleSocket(tmp_path / "exec.sock")
    waiter = subprocess.Popen(runtime.argv("exec", "--tty", "--console-socket", exec_console.path, "tty",
                                           "sh", "-c", "tty; exit 6"))
    exec_master = exec_console.master()
    assert b"/dev/pts/1" in read_until(exec_master, b"/dev/pts/1")
    assert waiter.wait(60) == 6
    os.write(master, b"exit 4\n")
    runtime("delete", "--force", "tty", check=True)


def test_exec_tty_uses_the_persons_own_terminal_without_a_console_socket(runtime, running):
    """As with runc: `exec -t` typed at a terminal. util-linux script gives the command a pty of its own."""
    command = f"stty rows 33 cols 111; {shlex.join(runtime.argv('exec', '-t', running, 'sh', '-c', 'tty; stty size; exit 5'))}"
    stdin, keep_open = os.pipe()  # script would type an EOF into the pty at the end of its stdin
    try:
        result = subprocess.run(["script", "-qec", command, "/dev/null"], stdin=stdin, capture_output=True,
                                timeout=120)
    finally:
        os.close(stdin)
        os.close(keep_open)
    assert (result.returncode, result.stdout.replace(b"\r", b"")) == (5, b"/dev/pts/0\n33 111\n"), result.stderr
    refused = runtime("exec", "-t", running, "true")  # stdin is not a terminal here
    assert (refused.returncode, refused.stderr) == (
        1, b"pyrunv: exec --tty needs --console-socket, or a terminal on stdin without --detach\n")


def test_ps_lists_container_pids(runtime, running):
    runtime.detached("exec", "--detach", running, "sleep", "300")
    pids = json.loads(runtime("ps", "--format", "json", running, check=True).stdout)
    assert pids[0] == 1 and len(pids) == 2
    table = runtime("ps", running, check=True).stdout.decode().splitlines()
    assert table[0].split() == ["UID", "PID", "PPID", "CMD"] and len(table) == 3


def test_pause_freezes_the_vm_and_resume_thaws_it(runtime, bundle, tmp_path):
    out = tmp_path / "ticks"
    path = bundle("sh", "-c", "while true; do date +%s%N; sleep 0.1; done")
    with open(out, "wb") as f:
        subprocess.run(runtime.argv("run", "--detach", "--bundle", path, "ticker"), stdout=f, check=True)
    assert wait_until(lambda: out.read_bytes(), timeout=60), "the ticker never ticked"
    runtime("pause", "ticker", check=True)
    assert runtime.state("ticker")["status"] == "paused"
    time.sleep(0.5)  # what was in flight when the VM froze
    frozen = out.read_bytes()
    time.sleep(1)
    assert out.read_bytes() == frozen, "a paused VM prints nothing"
    runtime("resume", "ticker", check=True)
    assert runtime.state("ticker")["status"] == "running"
    assert wait_until(lambda: len(out.read_bytes()) > len(frozen), timeout=60), "nothing after resume"
    runtime("kill", "ticker", "KILL", check=True)


def test_kill_all_reaches_every_process(runtime, bundle):
    path = bundle("sh", "-c", "trap '' TERM; sleep 600 & wait")
    runtime.detached("run", "--detach", "--bundle", path, "many")
    runtime("kill", "--all", "many", "KILL", check=True)
    deadline = time.monotonic() + 30
    while runtime.state("many")["status"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runtime.state("many")["status"] == "stopped"


def test_kill_all_of_a_stopped_container_succeeds_as_with_runc(runtime, bundle):
    """containerd's shim sends kill --all after the init has exited, and logs an error if it fails."""
    runtime.detached("run", "--detach", "--bundle", bundle("true"), "done")
    assert wait_until(lambda: runtime.state("done")["status"] == "stopped")
    assert runtime("kill", "--all", "done", "KILL").returncode == 0
    assert runtime("kill", "done", "KILL").stderr == b"pyrunv: container not running\n"


def test_kill_of_a_paused_container_with_sigkill(runtime, running):
    runtime("pause", running, check=True)
    runtime("kill", running, "SIGKILL", check=True)
    deadline = time.monotonic() + 30
    while runtime.state(running)["status"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runtime.state(running)["status"] == "stopped"


def test_events_stats_come_from_the_guest(runtime, running):
    event = json.loads(runtime("events", "--stats", running, check=True).stdout)
    assert event["type"] == "stats" and event["id"] == running
    memory = event["data"]["memory"]["usage"]
    assert 0 < memory["usage"] < memory["limit"] <= 160 << 20
    assert event["data"]["pids"]["current"] == 1
    assert event["data"]["cpu"]["usage"]["total"] > 0
