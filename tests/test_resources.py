"""Resources through the CLI: the host cgroup of cgroupsPath, the guest cgroup's limits, OOM, `update`,
and the stats of `events`."""
import json
import os
import subprocess

import psutil
import pytest
from faultlib import DEADLINE, describe_status, one_line_error, wait_pid, wait_until

from pyrunv.host import cgroups

pytestmark = pytest.mark.vm
MIB = 1 << 20


def host_dir(controller, path):
    return os.path.join(cgroups.hierarchies()[controller], path.strip("/"))


def limited(memory=None, pids=None, path=None, binds=(), **more):
    """An edit for bundle(): the spec's limits, a cgroupsPath, binds of host directories (destination, source).
    The container's own cgroup is mounted as `spec` writes it, as runc's does."""
    def edit(config):
        resources = config["linux"].setdefault("resources", {})
        if memory:
            resources["memory"] = {"limit": memory}
        if pids:
            resources["pids"] = {"limit": pids}
        if path:
            config["linux"]["cgroupsPath"] = path
        config["mounts"] += [{"destination": d, "type": "bind", "source": str(s), "options": ["rbind"]} for d, s in binds]
        config.update(more)
    return edit


@pytest.fixture
def cgroup_path(request):
    path = f"pyrunv-tests/{os.getpid()}-{request.node.name[:40]}"
    yield path
    for controller in cgroups.hierarchies():
        for directory in (host_dir(controller, path), os.path.dirname(host_dir(controller, path))):
            try:
                os.rmdir(directory)
            except OSError:
                pass


def test_the_vms_host_processes_live_in_cgroups_path_and_it_goes_with_delete(runtime, bundle, cgroup_path):
    parent = host_dir("memory", os.path.dirname(cgroup_path))
    os.makedirs(parent, exist_ok=True)  # as an engine makes its parent cgroup
    path = bundle("sleep", "600", edit=limited(memory=64 * MIB, path=cgroup_path))
    runtime.detached("run", "--detach", "--bundle", path, "cg")
    monitor = psutil.Process(runtime.state("cg")["pid"])
    family = {monitor.pid} | {p.pid for p in monitor.children(recursive=True)}
    names = {psutil.Process(pid).name() for pid in family}
    assert any(n.startswith("qemu-system") for n in names) and "virtiofsd" in names, names
    with open(os.path.join(host_dir("memory", cgroup_path), "cgroup.procs")) as f:
        assert family <= {int(line) for line in f}
    with open(os.path.join(host_dir("memory", cgroup_path), "memory.limit_in_bytes")) as f:
        assert int(f.read()) == (64 + 32 + 128) * MIB, "the VM's RAM (limit + guest overhead) + host overhead"
    runtime("delete", "--force", "cg", check=True)
    assert not os.path.exists(host_dir("memory", cgroup_path))
    assert os.path.isdir(parent), "a cgroup the engine made stays"
    assert runtime.leftovers() == []


def test_a_process_beyond_the_memory_limit_is_oom_killed_and_events_says_so(runtime, bundle, subreaper, tmp_path):
    path = bundle("dd", "if=/dev/zero", "of=/dev/null", "bs=100M", "count=1", edit=limited(memory=64 * MIB))
    result = runtime("run", "--bundle", path, "--keep", "oom")
    assert result.returncode == 137, result.stderr
    events = runtime("events", "oom", check=True).stdout.decode().splitlines()
    assert [json.loads(line) for line in events] == [{"type": "oom", "id": "oom"}]
    runtime("delete", "oom", check=True)


def run_on_trigger(runtime, bundle, tmp_path, name, then, memory):
    """Runs a container that does `then` once the test creates go in the returned directory (its /t)."""
    trigger = tmp_path / "trigger"
    trigger.mkdir()
    script = f"until [ -e /t/go ]; do sleep 0.1; done; {then}; sleep 600"
    runtime.detached("run", "--detach", "--bundle",
                     bundle("sh", "-c", script, edit=limited(memory=memory, binds=[("/t", trigger)])), name)
    return trigger


def test_a_container_without_a_limit_that_fills_its_vm_is_oom_killed_and_the_vm_ends(runtime, bundle):
    """The containers' parent cgroup in the guest stops it, where the whole guest's reclaim could spin for
    minutes; the container still sees no limit of its own."""
    def may_read_the_kernel_log(config):
        for kind in config["process"]["capabilities"].values():
            kind.append("CAP_SYSLOG")
    filler = "(x=a; while :; do x=$x$x; done); echo $?; dmesg | grep -c 'Memory cgroup out of memory'"
    path = bundle("sh", "-c", f"cat /sys/fs/cgroup/memory.max; {filler}", edit=may_read_the_kernel_log)
    result = runtime("run", "--bundle", path, "fill", timeout=DEADLINE * 4)
    assert (result.returncode, result.stdout.split()) == (0, [b"max", b"137", b"1"]), (result.stdout, result.stderr)


def test_events_reports_an_oom_of_a_running_container(runtime, bundle, tmp_path):
    trigger = run_on_trigger(runtime, bundle, tmp_path, "oom2", "dd if=/dev/zero of=/dev/null bs=100M count=1",
                             64 * MIB)
    events = subprocess.Popen(runtime.argv("events", "--interval", "100ms", "oom2"), stdout=subprocess.PIPE)
    try:
        first = json.loads(events.stdout.readline())
        assert first["type"] == "stats" and first["data"]["memory"]["usage"]["limit"] == 64 * MIB
        (trigger / "go").touch()
        seen = []
        while not seen or seen[-1]["type"] != "oom":
            seen.append(json.loads(events.stdout.readline()))
        assert seen[-1] == {"type": "oom", "id": "oom2"}
        assert runtime.state("oom2")["status"] == "running", "the shell lives on; dd was the OOM killer's pick"
    finally:
        events.kill()
        events.wait()


def test_pids_limit_stops_a_fork_bomb_in_the_guest(runtime, bundle):
    # An inner shell forks until it cannot; the outer one counts what runs with builtins alone.
    bomb = ("sh -c 'while :; do sleep 600 & done'; "
            "n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo $n")
    path = bundle("sh", "-c", bomb, edit=limited(pids=10))
    before = len(psutil.pids())
    result = runtime("run", "--bundle", path, "bomb")
    assert result.returncode == 0 and b"can't fork" in result.stderr, result.stderr
    assert int(result.stdout.split()[-1]) <= 10
    assert abs(len(psutil.pids()) - before) < 10, "the host is untouched"


def guest_memory_max(runtime, container_id):
    return runtime("exec", container_id, "cat", "/sys/fs/cgroup/memory.max", check=True).stdout.strip()


def test_update_on_running_paused_and_stopped_containers(runtime, bundle, cgroup_path):
    path = bundle("sleep", "600", edit=limited(memory=128 * MIB, path=cgroup_path))
    runtime.detached("run", "--detach", "--bundle", path, "upd")
    limit_file = os.path.join(host_dir("memory", cgroup_path), "memory.limit_in_bytes")
    runtime("update", "--memory", "64m", "upd", check=True)
    assert guest_memory_max(runtime, "upd") == str(64 * MIB).encode()
    with open(limit_file) as f:
        assert int(f.read()) == (64 + 32 + 128) * MIB
    stats = json.loads(runtime("events", "--stats", "upd", check=True).stdout)
    assert stats["data"]["memory"]["usage"]["limit"] == 64 * MIB

    runtime("pause", "upd", check=True)
    runtime("update", "--memory", "100m", "--pids-limit", "50", "upd", check=True)
    runtime("resume", "upd", check=True)
    assert wait_until(lambda: guest_memory_max(runtime, "upd") == str(100 * MIB).encode())
    assert runtime("exec", "upd", "cat", "/sys/fs/cgroup/pids.max", check=True).stdout.strip() == b"50"

    runtime("update", "--memory", "-1", "upd", check=True)  # lifts the limit: the VM's boot size again
    assert guest_memory_max(runtime, "upd") == b"max"
    refused = runtime("update", "--memory", "64g", "upd")
    assert one_line_error(refused) == (f"pyrunv: cannot update upd: a memory limit of 65536 MiB needs a VM of 65568 "
                                       f"MiB, beyond the {MAX_MEMORY_MIB} MiB its VM can grow to (max_memory_mib)")
    runtime("kill", "upd", "KILL", check=True)
    assert wait_until(lambda: runtime.state("upd")["status"] == "stopped")
    assert "cannot update container upd in state stopped" in one_line_error(runtime("update", "--memory", "64m", "upd"))


def test_a_container_sees_its_own_cgroup_as_with_a_cgroup_namespace_and_update_changes_it(runtime, bundle):
    """What the JVM, Go, .NET and Node size their heaps and threads from."""
    path = bundle("sleep", "600", edit=lambda config: config["linux"].update(resources={
        "memory": {"limit": 96 * MIB}, "pids": {"limit": 40}, "cpu": {"quota": 50000, "period": 100000}}))
    runtime.detached("run", "--detach", "--bundle", path, "own")

    def read(name):
        return runtime("exec", "own", "cat", name, check=True).stdout.strip()
    assert read("/proc/self/cgroup") == b"0::/"
    assert (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/pids.max")) == (str(96 * MIB).encode(), b"40")
    assert read("/sys/fs/cgroup/cpu.max") == b"50000 100000"
    runtime("update", "--memory", "64m", "--cpu-quota", "100000", "own", check=True)
    assert (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/cpu.max")) == (str(64 * MIB).encode(),
                                                                                     b"100000 100000")


def test_a_cpu_quota_of_two_cpus_gives_the_guest_two_online_cpus(runtime, bundle):
    path = bundle("sh", "-c", "nproc; cat /sys/devices/system/cpu/online", edit=lambda config: config["linux"].update(
        resources={"cpu": {"quota": 200000, "period": 100000}}))
    result = runtime("run", "--bundle", path, "two")
    assert (result.returncode, result.stdout.split()) == (0, [b"2", b"0-1"]), result.stderr


MAX_VCPUS = min(16, os.cpu_count() or 1)  # the config's default max_vcpus: the host's cores
MAX_MEMORY_MIB = min(4096, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4 // MIB)


@pytest.mark.skipif(MAX_VCPUS < 2, reason="one core: a VM here may have one vCPU at most")
def test_update_brings_vcpus_online_up_to_the_vms_maximum_running_or_paused(runtime, bundle):
    path = bundle("sleep", "600", edit=lambda config: config["linux"].update(
        resources={"cpu": {"quota": 100000, "period": 100000}}))
    runtime.detached("run", "--detach", "--bundle", path, "grow")

    def online():
        return runtime("exec", "grow", "cat", "/sys/devices/system/cpu/online", check=True).stdout.strip()
    assert online() == b"0"
    runtime("update", "--cpu-quota", "200000", "grow", check=True)
    assert (online(), runtime("exec", "grow", "nproc", check=True).stdout.strip()) == (b"0-1", b"2")
    runtime("update", "--cpu-quota", "100000", "grow", check=True)
    assert online() == b"0"
    runtime("pause", "grow", check=True)
    runtime("update", "--cpu-quota", "200000", "grow", check=True)
    runtime("resume", "grow", check=True)
    assert wait_until(lambda: online() == b"0-1")
    if MAX_VCPUS < 16:
        refused = runtime("update", "--cpu-quota", str((MAX_VCPUS + 1) * 100000), "grow")
        assert one_line_error(refused).endswith(
            f"needs {MAX_VCPUS + 1} vCPUs, beyond the {MAX_VCPUS} its VM has (max_vcpus)")
    assert runtime("exec", "grow", "cat", "/sys/fs/cgroup/cpu.max", check=True).stdout.strip() == b"200000 100000"


@pytest.mark.skipif(MAX_MEMORY_MIB < 800, reason="max_memory_mib defaults to a quarter of the host's memory")
def test_update_adds_memory_beyond_the_boot_size_running_or_paused(runtime, bundle):
    path = bundle("sleep", "600", edit=limited(memory=128 * MIB))
    runtime.detached("run", "--detach", "--bundle", path, "more")

    def allocates(mib):
        return runtime("exec", "more", "dd", "if=/dev/zero", "of=/dev/null", f"bs={mib}M", "count=1").returncode == 0

    def total_mib():
        meminfo = runtime("exec", "more", "cat", "/proc/meminfo", check=True).stdout.split()
        return int(meminfo[meminfo.index(b"MemTotal:") + 1]) >> 10
    assert total_mib() < 160 and not allocates(400)
    runtime("update", "--memory", "512m", "more", check=True)
    assert total_mib() > 500 and guest_memory_max(runtime, "more") == str(512 * MIB).encode()
    assert allocates(400)
    runtime("update", "--memory", "128m", "more", check=True)  # the balloon takes the rest back
    assert total_mib() < 160
    runtime("pause", "more", check=True)
    runtime("update", "--memory", "768m", "more", check=True)
    runtime("resume", "more", check=True)
    assert total_mib() > 750 and allocates(700)


def test_events_stats_see_a_containers_memory_grow(runtime, bundle, tmp_path):
    trigger = run_on_trigger(runtime, bundle, tmp_path, "grow", "head -c 64m /dev/zero > /dev/shm/held; touch /t/done",
                             256 * MIB)

    def usage():
        return json.loads(runtime("events", "--stats", "grow", check=True).stdout)["data"]["memory"]["usage"]["usage"]
    idle = usage()
    (trigger / "go").touch()
    assert wait_until(lambda: (trigger / "done").exists(), timeout=DEADLINE * 2)
    grown = usage()
    assert 60 * MIB < grown - idle < 80 * MIB, (idle, grown)


@pytest.mark.parametrize("edit, problem", [
    (lambda c: c["linux"].update(cgroupsPath="../../escape"), "invalid cgroupsPath '../../escape'"),
    (lambda c: c["linux"].update(resources={"memory": {"limit": -7}}), "invalid linux.resources.memory.limit: -7"),
    (lambda c: c["linux"].update(resources={"pids": {"limit": 10 ** 30}}), "invalid linux.resources.pids.limit"),
])
def test_bad_limits_and_cgroup_paths_are_one_line(runtime, bundle, edit, problem):
    result = runtime.detached("create", "--bundle", bundle("true", edit=edit), "bad", check=False)
    assert problem in one_line_error(result)
    assert runtime.leftovers() == []


def test_update_of_an_unknown_container_is_one_line(runtime):
    assert one_line_error(runtime("update", "--memory", "64m", "nosuch")) == "pyrunv: container nosuch does not exist"


def test_a_pod_members_pid_file_process_goes_to_its_own_cgroup(runtime, bundle, cgroup_path, subreaper, tmp_path):
    sandbox = bundle("sleep", "600", edit=lambda c: c.setdefault("annotations", {}).update(
        {"io.kubernetes.cri.container-type": "sandbox"}))
    runtime.detached("run", "--detach", "--bundle", sandbox, "sb")
    member = bundle("sleep", "600", edit=limited(path=cgroup_path, annotations={
        "io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "sb"}))
    runtime.detached("create", "--bundle", member, "--pid-file", tmp_path / "m.pid", "m")
    waiter = int((tmp_path / "m.pid").read_text())
    with open(os.path.join(host_dir("pids", cgroup_path), "cgroup.procs")) as f:
        assert [int(line) for line in f] == [waiter]
    runtime("delete", "--force", "m", check=True)
    assert describe_status(wait_pid(waiter)) == "SIGKILL"
    assert not os.path.exists(host_dir("pids", cgroup_path))
