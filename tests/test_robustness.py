"""Robustness: a full or read-only --root, a command that waits for another's lock, and many commands
on one --root at once. Every failure must be one clean line, and nothing may leak."""
import concurrent.futures
import fcntl
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from faultlib import DEADLINE, describe_status, one_line_error, reap_zombie_children, wait_pid, \
    wait_until
from pyrunv.state import store as state


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size under tmp_path; unmounted at the end."""
    mounted = []

    def mount(size, name="mnt"):
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path
    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory, leave=0):
    """Fills the file system of `directory`, then frees `leave` bytes again."""
    path = os.path.join(directory, "fill")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass  # ENOSPC: full
    finally:
        os.close(fd)
    if leave:
        os.truncate(path, max(0, os.path.getsize(path) - leave))


def detached(rt, out_dir, *args, timeout=DEADLINE + 120):
    """rt.detached(), but with the output file outside --root's file system, which may be full."""
    out_dir.mkdir(exist_ok=True)
    with open(out_dir / f"out-{time.monotonic_ns()}", "w+b") as out:
        result = subprocess.run(rt.argv(*args), stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=timeout)
        out.seek(0)
        result.stderr = out.read()
    return result


def fake_stopped_container(root, container_id, bundle="/nonexistent-bundle"):
    """A state directory whose monitor is long gone, as a crashed host would leave it: no VM needed."""
    store = state.Store(str(root))
    with store.create(state.Record(id=container_id, bundle=bundle, rootfs=f"{bundle}/rootfs", status="running",
                                   pid=2 ** 22 + 1, pid_start=1, created="2024-01-01T00:00:00Z", owner="root")):
        pass
    return store.path(container_id)


# --- a full disk -----------------------------------------------------------------------------------

@pytest.mark.vm
@pytest.mark.parametrize("free", [0, 4096, 8192], ids=["no-space", "one-page", "two-pages"])
def test_create_on_a_full_root_fails_in_one_line_and_leaves_nothing(runtime, bundle, tmpfs, tmp_path, free):
    mnt = tmpfs("16k")
    rt = type(runtime)(mnt / "root")
    rt.root.mkdir()
    fill(mnt, leave=free)
    result = detached(rt, tmp_path / "out", "create", "--bundle", bundle("sleep", "600"), "full")
    if result.returncode == 0:  # a VM that fits in what is left must at least go cleanly
        rt("delete", "--force", "full", check=True)
    else:
        assert "No space left on device" in one_line_error(result)
    assert rt.leftovers() == []
    assert os.listdir(rt.root) == []


@pytest.mark.vm
def test_a_disk_that_fills_while_the_container_runs(runtime, bundle, tmpfs, tmp_path, subreaper):
    """The monitor cannot write its exit file: the engine must still see the container's real status."""
    mnt = tmpfs("1m")
    rt = type(runtime)(mnt / "root")
    pid_file = tmp_path / "pid"
    created = detached(rt, tmp_path / "out", "create", "--bundle", bundle("sleep", "600"), "--pid-file", pid_file,
                       "filling")
    assert created.returncode == 0, created.stderr
    rt("start", "filling", check=True)
    fill(mnt)
    rt("kill", "filling", "KILL", check=True)
    status = wait_pid(int(pid_file.read_text()))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, describe_status(status)
    assert wait_until(lambda: rt.state("filling")["status"] == "stopped")
    rt("delete", "filling", check=True)
    assert rt.leftovers() == []
    reap_zombie_children()


# --- a read-only --root ----------------------------------------------------------------------------

def readonly_root(tmpfs, *, exists):
    mnt = tmpfs("1m")
    if exists:
        (mnt / "root").mkdir(mode=0o700)
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    return mnt / "root"


@pytest.mark.parametrize("exists", [True, False], ids=["root-exists", "root-missing"])
def test_create_on_a_readonly_root_fails_in_one_line(runtime, bundle, tmpfs, exists):
    rt = type(runtime)(readonly_root(tmpfs, exists=exists))
    message = one_line_error(rt("create", "--bundle", bundle("true"), "ro"))
    assert "Read-only file system" in message
    assert ("cannot create state directory" if exists else "cannot create root directory") in message
    assert one_line_error(rt("state", "ro")) == "pyrunv: container ro does not exist"
    assert "does not exist" in one_line_error(rt("delete", "ro"))
    assert rt("delete", "--force", "ro").returncode == 0  # runc: nothing there, nothing to do
    listed = rt("list", "--format", "json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    assert rt.leftovers() == []


# --- the container lock ----------------------------------------------------------------------------

def test_delete_waits_for_the_lock_another_command_holds(runtime):
    state_dir = fake_stopped_container(runtime.root, "locked")
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as state.Store.lock() does
        delete = subprocess.Popen(runtime.argv("delete", "locked"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)  # bounded: the command must still be waiting after this
        assert delete.poll() is None, "delete did not wait for the lock"
        assert os.path.isdir(state_dir)
    finally:
        os.close(fd)  # releases the lock
    out, err = delete.communicate(timeout=DEADLINE)
    assert (delete.returncode, out, err) == (0, b"", b"")
    assert not os.path.exists(state_dir)
    assert runtime.leftovers() == []


# --- concurrency -----------------------------------------------------------------------------------

def clean(result):
    """A command either succeeded or failed with one clean line; returns whether it succeeded."""
    if result.returncode == 0:
        return True
    one_line_error(result)
    return False


@pytest.mark.vm
@pytest.mark.slow
def test_twenty_containers_live_and_die_in_parallel_on_one_root(runtime, bundle, capsys):
    path = bundle("sleep", "600")

    def lifecycle(n):
        cid = f"par{n}"
        done = []
        created = runtime.detached("create", "--bundle", path, cid, check=False, timeout=DEADLINE + 120)
        done.append(("create", clean(created)))
        done.append(("start", clean(runtime("start", cid))))
        if done[-1][1]:
            record = runtime.state(cid)
            assert record["status"] == "running" and os.path.exists(f"/proc/{record['pid']}"), record
        done.append(("kill", clean(runtime("kill", cid, "SIGKILL"))))
        if done[-1][1]:
            assert wait_until(lambda: json.loads(runtime("state", cid).stdout)["status"] == "stopped"), cid
        done.append(("delete", clean(runtime("delete", cid))))
        if not done[-1][1]:  # a half-made container: the forced delete must still clean it up
            runtime("delete", "--force", cid)
        return done

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lifecycle, range(20)))
    whole = sum(all(ok for _, ok in steps) for steps in results)
    with capsys.disabled():
        failed_at = sorted({step for steps in results for step, ok in steps if not ok})
        print(f"\nparallel lifecycles: {whole} of 20 went through create, start, kill and delete"
              + (f"; the others failed cleanly at {failed_at}" if failed_at else ""))
    assert whole > 0, results  # the test is not vacuous: some containers did live their whole life
    listed = runtime("list", "--format", "json", check=True)
    assert json.loads(listed.stdout) == []
    assert runtime.leftovers() == []
    assert [e for e in os.listdir(runtime.root) if e.startswith(".deleted:")] == []


@pytest.mark.vm
@pytest.mark.slow
def test_two_creates_of_one_id_race_and_exactly_one_wins(runtime, bundle):
    path = bundle("sleep", "600")
    for round_ in range(5):
        barrier = threading.Barrier(2)

        def create(_):
            barrier.wait(timeout=DEADLINE)
            return runtime.detached("create", "--bundle", path, "twin", check=False, timeout=DEADLINE + 120)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(create, range(2)))
        winners = [r for r in results if r.returncode == 0]
        losers = [r for r in results if r.returncode != 0]
        assert len(winners) == 1, (round_, [r.stderr for r in results])
        assert "container with id exists: twin" in one_line_error(losers[0])
        assert runtime.state("twin")["status"] == "created"
        runtime("delete", "--force", "twin", check=True)
        assert runtime.leftovers() == []


# --- the working directory -------------------------------------------------------------------------

@pytest.mark.vm
def test_run_from_any_working_directory(runtime, bundle, tmp_path):
    """Engines run the runtime from the bundle (containerd's shim) or anywhere: `python -m pyrunv` with an
    editable install has no path entry for pyrunv, so the monitor must not depend on the cwd to import it."""
    path = bundle("sh", "-c", "echo from-anywhere")
    result = subprocess.run(runtime.argv("run", "--bundle", path, "anywhere"), cwd=path, capture_output=True,
                            timeout=DEADLINE * 4)
    assert (result.returncode, result.stdout) == (0, b"from-anywhere\n"), result.stderr
    assert runtime.leftovers() == []
