"""The state store: ids, per-container directories, state.json, status derived from what is alive, locks."""
import os
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest

from pyrunv.state import store as state
from pyrunv.errors import PyrunvError
from pyrunv.state.lifecycle import Status


@pytest.fixture
def store(tmp_path):
    return state.Store(str(tmp_path / "root"))


def record(container_id, **fields):
    return state.Record(id=container_id, bundle="/b", rootfs="/b/rootfs", status=Status.CREATED.value, **fields)


def saved(store, container_id, **fields):
    """A container as `create` leaves it: its directory and a state.json."""
    with store.create(record(container_id, **fields)):
        pass
    return store.load(container_id)


def alive(status: Status, **fields) -> state.Record:
    """A record whose monitor is this very process (unless fields say otherwise), alive as long as the test runs."""
    fields = {"pid": os.getpid(), "pid_start": state.process_start_time(os.getpid()), **fields}
    return state.Record(id="c1", bundle="/b", rootfs="/b/rootfs", status=status.value, **fields)


@pytest.mark.parametrize("container_id", ["c1", "a-b_c.d+e", "A", "x" * 64, "0123abcdef" * 6, ".hidden"])
def test_runc_style_ids_are_accepted(container_id):
    assert state.validate_id(container_id) == container_id


@pytest.mark.parametrize("container_id", ["../x", "a/b", "/abs", "", ".", "..", "a b", "a\nb", "x" * 1025])
def test_ids_that_could_name_another_path_are_refused(container_id):
    with pytest.raises(PyrunvError, match="invalid container id"):
        state.validate_id(container_id)


def test_store_paths_refuse_a_bad_id(store):
    with pytest.raises(PyrunvError, match="invalid container id"):
        store.path("../escape")


def test_create_claims_an_id_exactly_once_and_leaves_no_hidden_directory(store):
    saved(store, "c1")
    with pytest.raises(PyrunvError, match="^container with id exists: c1$"):
        with store.create(record("c1", pid=1)):
            pass
    assert store.load("c1").pid == 0
    assert os.listdir(store.root) == ["c1"]


def test_a_created_id_has_its_state_and_is_locked_from_the_start(store):
    with store.create(record("c1")) as path:
        assert store.exists("c1") and store.load("c1").status == Status.CREATED.value
        with pytest.raises(PyrunvError, match="^container c1 is busy"):
            with store.lock("c1", timeout=0.1):
                pass
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    with store.lock("c1", timeout=1):
        pass


def test_save_and_load_round_trip(store):
    record = saved(store, "c1", pid=1234, pid_start=5678, created="2024-01-01T00:00:00Z", owner="root",
                   annotations={"k": "v"}, accel="tcg")
    assert store.load("c1") == record
    assert store.exists("c1")
    # The write is atomic: no temporary file is left next to state.json.
    assert os.listdir(store.path("c1")) == [state.STATE_FILE]


def test_load_of_an_unknown_container_says_it_does_not_exist(store):
    with pytest.raises(PyrunvError, match="^container ghost does not exist$"):
        store.load("ghost")


@pytest.mark.parametrize("content", ["{truncated", "[1, 2]", '{"id": "c1"}', '{"unknown": 1}'])
def test_a_corrupt_state_file_gives_a_clear_error(store, content):
    saved(store, "c1")
    with open(store.path("c1", state.STATE_FILE), "w") as f:
        f.write(content)
    with pytest.raises(PyrunvError, match="^container c1: state file is corrupt$"):
        store.load("c1")


@pytest.mark.parametrize("status", [Status.CREATED, Status.RUNNING, Status.PAUSED])
def test_a_live_monitor_keeps_the_recorded_status(store, status):
    assert store.status(alive(status)) is status


def test_a_dead_monitor_means_stopped(store):
    monitor = subprocess.Popen(["sleep", "60"])
    started = state.process_start_time(monitor.pid)
    monitor.kill()
    monitor.wait()
    record = alive(Status.RUNNING, pid=monitor.pid, pid_start=started)
    assert started and store.status(record) is Status.STOPPED


def test_a_monitor_already_gone_when_recorded_means_stopped(store):
    # A start time of 0 is what process_start_time reports for a dead or zombie process.
    record = alive(Status.CREATED, pid=2 ** 22 + 1, pid_start=0)
    assert store.status(record) is Status.STOPPED


def test_a_reused_pid_is_not_taken_for_the_monitor(store):
    record = alive(Status.RUNNING, pid_start=state.process_start_time(os.getpid()) - 1)
    assert store.status(record) is Status.STOPPED


def test_an_exit_file_means_stopped_even_while_the_monitor_lives(store):
    saved(store, "c1")
    open(store.path("c1", state.EXIT_FILE), "w").close()
    assert store.status(alive(Status.RUNNING)) is Status.STOPPED


def test_creating_is_kept_while_create_holds_the_container(store):
    record = alive(Status.CREATING, pid=0, pid_start=0)
    assert store.status(record) is Status.CREATING


def test_the_oci_state_of_a_stopped_container_has_pid_0(store):
    record = alive(Status.RUNNING)
    assert record.oci_state(Status.RUNNING)["pid"] == os.getpid()
    assert record.oci_state(Status.STOPPED)["pid"] == 0
    assert record.oci_state(Status.STOPPED)["status"] == "stopped"


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_lock_held_by_another_command_makes_us_busy_until_it_lets_go(store):
    saved(store, "c1")
    path = store.path("c1")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        with pytest.raises(PyrunvError, match="^container c1 is busy: another pyrunv command holds its lock$"):
            with store.lock("c1", timeout=0.1):
                pass
        assert time.monotonic() - started < 2
    finally:
        holder.stdin.close()
        holder.wait()
    with store.lock("c1", timeout=1):
        pass


def test_lock_of_an_unknown_container_says_it_does_not_exist(store):
    store.ensure_root()
    with pytest.raises(PyrunvError, match="^container ghost does not exist$"):
        with store.lock("ghost"):
            pass


def test_a_waiter_for_the_lock_of_a_container_deleted_meanwhile_is_told_it_does_not_exist(store):
    saved(store, "c1")
    outcome = []

    def wait_for_lock():
        try:
            with store.lock("c1", timeout=5):
                outcome.append("locked")
        except PyrunvError as e:
            outcome.append(str(e))
    with store.lock("c1"):
        waiter = threading.Thread(target=wait_for_lock)
        waiter.start()
        time.sleep(0.1)  # the waiter has opened the directory and polls for the lock
        store.remove("c1")
    waiter.join(5)
    assert outcome == ["container c1 does not exist"]


def test_remove_frees_the_id(store):
    saved(store, "c1")
    store.remove("c1")
    assert not store.exists("c1") and store.ids() == []
    saved(store, "c1")
    store.remove("c1")
    store.remove("c1")  # removing what is gone already is no error


def test_ids_lists_only_containers(store, monkeypatch):
    for container_id in ("b", "a", ".hidden", "dying"):
        saved(store, container_id)
    os.mkdir(os.path.join(store.root, "half-created"))  # an older create's, killed before its state.json
    os.mkdir(os.path.join(store.root, ".creating:c9:1"))  # a create killed before its rename
    open(os.path.join(store.root, "stray-file"), "w").close()
    # A delete killed between its rename and its rmtree leaves the renamed directory behind.
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
    store.remove("dying")
    assert store.ids() == [".hidden", "a", "b"]


def test_ids_of_a_root_that_does_not_exist_yet_is_empty(store):
    assert store.ids() == []
