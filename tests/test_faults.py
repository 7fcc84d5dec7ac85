"""Faults: each piece of a container (QEMU, virtiofsd, the monitor) SIGKILLed in each state, a crashing
hypervisor, a guest kernel that panics at boot or at run time, and a VM that never becomes ready.

After every fault the container must read `stopped`, the engine waiting on the --pid-file process
must see it die, and a plain `delete` must leave no process, no mount and no directory."""
import itertools
import json
import os
import resource
import signal
import subprocess
import time

import pytest

from faultlib import COMPONENTS, DEADLINE, FAULT_MATRIX, STATES, describe_status, one_line_error, process_alive, \
    reap_zombie_children, wait_pid, wait_until

pytestmark = pytest.mark.vm

@pytest.fixture
def adopted(subreaper):
    """The subreaper, and at the end the reaping of whatever helpers we adopted when a monitor died."""
    yield
    reap_zombie_children()


@pytest.fixture
def no_core_dumps():
    """A hypervisor killed with SIGABRT or SIGSEGV must not drop a core file into the work tree."""
    saved = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, saved[1]))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, saved)


def status_of(runtime, container_id):
    result = runtime("state", container_id)
    return json.loads(result.stdout)["status"] if result.returncode == 0 else None


def pieces(runtime, container_id, pid_file):
    """{'qemu': (pid, start), 'virtiofsd': (pid, start), 'monitor': (pid, start)} of a live container."""
    state_dir = runtime.root / container_id
    with open(state_dir / "helpers.json") as f:
        (qemu, qemu_start), (virtiofsd, virtiofsd_start) = json.load(f)
    with open(state_dir / "state.json") as f:
        record = json.load(f)
    assert record["pid"] == int(pid_file.read_text())
    found = {"qemu": (qemu, qemu_start), "virtiofsd": (virtiofsd, virtiofsd_start),
             "monitor": (record["pid"], record["pid_start"])}
    for name, (pid, start) in found.items():
        assert process_alive(pid, start), f"{name} ({pid}) is not running before the fault"
    return found


def bring_to(runtime, bundle, tmp_path, container_id, wanted):
    pid_file = tmp_path / f"{container_id}.pid"
    runtime.detached("create", "--bundle", bundle("sleep", "600"), "--pid-file", pid_file, container_id)
    if wanted in ("running", "paused"):
        runtime("start", container_id, check=True)
    if wanted == "paused":
        runtime("pause", container_id, check=True)
    assert status_of(runtime, container_id) == wanted
    return pid_file


def assert_stopped_then_deleted(runtime, container_id):
    assert wait_until(lambda: status_of(runtime, container_id) == "stopped"), \
        f"state is {status_of(runtime, container_id)!r}, not stopped, {DEADLINE:g}s after the fault"
    # runc semantics: a stopped container is deleted without --force.
    runtime("delete", container_id, check=True)
    assert runtime.leftovers() == []
    assert not (runtime.root / container_id).exists()
    assert runtime("state", container_id).returncode == 1


@pytest.mark.parametrize("component,state", list(itertools.product(COMPONENTS, STATES)),
                         ids=[f"{c}-{s}" for c, s in itertools.product(COMPONENTS, STATES)])
def test_sigkill(runtime, bundle, tmp_path, adopted, component, state):
    container_id = f"{component}-{state}"
    pid_file = bring_to(runtime, bundle, tmp_path, container_id, state)
    found = pieces(runtime, container_id, pid_file)
    monitor_pid = found["monitor"][0]

    os.kill(found[component][0], signal.SIGKILL)

    status = wait_pid(monitor_pid)
    waiter = describe_status(status)
    after = wait_until(lambda: status_of(runtime, container_id) == "stopped") and "stopped"
    FAULT_MATRIX[(component, state)] = (waiter, after or status_of(runtime, container_id))
    # Every piece's death reads, to the engine, as the container being SIGKILLed (137).
    assert os.waitstatus_to_exitcode(status) != 0
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, waiter
    for name, (pid, start) in found.items():
        assert wait_until(lambda: not process_alive(pid, start)), f"{name} outlived the {component}'s death"
    assert_stopped_then_deleted(runtime, container_id)


@pytest.mark.parametrize("sig", [signal.SIGABRT, signal.SIGSEGV], ids=["SIGABRT", "SIGSEGV"])
def test_a_crashing_hypervisor(runtime, bundle, tmp_path, adopted, no_core_dumps, sig):
    container_id = f"crash-{sig.name.lower()}"
    pid_file = bring_to(runtime, bundle, tmp_path, container_id, "running")
    found = pieces(runtime, container_id, pid_file)
    os.kill(found["qemu"][0], sig)
    status = wait_pid(found["monitor"][0])
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, describe_status(status)
    assert_stopped_then_deleted(runtime, container_id)


def test_a_guest_kernel_panic_while_running(runtime, bundle, tmp_path, monkeypatch, adopted):
    """The guest kernel panics at run time (an OOM with vm.panic_on_oom=2): QEMU exits (-no-reboot).
    The OOM is the container's cgroup's, well inside the guest's RAM: a guest that runs out of memory as a
    whole can spin in reclaim under TCG for minutes before its OOM (1 run in 10 here, booted or loaded)."""
    write_config(tmp_path, monkeypatch, "guest_overhead_mib = 96\n")
    def edit(config):
        config["linux"]["sysctl"] = {"vm.panic_on_oom": "2"}
        config["linux"]["resources"] = {"memory": {"limit": 64 << 20}}
    path = bundle("sh", "-c", "echo started; a=x; while true; do a=$a$a; done", edit=edit)
    pid_file = tmp_path / "panic.pid"
    out = tmp_path / "panic.out"
    with open(out, "wb") as f:
        subprocess.run(runtime.argv("create", "--bundle", path, "--pid-file", pid_file, "panic"),
                       stdin=subprocess.DEVNULL, stdout=f, stderr=f, check=True, timeout=120)
    runtime("start", "panic", check=True)
    status = wait_pid(int(pid_file.read_text()), timeout=60)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, describe_status(status)
    assert b"started" in out.read_bytes()
    console = (runtime.root / "panic" / "console.log").read_bytes()
    assert b"Kernel panic" in console, console[-2000:]
    assert_stopped_then_deleted(runtime, "panic")


def write_config(tmp_path, monkeypatch, text):
    path = tmp_path / "pyrunv.toml"
    path.write_text(text)
    monkeypatch.setenv("PYRUNV_CONFIG", str(path))


def test_a_guest_kernel_that_panics_at_boot_fails_create(runtime, bundle, tmp_path, monkeypatch):
    """No init in the initrd: the kernel panics, QEMU exits, and create says so in one line."""
    write_config(tmp_path, monkeypatch, 'kernel_params = "rdinit=/nonexistent"\n')
    started = time.monotonic()
    result = runtime.detached("create", "--bundle", bundle("true"), "nopanic", check=False,
                              timeout=DEADLINE + 60)
    elapsed = time.monotonic() - started
    message = one_line_error(result)
    assert "qemu exited during boot" in message and "Kernel panic" in message, message
    assert elapsed < DEADLINE, f"create took {elapsed:.1f}s to notice the panic"
    assert runtime.leftovers() == []
    assert not (runtime.root / "nopanic").exists()


def test_a_vm_that_never_becomes_ready_fails_create(runtime, bundle, tmp_path, monkeypatch):
    """Never ready by construction, however fast the boot: no init, and a panic that halts (panic=0)
    instead of ending QEMU."""
    write_config(tmp_path, monkeypatch, 'boot_timeout = 2\nkernel_params = "rdinit=/nonexistent panic=0"\n')
    started = time.monotonic()
    result = runtime.detached("create", "--bundle", bundle("true"), "slow", check=False, timeout=DEADLINE + 60)
    elapsed = time.monotonic() - started
    message = one_line_error(result)
    assert "did not become ready within 2s" in message, message
    assert elapsed < DEADLINE
    assert runtime.leftovers() == []
    assert not (runtime.root / "slow").exists()
