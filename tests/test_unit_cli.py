"""The CLI verbs that need no VM, run as an engine runs them: `python -m pyrunv --root DIR ...`."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from pyrunv.cli import verbs
from pyrunv.oci import defaults
from pyrunv.oci import spec
from pyrunv.runtime import sandbox
from pyrunv.state import store as state
from pyrunv.errors import PyrunvError

HEADER = "ID   PID   STATUS   BUNDLE   CREATED   OWNER\n"


def pyrunv(root, *args):
    return subprocess.run([sys.executable, "-m", "pyrunv", "--root", str(root), *map(str, args)],
                          capture_output=True, text=True, timeout=30, cwd=root.parent)


@pytest.fixture
def root(tmp_path):
    return tmp_path / "root"


def test_list_without_containers_prints_the_header_only(root):
    result = pyrunv(root, "list")
    assert (result.returncode, result.stdout, result.stderr) == (0, HEADER, "")


def test_list_quiet_and_json_without_containers(root):
    assert pyrunv(root, "list", "--quiet").stdout == ""
    assert json.loads(pyrunv(root, "list", "--format", "json").stdout) == []


def test_list_shows_a_stored_container_as_stopped_once_its_monitor_is_gone(root):
    with state.Store(str(root)).create(state.Record(id="c1", bundle="/b", rootfs="/b/rootfs", status="running",
                                                    pid=2 ** 22 + 1, pid_start=1, created="2024-01-01T00:00:00Z",
                                                    owner="root")):
        pass
    listed = json.loads(pyrunv(root, "list", "--format", "json").stdout)
    assert [(c["id"], c["status"], c["pid"]) for c in listed] == [("c1", "stopped", 0)]


def test_state_of_an_unknown_container_is_a_one_line_error(root):
    result = pyrunv(root, "state", "ghost")
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "pyrunv: container ghost does not exist\n")


def test_an_invalid_id_is_refused_before_touching_the_root(root):
    result = pyrunv(root, "state", "../escape")
    assert (result.returncode, result.stderr) == (1, "pyrunv: invalid container id format: '../escape'\n")
    assert not root.exists()


# Run in a fresh interpreter: which heavy modules did `list` and `state` import?
LAZY_IMPORTS = """
import sys
from pyrunv.cli import commands as cli
root = sys.argv[1]
for args in (["list"], ["state", "ghost"]):
    sys.argv = ["pyrunv", "--root", root, *args]
    try:
        cli.main()
    except SystemExit:
        pass
print(sorted(m for m in ("jsonschema", "qemu.qmp", "asyncio") if m in sys.modules))
"""


def test_list_and_state_import_no_heavy_modules(root):
    result = subprocess.run([sys.executable, "-c", LAZY_IMPORTS, str(root)], capture_output=True, text=True,
                            timeout=30)
    assert result.stdout.startswith(HEADER), result.stderr
    assert "container ghost does not exist" in result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


DELETE_IMPORTS = """
import sys
from pyrunv.cli import commands as cli
sys.argv = ["pyrunv", "--root", sys.argv[1], "delete", "c1"]
cli.main()
print(sorted(m for m in ("jsonschema", "qemu.qmp", "asyncio") if m in sys.modules))
"""


def test_delete_runs_the_poststop_hook_kept_at_create_without_the_bundle(root, tmp_path):
    seen = tmp_path / "seen.json"
    hook = {"path": "/bin/sh", "args": ["sh", "-c", f"cat > {seen}"]}
    with state.Store(str(root)).create(state.Record(
            id="c1", bundle=str(tmp_path / "gone"), rootfs="/gone/rootfs", status="running", pid=2 ** 22 + 1,
            pid_start=1, created="2024-01-01T00:00:00Z", owner="root", hooks={"poststop": [hook]})):
        pass
    result = subprocess.run([sys.executable, "-c", DELETE_IMPORTS, str(root)], capture_output=True, text=True,
                            timeout=30)
    assert (result.stdout, result.stderr) == ("[]\n", "")
    assert json.loads(seen.read_text())["status"] == "stopped"
    assert not (root / "c1").exists()


@pytest.mark.parametrize("rootless", [False, True])
def test_spec_writes_a_config_that_loads(tmp_path, rootless):
    result = pyrunv(tmp_path / "root", "spec", "--bundle", tmp_path, *(["--rootless"] if rootless else []))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    (tmp_path / "rootfs").mkdir()
    loaded = spec.load(str(tmp_path))
    assert loaded.process.args == ("sh",) and loaded.root_readonly
    assert loaded.process.capabilities["bounding"] == tuple(defaults.DEFAULT_CAPS)
    namespaces = [n["type"] for n in json.loads((tmp_path / "config.json").read_text())["linux"]["namespaces"]]
    assert ("user" in namespaces) == rootless


def test_spec_refuses_to_overwrite_a_config(tmp_path):
    (tmp_path / "config.json").write_text("mine")
    result = pyrunv(tmp_path / "root", "spec", "--bundle", tmp_path)
    assert (result.returncode, result.stderr) == (1, "pyrunv: File config.json exists. Remove it first\n")
    assert (tmp_path / "config.json").read_text() == "mine"


def test_features_lists_pyrunvs_annotations(root):
    result = pyrunv(root, "features")
    assert result.returncode == 0
    features = json.loads(result.stdout)
    assert {k for k in features["annotations"] if k.startswith("io.pyrunv.vm.")} == {
        f"io.pyrunv.vm.{k}" for k in ("memory_mib", "vcpus", "kernel_params", "machine", "accel", "kernel", "display")}
    assert "CAP_SYS_ADMIN" in features["linux"]["capabilities"]
    assert features["ociVersionMax"] == "1.0.2"
    assert features["linux"]["cgroup"]["v1"] and "user" in features["linux"]["namespaces"]
    not_applied = features["annotations"]["io.pyrunv.resources.not-applied"].split(", ")
    assert {"linux.resources.memory.swappiness", "linux.resources.network", "linux.resources.devices"} <= set(not_applied)


def test_features_say_whether_checkpoint_is_available(root, tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('qemu = "/bin/true"\n')  # says nothing of a version: not 8.2
    monkeypatch.setenv("PYRUNV_CONFIG", str(config))
    result = pyrunv(root, "features")
    assert json.loads(result.stdout)["annotations"]["io.pyrunv.checkpoint"].startswith("not available: ")


@pytest.mark.parametrize("name", ["NOPE", "SIGNOPE", "0", "65", "9.5"])
def test_kill_with_an_invalid_signal_is_refused(root, name):
    result = pyrunv(root, "kill", "c1", name)
    assert (result.returncode, result.stderr) == (1, f"pyrunv: invalid signal: {name}\n")


@pytest.mark.parametrize("name,number", [("TERM", 15), ("SIGKILL", 9), ("kill", 9), ("sigusr1", 10), ("9", 9),
                                         ("64", 64)])
def test_signals_are_taken_by_name_or_number(name, number):
    assert verbs.parse_signal(name) == number


def test_parse_signal_refuses_a_name_that_is_no_signal():
    with pytest.raises(PyrunvError, match="^invalid signal: SIG_DFL$"):
        verbs.parse_signal("SIG_DFL")


def test_stopping_a_monitor_that_was_already_gone_when_recorded_returns_at_once(tmp_path):
    store = state.Store(str(tmp_path / "root"))
    store.ensure_root()
    os.mkdir(store.path("c1"))
    zombie = subprocess.Popen(["true"])
    while state.process_start_time(zombie.pid):
        time.sleep(0.01)  # until it has exited; it stays a zombie because nobody waits for it yet
    record = state.Record(id="c1", bundle="/b", rootfs="/b/rootfs", status="created", pid=zombie.pid, pid_start=0)
    stopper = threading.Thread(target=sandbox.stop, args=(store, record, 0.1), daemon=True)
    stopper.start()
    stopper.join(2)
    alive = stopper.is_alive()
    zombie.wait()
    assert not alive, "stop_monitor waits forever for a start time of 0 to change"


def test_the_version_names_the_spec(root):
    result = pyrunv(root, "--version")
    assert (result.returncode, result.stdout) == (0, "pyrunv version 0.1.0\nspec: 1.0.2\n")


@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("5s", 5), ("1m", 60), ("2h", 7200)])
def test_durations_as_runc_takes_them(text, seconds):
    assert verbs.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "-1s", "0s", "fast", "1d"])
def test_bad_durations_are_one_line_errors(text):
    with pytest.raises(PyrunvError, match="invalid duration"):
        verbs.parse_duration(text)


def test_delete_force_of_a_missing_container_succeeds_as_in_runc(root):
    result = pyrunv(root, "delete", "--force", "ghost")
    assert (result.returncode, result.stderr) == (0, "")
    assert pyrunv(root, "delete", "ghost").returncode == 1


def test_delete_frees_the_id_of_an_older_create_that_died_before_writing_state(root):
    store = state.Store(str(root))
    store.ensure_root()
    os.mkdir(store.path("halfway"))  # as an earlier pyrunv, which made the directory first, left it
    assert "does not exist" in pyrunv(root, "delete", "halfway").stderr
    with store.create(state.Record(id="halfway", bundle="/b", rootfs="/b/rootfs", status="created")):
        pass  # the ID is free again


def _exec_process(tmp_path, config_process, **flags):
    from pyrunv.runtime import execution
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
                                                    "process": config_process}))
    record = state.Record(id="x", bundle=str(bundle), rootfs=str(bundle / "rootfs"), status="running")
    options = dict(cwd=None, env=(), tty=False, user=None, additional_gids=(), no_new_privs=False, caps=())
    options.update(flags)
    return execution.build_process(record, None, ("sh",), **options)


def test_exec_env_replaces_a_variable_of_the_config(tmp_path):
    process = _exec_process(tmp_path, {"args": ["x"], "cwd": "/", "env": ["TERM=xterm", "A=1"]},
                            env=("TERM=dumb", "B=2"))
    assert process["env"] == ["A=1", "TERM=dumb", "B=2"]


def test_exec_cap_adds_to_every_set_and_keeps_all_caps_when_the_config_has_none(tmp_path):
    with_caps = _exec_process(tmp_path, {"args": ["x"], "cwd": "/", "capabilities": {"bounding": ["CAP_KILL"]}},
                              caps=("CAP_CHOWN",))
    assert with_caps["capabilities"]["bounding"] == ["CAP_CHOWN", "CAP_KILL"]
    assert with_caps["capabilities"]["effective"] == ["CAP_CHOWN"]
    without = _exec_process(tmp_path / "2", {"args": ["x"], "cwd": "/"}, caps=("CAP_CHOWN",))
    assert "capabilities" not in without


@pytest.mark.parametrize("args, line", [
    (["checkpoint", "c"], "checkpoint needs exactly one of --image-path and --page-server"),
    (["restore", "--image-path", "i", "--listen", "127.0.0.1:0", "c"],
     "restore needs exactly one of --image-path and --listen"),
])
def test_checkpoint_and_restore_need_one_place_for_the_vm(root, args, line):
    result = pyrunv(root, *args)
    assert (result.returncode, result.stderr) == (1, f"pyrunv: {line}\n")


@pytest.mark.parametrize("kind, field", [("network", "hostNetwork"), ("ipc", "hostIPC")])
def test_a_pod_that_shares_the_hosts_network_or_ipc_is_refused_in_one_line(root, bundle, kind, field):
    """A pod sandbox leaves the namespace out of its spec to share the host's; a VM cannot, and says so."""
    def host(config):
        config["annotations"] = {"io.kubernetes.cri.container-type": "sandbox"}
        config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != kind]
    result = pyrunv(root, "create", "--bundle", bundle("sleep", "60", edit=host), "pod")
    assert (result.returncode, result.stderr) == (1, f"pyrunv: pod sandbox pod: {field} cannot be honoured: a VM "
                                                     f"cannot share the host's {kind} namespace (linux.namespaces "
                                                     f"has no {kind} entry)\n")
    assert not os.path.exists(root / "pod")
