"""Isolation: root in the guest tries to reach host files through virtio-fs (`..`, absolute symlinks,
/proc tricks, a second mount of the share) and to write through a read-only bind mount; container IDs
try to leave --root; other users try to reach a container's state and control socket."""
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from faultlib import one_line_error, wait_until

pytestmark = pytest.mark.vm


@pytest.fixture
def host_secret():
    """A directory only the host has, outside every bundle: (its path, a token found only in it)."""
    directory = tempfile.mkdtemp(prefix="pyrunv-secret-", dir="/tmp")
    token = "host-only-" + secrets.token_hex(16)
    with open(os.path.join(directory, "secret.txt"), "w") as f:
        f.write(token + "\n")
    yield directory, token
    shutil.rmtree(directory)


def all_caps(config):
    """Root with every capability: no capabilities object means the process keeps them all."""
    del config["process"]["capabilities"]
    config["process"]["noNewPrivileges"] = False


def run_to_the_end(runtime, bundle_path, container_id, tmp_path, before_start=None):
    """create, (look at it), start, wait until stopped; returns the container's output."""
    out = tmp_path / f"{container_id}.out"
    with open(out, "wb") as f:
        subprocess.run(runtime.argv("create", "--bundle", bundle_path, container_id), stdin=subprocess.DEVNULL,
                       stdout=f, stderr=f, check=True, timeout=120)
    if before_start:
        before_start()
    runtime("start", container_id, check=True)
    assert wait_until(lambda: runtime.state(container_id)["status"] == "stopped", timeout=60)
    runtime("delete", container_id, check=True)
    assert runtime.leftovers() == []
    return out.read_text(errors="replace")


ESCAPES = r"""
for p in /../../../../{secret}/secret.txt /escape/secret.txt /escape-file /up/{secret}/secret.txt \
         /../beside.txt /../../beside.txt /rootfs/../beside.txt /proc/1/root/escape/secret.txt \
         /proc/1/root/../beside.txt /proc/self/root/../../{secret}/secret.txt /proc/self/cwd/../beside.txt; do
    echo "== cat $p"; cat "$p" 2>&1
done
echo "== readlink"; for l in /escape /escape-file /up; do readlink $l; done
echo "== realpath"; realpath /escape /up 2>&1
echo "== fds"; ls -l /proc/self/fd/ 2>&1
for f in /proc/self/fd/* /proc/1/fd/*; do echo "$f -> $(readlink $f)"; cat "$f/../beside.txt" 2>/dev/null; done
echo "== proc roots"; ls -la /proc/1/root/ /proc/1/cwd/ 2>&1
echo "== find"; find / -xdev -name 'secret*' 2>&1; find / -xdev -name 'beside*' 2>&1
echo "== mount the share again"; mkdir -p /mnt2
if mount -t virtiofs pyrunv /mnt2 2>&1; then
    ls -la /mnt2 2>&1; cat /mnt2/../beside.txt /mnt2/../../{secret}/secret.txt /mnt2/rootfs/escape/secret.txt 2>&1
    umount /mnt2
fi
echo "== mountinfo"; cat /proc/self/mountinfo
echo "== done"
"""


def test_the_guest_cannot_leave_its_root_through_virtio_fs(runtime, bundle, tmp_path, host_secret):
    secret_dir, token = host_secret
    script = ESCAPES.replace("{secret}", secret_dir.lstrip("/"))
    path = bundle("sh", "-c", script, edit=all_caps)
    rootfs = path / "rootfs"
    os.symlink(secret_dir, rootfs / "escape")                           # absolute: the host's /tmp/...
    os.symlink(os.path.join(secret_dir, "secret.txt"), rootfs / "escape-file")
    os.symlink("../../../../../../../../..", rootfs / "up")               # relative, far above the root
    (path / "beside.txt").write_text(token + "\n")                        # next to the rootfs, in the bundle
    output = run_to_the_end(runtime, path, "escape", tmp_path)
    assert "== done" in output, output[-3000:]
    assert token not in output
    assert secret_dir.lstrip("/") not in output.split("== find")[1].split("== mount")[0]
    # The absolute symlink resolves in the container's own root, where that path does not exist.
    assert "cat /escape/secret.txt\ncat: can't open '/escape/secret.txt': No such file or directory" in output


def test_a_readonly_bind_mount_stays_readonly_even_for_root_with_every_capability(runtime, bundle, tmp_path):
    source = tmp_path / "ro-source"
    source.mkdir()
    (source / "keep.txt").write_text("original\n")
    script = ("cat /data/keep.txt; "
              "echo changed > /data/keep.txt && echo WRITE1-OK || echo WRITE1-FAILED; "
              "mount -o remount,rw /data && echo REMOUNT-OK || echo REMOUNT-FAILED; "
              "grep ' /data ' /proc/self/mountinfo; "
              "echo changed > /data/keep.txt && echo WRITE2-OK || echo WRITE2-FAILED; "
              "touch /data/new && echo CREATE-OK || echo CREATE-FAILED; "
              "rm /data/keep.txt && echo UNLINK-OK || echo UNLINK-FAILED; echo END")

    def edit(config):
        all_caps(config)
        config["mounts"].append({"destination": "/data", "type": "bind", "source": str(source),
                                 "options": ["rbind", "ro"]})
    path = bundle("sh", "-c", script, edit=edit)

    def host_side_is_readonly():
        monitor = runtime.state("robind")["pid"]
        with open(f"/proc/{monitor}/mountinfo") as f:
            binds = [line.split() for line in f if "/robind/share/m" in line]
        assert binds and all("ro" in fields[5].split(",") for fields in binds), binds
    output = run_to_the_end(runtime, path, "robind", tmp_path, before_start=host_side_is_readonly)
    assert output.startswith("original\n") and "END" in output, output
    for refused in ("WRITE1", "WRITE2", "CREATE", "UNLINK"):
        assert f"{refused}-FAILED" in output, output
    assert "REMOUNT-OK" in output or "REMOUNT-FAILED" in output
    print(f"remount,rw in the guest: {'succeeded' if 'REMOUNT-OK' in output else 'refused'}; writes still fail")
    assert (source / "keep.txt").read_text() == "original\n"
    assert sorted(os.listdir(source)) == ["keep.txt"]


BAD_IDS = ["../x", "a/b", "..", ".", "/abs", "x/../..", "../../etc", "a\nb", "trailing\n", "", "x" * 1025]


@pytest.mark.parametrize("verb", ["create", "start", "state", "kill", "delete", "pause", "resume", "ps", "exec"])
def test_ids_that_try_to_leave_root_are_refused(runtime, bundle, tmp_path, verb):
    path = bundle("true")
    before = sorted(os.listdir(tmp_path))
    for bad in BAD_IDS:
        args = {"create": ("create", "--bundle", path, bad), "kill": ("kill", bad, "KILL"),
                "delete": ("delete", "--force", bad), "exec": ("exec", bad, "true")}.get(verb, (verb, bad))
        message = one_line_error(runtime(*args))
        assert "invalid container id format" in message, (verb, bad, message)
    assert sorted(os.listdir(tmp_path)) == before  # nothing made beside --root, e.g. by "../x"
    assert not runtime.root.exists() or os.listdir(runtime.root) == []


def test_state_is_private_to_root(runtime, bundle, tmp_path):
    base = tempfile.mkdtemp(prefix="pyrunv-perm-", dir="/tmp")  # other users may traverse it, unlike tmp_path
    try:
        os.chmod(base, 0o755)
        rt = type(runtime)(type(tmp_path)(base) / "root")
        rt.detached("create", "--bundle", bundle("sleep", "600"), "private")
        root_mode = stat.S_IMODE(os.stat(rt.root).st_mode)
        state_dir = rt.root / "private"
        dir_mode = stat.S_IMODE(os.stat(state_dir).st_mode)
        assert root_mode & 0o077 == 0, oct(root_mode)
        assert dir_mode & 0o077 == 0, oct(dir_mode)
        assert stat.S_ISSOCK(os.stat(state_dir / "monitor.sock").st_mode)
        # Even with a --root that an administrator made world-readable, the state directory keeps others out.
        os.chmod(rt.root, 0o755)
        probe = ("import socket, os, sys\n"
                 "d = sys.argv[1]\n"
                 "results = []\n"
                 "for what, act in (('connect', lambda: socket.socket(socket.AF_UNIX).connect(d + '/monitor.sock')),\n"
                 "                  ('list', lambda: os.listdir(d)),\n"
                 "                  ('read', lambda: open(d + '/state.json').read())):\n"
                 "    try:\n"
                 "        act(); results.append(what + ':allowed')\n"
                 "    except PermissionError:\n"
                 "        results.append(what + ':denied')\n"
                 "print(' '.join(results))\n")
        result = subprocess.run(["/usr/bin/python3", "-S", "-c", probe, str(state_dir)], user=65534, group=65534,
                                extra_groups=[], capture_output=True, text=True, timeout=30)
        assert result.stdout.split() == ["connect:denied", "list:denied", "read:denied"], result
        assert json.loads(rt("state", "private", check=True).stdout)["status"] == "created"
        rt("delete", "--force", "private", check=True)
        assert rt.leftovers() == []
    finally:
        subprocess.run([sys.executable, "-m", "pyrunv", "--root", os.path.join(base, "root"), "delete", "--force",
                        "private"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _status_field(pid, name):
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith(name + ":"))


def test_qemu_runs_unprivileged_under_seccomp_and_virtiofsd_in_its_sandbox(runtime, bundle, tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('qemu_user = "nobody"\n')
    monkeypatch.setenv("PYRUNV_CONFIG", str(config))
    runtime.detached("run", "--detach", "--bundle", bundle("sleep", "600"), "sandboxed")
    (qemu, _), (virtiofsd, _) = json.loads((runtime.root / "sandboxed" / "helpers.json").read_text())
    assert _status_field(qemu, "Uid").split()[0] == str(pwd.getpwnam("nobody").pw_uid)
    assert _status_field(qemu, "Seccomp") == "2"  # -sandbox on, elevateprivileges and spawn denied
    served_by = [int(p) for p in open(f"/proc/{virtiofsd}/task/{virtiofsd}/children").read().split()] or [virtiofsd]
    server = served_by[0]
    assert _status_field(server, "Seccomp") == "2"
    for ns in ("mnt", "pid", "net"):
        assert os.readlink(f"/proc/{server}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert runtime("exec", "sandboxed", "echo", "works").stdout == b"works\n"
    runtime("delete", "--force", "sandboxed", check=True)
    assert runtime.leftovers() == []
