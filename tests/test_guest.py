"""The guest (kernel + agent) seen end to end through a real VM under TCG or KVM."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from faultlib import process_alive

pytestmark = pytest.mark.vm


def test_process_sees_its_spec_and_writes_through_a_bind_mount(runtime, bundle, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    script = ("env | sort; id; pwd; hostname; echo pid=$$; umask; ulimit -n; "
              "echo written-in-vm > /data/out.txt; exit 3")

    def edit(config):
        config["hostname"] = "guest-one"
        config["process"]["env"].append("GREETING=hello world")
        config["process"]["cwd"] = "/tmp"
        config["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 0o27}
        config["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 4321, "hard": 4321}]
        config["mounts"].append({"destination": "/data", "type": "bind", "source": str(shared),
                                 "options": ["rbind", "rw"]})
    path = bundle("sh", "-c", script, edit=edit)
    result = runtime("run", "--bundle", path, "guest1")
    out = result.stdout.decode().splitlines()
    assert result.returncode == 3, result.stderr
    assert "GREETING=hello world" in out
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in out
    assert "uid=1000 gid=1000 groups=10,20" in out
    assert out[-5:] == ["/tmp", "guest-one", "pid=1", "0027", "4321"]
    assert (shared / "out.txt").read_text() == "written-in-vm\n"
    assert runtime.leftovers() == []


def test_sigkill_reports_137(runtime, bundle):
    path = bundle("sh", "-c", "echo started; exec sleep 600")
    run = subprocess.Popen(runtime.argv("run", "--bundle", path, "killed"), stdout=subprocess.PIPE)
    assert run.stdout.readline() == b"started\n"
    runtime("kill", "killed", "KILL", check=True)
    assert run.wait(60) == 137
    assert runtime.leftovers() == []


def test_a_mebibyte_of_output_from_a_process_that_exits_at_once_arrives_whole(runtime, bundle):
    path = bundle("sh", "-c", "head -c 1048576 /dev/urandom > /tmp/data; md5sum < /tmp/data >&2; exec cat /tmp/data")
    result = runtime("run", "--bundle", path, "bulk")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == 1 << 20
    import hashlib
    assert hashlib.md5(result.stdout).hexdigest() == result.stderr.decode().split()[0]


def test_stdin_is_relayed_until_eof(runtime, bundle):
    path = bundle("sh", "-c", "wc -c; tr a-z A-Z < /dev/null")
    data = b"x" * 300_000
    result = runtime("run", "--bundle", path, "stdin", input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "300000"


def test_missing_executable_is_reported_by_create(runtime, bundle):
    path = bundle("no-such-program")
    result = runtime("create", "--bundle", path, "nothere")
    assert result.returncode == 1
    assert b"no-such-program" in result.stderr and b"not found" in result.stderr
    assert result.stderr.count(b"\n") == 1
    assert runtime.leftovers() == []


def test_the_kernel_build_is_cached():
    """A second run of the build returns at once and installs nothing."""
    build = os.path.join(os.path.dirname(os.path.dirname(__file__)), "kernel", "build.sh")
    result = subprocess.run([build], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "installed" not in result.stderr and "building" not in result.stderr


def test_capabilities_no_new_privileges_masked_readonly_paths_and_sysctl(runtime, bundle):
    script = ("grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status; "
              "cat /proc/kcore | wc -c; "
              "echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo sys-writable || echo sys-readonly; "
              "cat /proc/sys/net/ipv4/ip_forward; "
              "touch /newfile 2>/dev/null && echo root-writable || echo root-readonly; "
              "mount | grep -c ' /scratch type tmpfs'")

    def edit(config):
        config["root"]["readonly"] = True
        config["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1"}
        config["mounts"].append({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
                                 "options": ["nosuid", "size=1m"]})
    result = runtime("run", "--bundle", bundle("sh", "-c", script, edit=edit), "confined")
    assert result.returncode == 0, result.stderr
    caps = 1 << 5 | 1 << 10 | 1 << 29  # CAP_KILL, CAP_NET_BIND_SERVICE, CAP_AUDIT_WRITE: the spec's default
    assert result.stdout.decode().split("\n") == [
        f"CapEff:\t{caps:016x}", f"CapBnd:\t{caps:016x}", "NoNewPrivs:\t1",
        "0", "sys-readonly", "1", "root-readonly", "1", ""]


def test_seccomp_filters_the_init_and_every_exec_in_the_guest(runtime, bundle):
    """A filter with an errno rule and a rule on an argument's value, as the guest kernel applies them."""
    def filtered(config):
        config["linux"]["seccomp"] = {
            "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                         {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
                          "args": [{"index": 1, "value": 18, "op": "SCMP_CMP_EQ"}]}]}  # SIGCONT only
    script = ("grep Seccomp: /proc/self/status; mkdir /tmp/new; echo mkdir=$?; "
              "kill -CONT $$ 2>/dev/null; echo cont=$?; kill -0 $$; echo zero=$?")
    result = runtime("run", "--bundle", bundle("sh", "-c", script, edit=filtered), "init")
    assert result.stdout.decode().splitlines() == ["Seccomp:\t2", "mkdir=1", "cont=1", "zero=0"], result.stderr
    assert result.stderr == b"mkdir: can't create directory '/tmp/new': Permission denied\n"
    runtime.detached("run", "--detach", "--bundle", bundle("sleep", "600", edit=filtered), "execs")
    exec_ = runtime("exec", "execs", "sh", "-c", "grep Seccomp: /proc/self/status; mkdir /tmp/x")
    assert (exec_.returncode, exec_.stdout) == (1, b"Seccomp:\t2\n"), exec_.stderr
    assert exec_.stderr == b"mkdir: can't create directory '/tmp/x': Permission denied\n"


def test_the_guest_has_ipv6_a_bridge_and_netfilter(runtime, bundle):
    script = ("ip -6 addr show dev lo | grep -o '::1/128'; brctl addbr pod0 && ip link show pod0 | grep -o pod0; "
              "ls /proc/sys/net/netfilter | grep -c nf_conntrack_max")

    def net_admin(config):
        for kind in ("bounding", "effective", "permitted"):
            config["process"]["capabilities"][kind].append("CAP_NET_ADMIN")
    result = runtime("run", "--bundle", bundle("sh", "-c", script, edit=net_admin), "stack")
    assert (result.returncode, result.stdout) == (0, b"::1/128\npod0\n1\n"), result.stderr


def test_the_vm_ends_with_its_container(runtime, bundle, subreaper, tmp_path):
    pid_file = tmp_path / "pid"
    runtime.detached("create", "--bundle", bundle("sh", "-c", "exit 3"), "--pid-file", pid_file, "quick")
    helpers = json.loads((runtime.root / "quick" / "helpers.json").read_text())
    runtime("start", "quick", check=True)
    _, status = os.waitpid(int(pid_file.read_text()), 0)
    assert os.waitstatus_to_exitcode(status) == 3
    assert [pid for pid, start in helpers if process_alive(pid, start)] == [], "QEMU or virtiofsd outlived the monitor"
    runtime("delete", "quick", check=True)


def test_hooks_run_on_the_host_with_the_state_on_stdin(runtime, bundle, tmp_path):
    record = tmp_path / "hooks"
    record.mkdir()
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ncat > {record}/$1.json\n")
    hook.chmod(0o755)
    kinds = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")

    def edit(config):
        config["hooks"] = {k: [{"path": str(hook), "args": ["hook.sh", k]}] for k in kinds}
    path = bundle("true", edit=edit)
    result = runtime("run", "--bundle", path, "hooked")
    assert result.returncode == 0, result.stderr
    states = {k: json.loads((record / f"{k}.json").read_text()) for k in kinds}
    assert {s["id"] for s in states.values()} == {"hooked"}
    assert states["prestart"]["status"] == "created" and states["prestart"]["pid"] > 0
    assert states["poststart"]["status"] == "running"
    assert states["poststop"]["status"] == "stopped"


def test_a_failing_prestart_hook_fails_create_and_leaves_nothing(runtime, bundle):
    path = bundle("true", edit=lambda c: c.update(hooks={"prestart": [{"path": "/bin/false"}]}))
    result = runtime("create", "--bundle", path, "badhook")
    assert result.returncode == 1 and b"prestart hook /bin/false failed" in result.stderr
    assert runtime.leftovers() == []


def test_a_user_namespace_applies_the_specs_mappings(runtime, bundle):
    """As docker's userns-remap does: a rootfs owned by the mapped range, root inside, 100000 outside."""
    def edit(config):
        config["linux"]["namespaces"].append({"type": "user"})
        config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    path = bundle("sh", "-c", "id -u; cat /proc/self/uid_map; echo mine > /root/made", edit=edit)
    subprocess.run(["chown", "-R", "100000:100000", os.path.join(path, "rootfs")], check=True)
    result = runtime("run", "--bundle", path, "userns")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [b"0", b"0", b"100000", b"65536"]
    made = os.stat(os.path.join(path, "rootfs", "root", "made"))
    assert (made.st_uid, made.st_gid) == (100000, 100000)
    assert runtime.leftovers() == []


@pytest.mark.parametrize("kind, path, problem", [
    ("ipc", "/proc/self/ns/uts", "ipc namespace path /proc/self/ns/uts is a uts namespace"),
    ("pid", "/proc/self/ns/net", "pid namespace path /proc/self/ns/net is a network namespace"),
    ("uts", "/nonexistent", "uts namespace path /nonexistent: No such file or directory"),
])
def test_a_namespace_path_of_another_type_is_refused(runtime, bundle, kind, path, problem):
    def edit(config):
        for ns in config["linux"]["namespaces"]:
            if ns["type"] == kind:
                ns["path"] = path
    result = runtime.detached("create", "--bundle", bundle("true", edit=edit), "nstype", check=False)
    assert result.returncode == 1
    assert result.stderr.decode().strip() == f"pyrunv: invalid config.json: {problem}"
    assert runtime.leftovers() == []


@pytest.mark.parametrize("kind, name", [("ipc", "ipc"), ("mount", "mnt"), ("pid", "pid"), ("uts", "uts")])
def test_a_namespace_path_no_container_of_a_vm_can_join_is_refused_not_ignored(runtime, bundle, kind, name):
    """The host's own namespace of the right kind: runc would join it; a container in a VM cannot."""
    def edit(config):
        config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != kind] + [
            {"type": kind, "path": f"/proc/self/ns/{name}"}]
    result = runtime.detached("create", "--bundle", bundle("true", edit=edit), "nsjoin", check=False)
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        f"pyrunv: container nsjoin: linux.namespaces {kind} path '/proc/self/ns/{name}' cannot be honoured: in a VM "
        "only the pid, ipc, uts namespaces of another container of the pod can be joined")
    assert runtime.leftovers() == []


@pytest.mark.parametrize("propagation, seen", [("shared", "flag"), ("private", ""), ("slave", ""),
                                               ("unbindable", "refused")])
def test_rootfs_propagation_is_the_roots_in_the_guest(runtime, bundle, propagation, seen):
    """runtime-tools' check: a mount made under the root shows in a bind of the root only if the root is
    shared; an unbindable root cannot be bound."""
    def edit(config):
        config["root"]["readonly"] = False
        config["linux"]["rootfsPropagation"] = propagation
        for kind in config["process"]["capabilities"].values():
            kind.append("CAP_SYS_ADMIN")
    script = ("mkdir -p /t /m /d && touch /d/flag && { mount -o rbind / /t || { echo refused; exit; }; } && "
              "mount -o bind /d /m && ls /t/m")
    result = runtime("run", "--bundle", bundle("sh", "-c", script, edit=edit), "prop")
    assert (result.returncode, result.stdout.strip()) == (0, seen.encode()), result.stderr


def test_tmpcopyup_fills_a_tmpfs_with_what_the_image_has_there(runtime, bundle):
    """podman's --tmpfs option, which runc and crun understand: owners, modes and links come along."""
    def edit(config):
        config["mounts"].append({"destination": "/etc", "type": "tmpfs", "source": "tmpfs",
                                 "options": ["nosuid", "nodev", "tmpcopyup", "mode=755"]})
    path = bundle("sh", "-c", "cat /etc/group; stat -c '%a %u' /etc/passwd; grep -c ' /etc tmpfs' /proc/mounts; "
                  "echo new > /etc/new", edit=edit)
    os.chmod(os.path.join(path, "rootfs", "etc", "passwd"), 0o640)
    os.chown(os.path.join(path, "rootfs", "etc", "passwd"), 7, 7)
    result = runtime("run", "--bundle", path, "copyup")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == ["root:x:0:", "nogroup:x:65534:", "640 7", "1"]
    assert not os.path.exists(os.path.join(path, "rootfs", "etc", "new")), "writes stay in the tmpfs"


REFUSED_HOSTNAME = r"^invalid config.json: hostname: 'a/b' does not match '\^\[\^\\\\u0000/\]\*\$'$"


def test_a_spec_only_the_schema_refuses_is_one_line_with_nothing_left(runtime, bundle):
    """A hostname the schema refuses parses well enough to plan the VM: create checks the schema while the VM
    boots (create.create), and ends it; the next test makes sure that QEMU runs by then."""
    result = runtime("run", "--bundle", bundle("true", edit=lambda c: c.update(hostname="a/b")), "refused")
    assert result.returncode == 1
    assert re.match(REFUSED_HOSTNAME, result.stderr.decode().removeprefix("pyrunv: ").strip())
    assert runtime.leftovers() == []


def test_a_schema_check_that_fails_once_qemu_runs_leaves_nothing_behind(runtime, bundle):
    """The check waits until QEMU runs (helpers.json is written then), and only then fails. create runs in a
    process of its own, single-threaded as the CLI is: a fork of this one would carry its threads (gRPC's)."""
    script = textwrap.dedent("""
        import os, sys, time
        from pyrunv.oci import spec
        from pyrunv.state import store as state
        from pyrunv.runtime import create
        from pyrunv.errors import PyrunvError
        root, bundle = sys.argv[1:]
        check = spec.validate

        def once_qemu_runs(document, what="config.json"):
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(root, "refused", "helpers.json")):
                if time.monotonic() > deadline:
                    sys.exit("QEMU did not start")
                time.sleep(0.01)
            check(document, what)
        spec.validate = once_qemu_runs
        try:
            create.create(state.Store(root), "refused", bundle, None, None)
        except PyrunvError as e:
            print(e)
    """)
    path = bundle("true", edit=lambda c: c.update(hostname="a/b"))
    result = subprocess.run([sys.executable, "-c", script, str(runtime.root), str(path)], capture_output=True,
                            text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert re.match(REFUSED_HOSTNAME, result.stdout.strip()), result.stderr
    assert runtime.leftovers() == []
