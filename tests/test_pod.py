"""Pods through the CLI: a sandbox boots the VM, the pod's other containers join it (as containerd's CRI
marks them), each with runc's promises of its own."""
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading

import psutil
import pytest
from faultlib import DEADLINE, ConsoleSocket, describe_status, one_line_error, reaches_eof, read_until, wait_pid, \
    wait_until

pytestmark = pytest.mark.vm

TYPE, SANDBOX = "io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id"


def qemus(runtime):
    """The QEMUs started by the monitors of containers under the runtime's root."""
    found = []
    for name in os.listdir(runtime.root):
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            with open(runtime.root / name / "state.json") as f:
                monitor = psutil.Process(json.load(f)["pid"])
            found += [p.pid for p in monitor.children() if p.name().startswith("qemu-system")]
    return found


@pytest.fixture
def pod(runtime, bundle, tmp_path, subreaper):
    """A running sandbox "sb" (hostname pod-host); member(name, *args, share=(kinds)) creates a container
    in its VM and returns the pid of its pid-file process."""
    sandbox = bundle("sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done", edit=lambda c: (
        c.update(hostname="pod-host"), c.setdefault("annotations", {}).update({TYPE: "sandbox"})))
    runtime.detached("create", "--bundle", sandbox, "--pid-file", tmp_path / "sb.pid", "sb")
    runtime("start", "sb", check=True)
    sandbox_pid = int((tmp_path / "sb.pid").read_text())

    def member(name, *args, share=("ipc", "uts"), edit=None, check=True, stdout=None, console_socket=None):
        def mark(config):
            config.setdefault("annotations", {}).update({TYPE: "container", SANDBOX: "sb"})
            config.pop("hostname", None)
            for ns in config["linux"]["namespaces"]:
                if ns["type"] in share or ns["type"] == "network":
                    ns["path"] = f"/proc/{sandbox_pid}/ns/{ns['type'] if ns['type'] != 'network' else 'net'}"
            if edit:
                edit(config)
        path = bundle(*args, edit=mark)
        pid_file = tmp_path / f"{name}.pid"
        out = open(tmp_path / f"{name}.out", "w+b") if stdout is None else stdout
        console = ["--console-socket", console_socket] if console_socket else []
        result = subprocess.run(runtime.argv("create", "--bundle", path, "--pid-file", pid_file, *console, name),
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL, timeout=DEADLINE * 2)
        if not check:
            out.seek(0)
            result.stderr = out.read()
            return result
        assert result.returncode == 0, (tmp_path / f"{name}.out").read_bytes()
        return int(pid_file.read_text())
    member.sandbox_pid = sandbox_pid
    member.output = lambda name: (tmp_path / f"{name}.out").read_bytes()
    return member


def test_a_container_of_a_pod_runs_in_the_sandboxs_vm(runtime, pod):
    pid = pod("app", "sh", "-c", "echo hello from $(hostname); exit 3")
    assert len(qemus(runtime)) == 1
    state = runtime.state("app")
    assert (state["status"], state["pid"]) == ("created", pid)
    runtime("start", "app", check=True)
    assert os.waitstatus_to_exitcode(wait_pid(pid)) == 3
    assert pod.output("app") == b"hello from pod-host\n"
    assert runtime.state("app")["status"] == "stopped"
    assert runtime.state("sb")["status"] == "running", "the VM stays while the sandbox exists"
    runtime("delete", "app", check=True)
    assert runtime.state("sb")["status"] == "running"
    assert len(qemus(runtime)) == 1


def test_containers_of_a_pod_reach_each_other_on_localhost(runtime, pod):
    server = pod("server", "httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/etc")
    runtime("start", "server", check=True)
    client = pod("client", "sh", "-c", "for i in $(seq 100); do "
                 "timeout 5 wget -q -O - http://127.0.0.1:8080/passwd && exit 0; sleep 0.2; done; exit 1")
    runtime("start", "client", check=True)
    assert describe_status(wait_pid(client, DEADLINE * 2)) == "exit 0"
    assert pod.output("client").startswith(b"root:x:0:0:")
    runtime("kill", "server", "KILL", check=True)
    assert describe_status(wait_pid(server)) == "SIGKILL"


def test_namespaces_are_shared_as_the_spec_asks(runtime, pod):
    """UTS and IPC shared by path, the PID namespace only when the spec points at the sandbox's."""
    own = pod("own", "sh", "-c", "echo $$ $(hostname)", share=("uts",))
    shared = pod("shared", "sh", "-c", "echo $$; ps -o comm | grep -c '^sh'", share=("uts", "pid"))
    runtime("start", "own", check=True)
    runtime("start", "shared", check=True)
    assert describe_status(wait_pid(own)) == describe_status(wait_pid(shared)) == "exit 0"
    assert pod.output("own").split() == [b"1", b"pod-host"], "its own PID namespace, the pod's hostname"
    pid, sh_count = pod.output("shared").split()
    assert pid != b"1" and int(sh_count) >= 2, "the sandbox's sh is visible beside its own"


def test_exec_ps_kill_all_and_stats_act_on_one_container_only(runtime, pod):
    app = pod("app", "sh", "-c", "sleep 600 & sleep 600 & wait")
    runtime("start", "app", check=True)
    assert wait_until(lambda: len(json.loads(runtime("ps", "--format", "json", "app", check=True).stdout)) == 3)
    assert sandbox_processes(runtime) in (1, 2)  # its sh, and its sleep 1 when one runs: none of app's three
    result = runtime("exec", "app", "sh", "-c", "hostname; exit 4")
    assert (result.returncode, result.stdout) == (4, b"pod-host\n")
    event = json.loads(runtime("events", "--stats", "app", check=True).stdout)
    assert event["data"]["pids"]["current"] == 3
    runtime("kill", "--all", "app", "KILL", check=True)
    assert describe_status(wait_pid(app)) == "SIGKILL"
    assert runtime.state("sb")["status"] == "running"
    assert sandbox_processes(runtime) in (1, 2)


def sandbox_processes(runtime):
    return len(json.loads(runtime("ps", "--format", "json", "sb", check=True).stdout))


def test_pause_of_a_member_freezes_only_it(runtime, pod, tmp_path):
    app = pod("app", "sh", "-c", "while true; do echo tick; sleep 0.1; done")
    runtime("start", "app", check=True)
    assert wait_until(lambda: pod.output("app"))
    runtime("pause", "app", check=True)
    assert runtime.state("app")["status"] == "paused"
    frozen = pod.output("app")
    assert wait_until(lambda: runtime("exec", "sb", "true").returncode == 0), "the sandbox still runs"
    assert pod.output("app") == frozen
    runtime("resume", "app", check=True)
    assert wait_until(lambda: len(pod.output("app")) > len(frozen))
    runtime("kill", "app", "KILL", check=True)
    wait_pid(app)


def test_deleting_the_sandbox_ends_every_container_of_the_pod(runtime, pod):
    first = pod("first", "sleep", "600")
    second = pod("second", "sleep", "600")
    runtime("start", "first", check=True)
    runtime("delete", "--force", "sb", check=True)
    for pid in (first, second):
        assert describe_status(wait_pid(pid)) == "SIGKILL"
    assert runtime.state("first")["status"] == runtime.state("second")["status"] == "stopped"
    delete_leaving_nothing(runtime, "first", "second")


def delete_leaving_nothing(runtime, *names):
    for name in names:
        runtime("delete", name, check=True)
    assert runtime.leftovers() == []


def test_a_sigkill_of_qemu_ends_every_container_with_a_correct_state(runtime, pod):
    app = pod("app", "sleep", "600")
    runtime("start", "app", check=True)
    [qemu_pid] = qemus(runtime)
    os.kill(qemu_pid, signal.SIGKILL)
    assert describe_status(wait_pid(app)) == "SIGKILL"
    assert wait_until(lambda: runtime.state("sb")["status"] == "stopped")
    assert runtime.state("app")["status"] == "stopped"
    delete_leaving_nothing(runtime, "app", "sb")


def test_a_member_whose_waiter_is_killed_ends_with_everything_in_it(runtime, pod):
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as out:
        app = pod("app", "sh", "-c", "echo started; sleep 600 & sleep 600 & wait", share=("pid", "ipc", "uts"),
                  stdout=out)
    runtime("start", "app", check=True)
    assert read_until(read_end, b"started\n") == b"started\n"
    os.kill(app, signal.SIGKILL)
    wait_pid(app)
    assert reaches_eof(read_end), "the member's output stayed open"
    os.close(read_end)
    assert wait_until(lambda: b"sleep 600" not in runtime("exec", "sb", "ps", check=True).stdout), \
        "the member's processes outlived its waiter"
    assert runtime.state("sb")["status"] == "running"


def test_a_member_sees_its_own_cgroup_not_the_sandboxs(runtime, pod):
    pod("app", "sleep", "600", edit=lambda config: config["linux"].update(resources={"memory": {"limit": 80 << 20}}))
    runtime("start", "app", check=True)
    for name, limit in (("app", str(80 << 20).encode()), ("sb", b"max")):
        assert runtime("exec", name, "cat", "/sys/fs/cgroup/memory.max", check=True).stdout.strip() == limit
        assert runtime("exec", name, "cat", "/proc/self/cgroup", check=True).stdout.strip() == b"0::/"


def in_pod_netns(pod, *argv):
    """argv run on the host in the pod's network namespace, where containerd's port-forward dials."""
    return subprocess.run(["nsenter", f"--net=/proc/{pod.sandbox_pid}/ns/net", *argv], capture_output=True,
                          timeout=DEADLINE)


def test_the_pods_localhost_on_the_host_reaches_the_guests_on_any_port(runtime, pod):
    in_pod_netns(pod, "ip", "link", "set", "lo", "up")  # as CNI's loopback plugin leaves it
    pod("web", "sh", "-c", "mkdir /tmp/www && echo hello from port 8080 > /tmp/www/index.html && "
        "exec httpd -f -p 8080 -h /tmp/www")
    runtime("start", "web", check=True)
    url = ["busybox", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"]
    assert wait_until(lambda: in_pod_netns(pod, *url).stdout == b"hello from port 8080\n")  # once httpd listens
    refused = in_pod_netns(pod, "busybox", "wget", "-q", "-O", "-", "http://127.0.0.1:8081/")
    assert (refused.returncode, refused.stdout) == (1, b"")  # at once: the client hears the guest's refusal
    assert runtime.state("sb")["status"] == "running"


@pytest.fixture
def shared_volume(tmp_path):
    """A host directory that is a shared mount of its own, as the kubelet makes a Bidirectional volume."""
    path = tmp_path / "volume"
    path.mkdir()
    subprocess.run(["mount", "--bind", path, path], check=True)
    subprocess.run(["mount", "--make-rshared", path], check=True)
    yield path
    subprocess.run(["umount", "--recursive", "--lazy", path], check=True)


def test_a_mount_under_an_rshared_bind_reaches_the_host_and_so_does_its_unmount(runtime, pod, shared_volume):
    def bidirectional(config):
        config["mounts"].append({"destination": "/data", "type": "bind", "source": str(shared_volume),
                                 "options": ["rbind", "rshared"]})
        for kind in config["process"]["capabilities"].values():
            kind.append("CAP_SYS_ADMIN")
    pod("app", "sleep", "600", edit=bidirectional)
    runtime("start", "app", check=True)
    runtime("exec", "app", "sh", "-c", "mkdir /data/etc && mount --bind /etc /data/etc", check=True)
    assert sorted(os.listdir(shared_volume / "etc")) == ["group", "passwd"]  # the container's /etc
    runtime("exec", "app", "umount", "/data/etc", check=True)
    assert os.listdir(shared_volume / "etc") == []
    # A tmpfs has nothing on the host to bind: it stays the guest's, and the host's directory stays empty.
    runtime("exec", "app", "sh", "-c", "mount -t tmpfs none /data/etc && touch /data/etc/in-tmpfs", check=True)
    assert os.listdir(shared_volume / "etc") == []


def test_deleting_a_member_removes_only_it(runtime, pod):
    app = pod("app", "sleep", "600")
    runtime("start", "app", check=True)
    runtime("delete", "--force", "app", check=True)
    assert describe_status(wait_pid(app)) == "SIGKILL"
    with open("/proc/mounts") as f:
        assert "/app/" not in f.read()
    assert runtime.state("sb")["status"] == "running"
    again = pod("app", "sh", "-c", "exit 5")  # the ID, and its place in the share, are free again
    runtime("start", "app", check=True)
    assert describe_status(wait_pid(again)) == "exit 5"


def test_members_created_at_once_are_safe_against_each_other(runtime, pod):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        pids = list(pool.map(lambda i: pod(f"c{i}", "sh", "-c", f"exit {i}"), range(4)))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: runtime("start", f"c{i}", check=True), range(4)))
    assert [describe_status(wait_pid(pid)) for pid in pids] == [f"exit {i}" for i in range(4)]
    assert len(qemus(runtime)) == 1


def test_a_read_only_bind_stays_read_only_in_a_member(runtime, pod, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    bind = {"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind", "ro"]}
    app = pod("app", "sh", "-c", "touch /data/x 2>/dev/null && exit 1; ls /data; exit 0",
              edit=lambda c: c["mounts"].append(bind))
    (data / "seen").write_text("")
    runtime("start", "app", check=True)
    assert describe_status(wait_pid(app)) == "exit 0"
    assert pod.output("app") == b"seen\n"
    assert os.listdir(data) == ["seen"]


@pytest.mark.parametrize("sandbox, problem", [
    ("nosuch", "pod sandbox 'nosuch': container nosuch does not exist"),
    ("../escape", "invalid container id format"),
])
def test_a_member_of_a_sandbox_that_is_not_there_fails_in_one_line(runtime, bundle, sandbox, problem):
    path = bundle("true", edit=lambda c: c.setdefault("annotations", {}).update({TYPE: "container", SANDBOX: sandbox}))
    result = runtime.detached("create", "--bundle", path, "app", check=False)
    assert problem in one_line_error(result)
    assert runtime.leftovers() == []


def test_a_members_invalid_spec_gets_the_same_line_from_the_pods_monitor(runtime, pod, bundle):
    """The pod's monitor validates its containers' specs (its jsonschema is loaded already): same words."""
    def bad(config):
        config["process"]["args"] = "not a list"
    alone = runtime.detached("create", "--bundle", bundle("true", edit=bad), "alone", check=False)
    expected = "pyrunv: invalid config.json: process.args: 'not a list' is not of type 'array'"
    assert one_line_error(alone) == expected
    assert one_line_error(pod("app", "true", edit=bad, check=False)) == expected
    assert sorted(os.listdir(runtime.root)) == ["sb"]
    assert runtime.state("sb")["status"] == "running"


def test_a_member_of_a_paused_or_stopped_sandbox_fails_in_one_line(runtime, pod):
    runtime("pause", "sb", check=True)
    assert "pod sandbox sb is paused" in one_line_error(pod("app", "true", check=False))
    runtime("resume", "sb", check=True)
    runtime("kill", "sb", "KILL", check=True)
    assert wait_until(lambda: runtime.state("sb")["status"] == "stopped")
    assert "pod sandbox sb is stopped" in one_line_error(pod("app", "true", check=False))
    assert not (runtime.root / "app").exists()


def test_a_member_with_a_terminal_gets_its_pty_over_the_console_socket(runtime, pod, tmp_path):
    console = ConsoleSocket(tmp_path / "console.sock")
    result = {}

    def create():
        result["pid"] = pod("term", "sh", edit=lambda c: c["process"].update(terminal=True),
                            console_socket=console.path)
    creating = threading.Thread(target=create)
    creating.start()
    master = console.master()
    creating.join(120)
    runtime("start", "term", check=True)
    os.write(master, b"tty; hostname; exit 3\n")
    assert b"pod-host" in read_until(master, b"pod-host\r\n")
    assert describe_status(wait_pid(result["pid"])) == "exit 3"


def iptables_tree(directory):
    """The host's iptables-nft with its libraries and extensions under directory (lib, lib64, usr), to bind into
    a busybox container: an image with iptables, made without a registry."""
    program = "/usr/sbin/xtables-nft-multi"
    libraries = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    for path in [program] + [p for p in libraries.split() if p.startswith("/")]:
        target = directory / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), target)
    extensions = "/usr/lib/x86_64-linux-gnu/xtables"
    shutil.copytree(extensions, directory / extensions.lstrip("/"))
    return [{"destination": f"/{top}", "type": "bind", "source": str(directory / top), "options": ["rbind", "ro"]}
            for top in ("lib", "lib64", "usr") if (directory / top).exists()]


def test_an_init_containers_iptables_redirect_holds_for_the_pods_other_containers(runtime, pod, tmp_path):
    """A service mesh's init container redirects the pod's port 80 to its proxy's 15001 with iptables (here
    iptables-nft, through nftables' compatibility); the pod's containers share the VM's network stack."""
    binds = iptables_tree(tmp_path / "iptables")

    def mesh(config):
        config["mounts"] += binds
        for kind in ("bounding", "effective", "permitted"):
            config["process"]["capabilities"][kind].append("CAP_NET_ADMIN")
    init = pod("mesh-init", "/usr/sbin/xtables-nft-multi", "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
               "--dport", "80", "-j", "REDIRECT", "--to-ports", "15001", edit=mesh)
    runtime("start", "mesh-init", check=True)
    assert describe_status(wait_pid(init)) == "exit 0", pod.output("mesh-init")
    app = pod("app", "sh", "-c", "mkdir /www; echo proxied > /www/index.html; httpd -p 15001 -h /www; "
              "wget -qO- http://127.0.0.1/")
    runtime("start", "app", check=True)
    assert describe_status(wait_pid(app)) == "exit 0", pod.output("app")
    assert pod.output("app") == b"proxied\n"
