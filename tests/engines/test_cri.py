"""Kubernetes pods through containerd's CRI plugin (runtime.v1, as the kubelet speaks it), on the runtime handler
the `cri` fixture names ($PYRUNV_CRI_HANDLER: pyrunv by default, or runc to check the tests themselves).

A pod is one sandbox (the pause image) and the containers created in it; they share the network namespace, so
the pod's IP, and the hostname. With pyrunv, a pod is one VM."""
import ipaddress
import os
import re

import grpc
import pytest

from conftest import CRI_SUBNET, vm_processes, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.vm]

SLEEP = "while :; do sleep 1; done"
IGNORE_TERM = "trap '' TERM; echo ready; while :; do sleep 0.1; done"
LOG_LINE = re.compile(r"^(\S+) (stdout|stderr) ([FP]) (.*)$")


class Pod:
    def __init__(self, cri, id, config, logs):
        self.cri, self.id, self.config, self.logs = cri, id, config, logs

    def run(self, name, *command):
        """Runs `sh -c COMMAND...` as container `name` (busybox); returns its ID once it runs or has run."""
        cid = self.cri.run_container(self.id, self.config, name, "sh", "-c", *command)
        assert wait_for(lambda: self.cri.container_status(cid)[0] in ("running", "exited"), timeout=60), \
            self.cri.container_status(cid)
        return cid

    def log(self, cid):
        """The container's log file, parsed: [(stream, tag, text)]."""
        path = self.cri.container_status(cid)[2]
        path = path if os.path.isabs(path) else os.path.join(self.logs, path)
        if not os.path.exists(path):
            return []
        with open(path) as f:
            lines = f.read().splitlines()
        parsed = [LOG_LINE.match(line) for line in lines]
        assert all(parsed), lines
        return [m.group(2, 3, 4) for m in parsed]

    def wait_exited(self, cid, timeout=60):
        assert wait_for(lambda: self.cri.container_status(cid)[0] == "exited", timeout=timeout), \
            self.cri.container_status(cid)
        return self.cri.container_status(cid)[1]


def qemus(cri):
    """This containerd's QEMU processes (each has pyrunv's agent port in its arguments)."""
    return [line for line in vm_processes(cri.top) if "pyrunv.agent" in line]


def gone(cri, ids):
    """What is left of the pod and container `ids` after RemovePodSandbox: list entries, runtime and containerd
    state directories, mounts naming them. Empty if nothing."""
    left = [i for i in cri.pods() + cri.containers() if i in ids]
    dirs = [cri.runtime_root, cri.top / "state" / "io.containerd.runtime.v2.task" / "k8s.io",
            cri.top / "root" / "io.containerd.grpc.v1.cri" / "sandboxes",
            cri.top / "root" / "io.containerd.grpc.v1.cri" / "containers",
            cri.top / "state" / "io.containerd.grpc.v1.cri" / "sandboxes",
            cri.top / "state" / "io.containerd.grpc.v1.cri" / "containers"]
    left += [str(d / i) for d in dirs for i in ids if (d / i).exists()]
    with open("/proc/self/mountinfo") as f:
        left += [line for line in f.read().splitlines() if any(i in line for i in ids)]
    return left


@pytest.fixture
def make_pod(cri, name, tmp_path):
    """make_pod(suffix="") runs a pod named after the test, logging into tmp_path/logs-SUFFIX; returns a Pod.
    Afterwards the pods are stopped and removed."""
    pods = []

    def make(suffix="", cgroup_parent=""):
        logs = tmp_path / f"logs{suffix}"
        logs.mkdir()
        config = cri.pod_config(f"{name}{suffix}"[:63], hostname=f"pod{suffix}-{os.getpid()}",
                                log_directory=str(logs), cgroup_parent=cgroup_parent)
        pod = Pod(cri, cri.run_pod(config=config), config, str(logs))
        pods.append(pod)
        return pod

    yield make
    for pod in pods:
        if pod.id in cri.pods():
            cri.stop_pod(pod.id)
            cri.remove_pod(pod.id)


@pytest.fixture
def pod(make_pod):
    return make_pod()


@pytest.fixture
def pod_cgroup():
    """make(limit_mib) -> the cgroup_parent of a pod cgroup limited to limit_mib, as a kubelet makes one (the sum
    of the containers' limits, and no RuntimeClass overhead); removed once the test's pods are gone."""
    unified = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    made = []

    def make(limit_mib):
        parent = f"/pyrunv-test-pod-{os.getpid()}-{len(made)}"
        directory = ("/sys/fs/cgroup" if unified else "/sys/fs/cgroup/memory") + parent
        os.mkdir(directory)
        made.append(directory)
        with open(os.path.join(directory, "memory.max" if unified else "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit_mib << 20))
        return parent

    yield make
    for directory in made:
        assert wait_for(lambda: _rmdir(directory), timeout=30), f"{directory} still holds processes"


def _rmdir(directory):
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def test_pod_is_ready_with_an_ip(cri, pod):
    state, ip = cri.pod_status(pod.id)
    assert state == "ready"
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(CRI_SUBNET)
    assert cri.containers(pod.id) == []


def test_two_containers_and_exec_sync(cri, pod):
    first, second = pod.run("first", SLEEP), pod.run("second", SLEEP)
    assert sorted(cri.containers(pod.id)) == sorted([first, second])
    for cid in first, second:
        assert cri.container_status(cid)[0] == "running"
        assert cri.exec_sync(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"]) == ("out\n", "err\n", 3)
        assert cri.exec_sync(cid, ["true"]) == ("", "", 0)


def test_an_exec_sync_whose_timeout_runs_out_is_stopped_with_its_process(cri, pod):
    """containerd kills a timed-out exec's pid-file process, then waits for the exec's output to close; a
    Kubernetes exec probe relies on both. Had the output stayed open, the call would end at its own deadline
    (121 s) with gRPC's DEADLINE_EXCEEDED instead of containerd's timeout."""
    cid = pod.run("probed", SLEEP)
    with pytest.raises(grpc.RpcError) as timed_out:
        cri.exec_sync(cid, ["sleep", "600"], timeout=1)
    assert "timeout 1s exceeded" in timed_out.value.details(), timed_out.value
    assert wait_for(lambda: cri.exec_sync(cid, ["sh", "-c", "ps | grep -c '[s]leep 600'"])[0] == "0\n", timeout=30)


def test_exit_code_and_log(cri, pod):
    cid = pod.run("exits", "echo hello; echo oops >&2; exit 7")
    assert pod.wait_exited(cid) == 7
    state, code, path = cri.container_status(cid)
    assert path.endswith("exits.log")
    assert wait_for(lambda: len(pod.log(cid)) == 2, timeout=10), pod.log(cid)
    assert sorted(pod.log(cid)) == [("stderr", "F", "oops"), ("stdout", "F", "hello")]


@pytest.mark.slow
def test_stop_kills_a_process_that_ignores_term(cri, pod):
    cid = pod.run("stubborn", IGNORE_TERM)
    assert wait_for(lambda: ("stdout", "F", "ready") in pod.log(cid), timeout=30), pod.log(cid)
    cri.stop_container(cid, timeout=2)
    assert cri.container_status(cid)[:2] == ("exited", 137)


def test_stop_ends_a_process_that_exits_on_term(cri, pod):
    cid = pod.run("polite", "trap 'exit 0' TERM; echo ready; while :; do sleep 0.1; done")
    assert wait_for(lambda: ("stdout", "F", "ready") in pod.log(cid), timeout=30), pod.log(cid)
    cri.stop_container(cid, timeout=30)
    assert cri.container_status(cid)[:2] == ("exited", 0)
    cri.remove_container(cid)
    assert cri.containers(pod.id) == []


def test_containers_share_localhost(cri, pod):
    pod.run("server", "mkdir -p /www && echo hello from the pod >/www/index.html && "
                      "exec httpd -f -p 127.0.0.1:8080 -h /www")
    client = pod.run("client", SLEEP)
    fetch = ["timeout", "10", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/"]
    assert wait_for(lambda: cri.exec_sync(client, fetch, timeout=20)[2] == 0, timeout=60), \
        cri.exec_sync(client, fetch, timeout=20)
    assert cri.exec_sync(client, fetch, timeout=20) == ("hello from the pod\n", "", 0)


def test_pod_ip_and_hostname_in_both_containers(cri, pod):
    _, ip = cri.pod_status(pod.id)
    for cid in pod.run("first", SLEEP), pod.run("second", SLEEP):
        assert cri.exec_sync(cid, ["hostname"]) == (pod.config.hostname + "\n", "", 0)
        out, _, code = cri.exec_sync(cid, ["ip", "-4", "-o", "addr", "show"])
        assert code == 0
        addresses = re.findall(r"inet (\S+)/", out)
        assert ip in addresses and "127.0.0.1" in addresses, out


@pytest.mark.slow
def test_one_vm_per_pod(cri, make_pod):
    pods = [make_pod("-a"), make_pod("-b")]
    for pod in pods:
        pod.run("first", SLEEP)
        pod.run("second", SLEEP)
    ips = {cri.pod_status(pod.id)[1] for pod in pods}
    assert len(ips) == 2
    if cri.handler != "pyrunv":
        pytest.skip(f"QEMU count: the {cri.handler} handler runs no VMs")
    assert len(qemus(cri)) == 2, qemus(cri)
    cri.stop_pod(pods[0].id)
    cri.remove_pod(pods[0].id)
    assert wait_for(lambda: len(qemus(cri)) == 1, timeout=30), qemus(cri)


@pytest.mark.slow
def test_remove_pod_leaves_nothing_behind(cri, pod):
    netns = cri.pod_info(pod.id).get("runtimeSpec", {}).get("linux", {}).get("namespaces", [])
    netns = [ns["path"] for ns in netns if ns["type"] == "network" and ns.get("path")]
    cids = [pod.run("first", SLEEP), pod.run("second", "exit 0")]
    pod.wait_exited(cids[1])
    ids = [pod.id] + cids
    cri.stop_pod(pod.id)
    assert cri.pod_status(pod.id)[0] == "notready"
    assert all(cri.container_status(cid)[0] == "exited" for cid in cids)
    cri.remove_pod(pod.id)
    assert wait_for(lambda: not gone(cri, ids), timeout=30), gone(cri, ids)
    assert wait_for(lambda: not vm_processes(cri.top), timeout=30), vm_processes(cri.top)
    assert netns and not any(os.path.exists(path) for path in netns), netns


def test_a_pod_whose_cgroup_cannot_hold_a_vm_is_refused_in_one_line(cri, pod_cgroup, make_pod):
    """A kubelet limits a 64Mi pod's cgroup to 64 MiB when its RuntimeClass has no overhead: no VM fits."""
    if cri.handler != "pyrunv":
        pytest.skip(f"the {cri.handler} handler runs no VM to fit")
    with pytest.raises(grpc.RpcError) as refused:
        make_pod(cgroup_parent=pod_cgroup(64))
    assert "a memory limit of 64 MiB on the host cgroup is too small for a VM" in refused.value.details()
    assert qemus(cri) == []


def test_a_container_over_its_limit_is_oom_killed_in_the_pods_vm_and_restarts_there(cri, pod_cgroup, make_pod):
    """The pod's cgroup holds the VM; the container's own limit is its cgroup's in the guest. The guest's OOM
    killer takes the container, never the host's QEMU: containerd reports OOMKilled and 137, as with runc, and
    the pod keeps its VM and its IP."""
    pod = make_pod(cgroup_parent=pod_cgroup(64 + 160))  # 64 MiB of limits, and the overhead docs/kubernetes.md gives
    vms, ip = qemus(cri), cri.pod_status(pod.id)[1]
    cid = cri.run_container(pod.id, pod.config, "hungry", "dd", "if=/dev/zero", "of=/dev/null", "bs=96M", "count=1",
                            memory_limit=64 << 20)
    assert pod.wait_exited(cid) == 137
    assert cri.container_status_full(cid).status.reason == "OOMKilled"
    assert (qemus(cri), cri.pod_status(pod.id)) == (vms, ("ready", ip))
    again = cri.run_container(pod.id, pod.config, "hungry", "sh", "-c", "echo fed; exit 3", memory_limit=64 << 20,
                              attempt=1)
    assert pod.wait_exited(again) == 3
    assert ("stdout", "F", "fed") in pod.log(again) and qemus(cri) == vms


def test_update_container_resources_grows_the_pods_vm_beyond_its_boot_size(cri, pod):
    """A pod's VM boots with 128 MiB (no pod-level limits here); raising a member's limit to 400 MiB adds the
    memory its 300 MiB needs, as an in-place resize would."""
    cid = pod.run("grown", SLEEP)
    allocate = ("dd", "if=/dev/zero", "of=/dev/null", "bs=300M", "count=1")
    assert cri.exec_sync(cid, allocate)[2] != 0
    cri.update_memory(cid, 400 << 20)
    assert cri.exec_sync(cid, ("cat", "/sys/fs/cgroup/memory.max"))[0] == f"{400 << 20}\n"
    out, err, code = cri.exec_sync(cid, allocate)
    assert code == 0, err
