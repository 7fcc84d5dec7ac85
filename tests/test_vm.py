"""The VM as a first-class entity: `check`, `qmp`, `console`, `display`, devices, snapshots' refusal."""
import json
import os
import socket
import subprocess
import sys

import pytest
from faultlib import one_line_error, wait_until

pytestmark = pytest.mark.vm


def test_check_names_kvm_and_the_accelerator_and_passes(runtime):
    result = runtime("check", "--json")
    lines = {line["name"]: line for line in json.loads(result.stdout)}
    assert result.returncode == 0, result.stdout
    assert not [line for line in lines.values() if line["level"] == "fail"]
    assert {"config", "qemu", "virtiofsd", "guest", "kvm", "tcg", "accelerator", "tun", "vhost-net", "vhost-vsock",
            "cgroups", "memfd", "checkpoint", "templates"} <= set(lines)
    assert lines["templates"]["level"] == "ok"  # Debian 12 and 13 both start VMs from templates
    accelerator = lines["accelerator"]["detail"]
    assert accelerator in ("containers run under KVM", "containers run under TCG")
    if accelerator.endswith("TCG"):  # this kind of machine: a PVM KVM that boots no standard guest
        assert lines["kvm"]["level"] == "warning"


def test_check_fails_when_qemu_is_missing(runtime, tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('qemu = "/nonexistent/qemu-system-x86_64"\n')
    monkeypatch.setenv("PYRUNV_CONFIG", str(config))
    result = runtime("check")
    assert result.returncode == 1
    assert "fail    qemu: /nonexistent/qemu-system-x86_64: No such file or directory" in result.stdout.decode()


def test_qmp_reaches_the_vm_running_and_paused(runtime, bundle):
    runtime.detached("run", "--detach", "--bundle", bundle("sleep", "600"), "vm1")
    assert json.loads(runtime("qmp", "vm1", "query-status", check=True).stdout)["status"] == "running"
    runtime("pause", "vm1", check=True)
    assert json.loads(runtime("qmp", "vm1", "query-status", check=True).stdout)["status"] == "paused"
    runtime("resume", "vm1", check=True)
    size = json.loads(runtime("qmp", "vm1", "query-memory-size-summary", check=True).stdout)
    most = min(4096 << 20, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)  # max_memory_mib's default
    assert size["base-memory"] == most  # what `update` may grow it to; its kernel has the configured 128 MiB
    assert b" mem=128M " in runtime("exec", "vm1", "cat", "/proc/cmdline", check=True).stdout
    assert one_line_error(runtime("qmp", "vm1", "no-such-command")) == \
        "pyrunv: qmp: no-such-command: The command no-such-command has not been found"
    assert one_line_error(runtime("qmp", "vm1", "query-status", "[1]")) == \
        "pyrunv: qmp: arguments must be a JSON object"


def test_qmp_without_a_command_is_qemu_qmps_shell(runtime, bundle):
    runtime.detached("run", "--detach", "--bundle", bundle("sleep", "600"), "shell")
    result = runtime("qmp", "shell", input=b"query-status\nquery-name\n", check=True)
    assert b'"status": "running"' in result.stdout, result.stdout


def test_console_shows_the_guest_kernels_log(runtime, bundle):
    runtime.detached("run", "--detach", "--bundle", bundle("sleep", "600"), "vm2")
    text = runtime("console", "vm2", check=True).stdout.decode()
    assert "Linux version 6." in text, text[-2000:]


@pytest.mark.parametrize("verb", [["qmp", "{}", "query-status"], ["display", "{}"], ["console", "{}"]])
def test_the_vm_of_an_unknown_or_stopped_container_is_one_line(runtime, bundle, verb):
    argv = [arg.format("nosuch") for arg in verb]
    assert one_line_error(runtime(*argv)) == "pyrunv: container nosuch does not exist"
    runtime.detached("run", "--detach", "--bundle", bundle("true"), "done")
    assert wait_until(lambda: runtime.state("done")["status"] == "stopped")
    if verb[0] == "console":
        assert runtime("console", "done").returncode == 0, "a stopped VM's console is still there to read"
    else:
        assert one_line_error(runtime(*[arg.format("done") for arg in verb])) == \
            "pyrunv: container done is stopped: its VM is gone"


@pytest.fixture
def display_allowed(tmp_path, monkeypatch):
    config = tmp_path / "display.toml"
    config.write_text('annotations_allowed = ["display"]\n')
    monkeypatch.setenv("PYRUNV_CONFIG", str(config))


def with_display(config):
    """A display, and /dev/kmsg in the container: what it writes there shows on the guest's console."""
    config["annotations"] = {"io.pyrunv.vm.display": "vnc"}
    config["linux"]["devices"] = [{"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11, "fileMode": 0o200}]


def capture(address: str, png) -> "Image":
    """A screenshot through vncdotool's own client, in a process of its own (it runs Twisted's reactor)."""
    from PIL import Image
    vncdo = os.path.join(os.path.dirname(sys.executable), "vncdo")
    host, port = address.rsplit(":", 1)
    subprocess.run([vncdo, "-s", f"{host}::{port}", "capture", str(png)], check=True, timeout=60,
                   capture_output=True)
    with Image.open(png) as image:
        return image.convert("L")


def test_the_display_shows_the_guests_console_and_follows_it(runtime, bundle, display_allowed, tmp_path):
    runtime.detached("run", "--detach", "--bundle", bundle("sleep", "600", edit=with_display), "gui")
    assert runtime("display", "gui", check=True).stdout.decode() == f"{runtime.root / 'gui' / 'vnc.sock'}\n"
    relay = subprocess.Popen(runtime.argv("display", "gui", "--listen", "127.0.0.1:0"), stdout=subprocess.PIPE)
    try:
        address = relay.stdout.readline().decode().strip()
        assert address.startswith("127.0.0.1:")

        def say(text):
            runtime("exec", "gui", "sh", "-c", f"echo '<2>{text}' > /dev/kmsg", check=True)
        shots = iter(range(1000))
        say("pyrunv: the first line on the display")
        first = [None]

        def lit():
            first[0] = capture(address, tmp_path / f"shot{next(shots)}.png")
            return first[0].getbbox() is not None  # a black screen has no bounding box
        assert wait_until(lit, timeout=60), "the display stayed black"
        say("pyrunv: a second line, below the first " + "=" * 40)
        assert wait_until(lambda: capture(address, tmp_path / f"shot{next(shots)}.png").tobytes()
                          != first[0].tobytes(), timeout=60), "the display did not change"
        runtime("kill", "gui", "KILL", check=True)
        assert relay.wait(30) == 0, "the relay ends with the VM"
    finally:
        relay.kill()
        relay.wait()


def test_a_display_listening_beyond_loopback_asks_for_a_password(runtime, bundle, display_allowed, tmp_path):
    runtime.detached("run", "--detach", "--bundle", bundle("sleep", "600", edit=with_display), "locked")
    refused = runtime("display", "locked", "--listen", "0.0.0.0:0")
    assert one_line_error(refused) == ("pyrunv: display: listening on 0.0.0.0:0 needs --password-file: the VM's "
                                       "screen would be open to anyone who can reach the port (loopback addresses "
                                       "need none)")
    (tmp_path / "password").write_text("s3cret\n")
    relay = subprocess.Popen(runtime.argv("display", "locked", "--listen", "0.0.0.0:0", "--password-file",
                                          tmp_path / "password"), stdout=subprocess.PIPE)
    try:
        port = relay.stdout.readline().decode().strip().rsplit(":", 1)[1]
        with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as rfb:
            rfb.recv(12)  # the server's protocol version
            rfb.sendall(b"RFB 003.008\n")
            count = rfb.recv(1)[0]
            assert list(rfb.recv(count)) == [2]  # VNC authentication only: no "None"
        vncdo = [os.path.join(os.path.dirname(sys.executable), "vncdo"), "-s", f"127.0.0.1::{port}"]
        denied = subprocess.run(vncdo + ["-p", "wrong", "capture", str(tmp_path / "no.png")], capture_output=True,
                                timeout=60)
        assert denied.returncode != 0 and not (tmp_path / "no.png").exists()
        subprocess.run(vncdo + ["-p", "s3cret", "capture", str(tmp_path / "yes.png")], check=True, timeout=60,
                       capture_output=True)
        assert (tmp_path / "yes.png").stat().st_size > 0
    finally:
        relay.kill()
        relay.wait()


def test_a_display_the_config_does_not_allow_is_one_line(runtime, bundle):
    path = bundle("true", edit=with_display)
    result = runtime.detached("create", "--bundle", path, "nogui", check=False)
    assert one_line_error(result) == \
        "pyrunv: annotation io.pyrunv.vm.display: not allowed by the config file (annotations_allowed)"
    assert runtime.leftovers() == []


def test_a_vm_without_the_annotation_has_no_display(runtime, bundle):
    runtime.detached("run", "--detach", "--bundle", bundle("sleep", "600"), "plain")
    assert one_line_error(runtime("display", "plain")) == \
        "pyrunv: the VM has no display (annotation io.pyrunv.vm.display=vnc)"
    devices = runtime("qmp", "plain", "qom-list", '{"path": "/machine/peripheral-anon"}', check=True).stdout
    assert b"virtio-balloon" in devices and b"virtio-gpu" not in devices


@pytest.fixture
def loop_device(tmp_path):
    """A loop device over a 32 MiB image file: (device path, image path)."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                            check=True).stdout.strip()
    yield device, image
    subprocess.run(["losetup", "--detach", device])


def test_the_specs_devices_exist_with_their_type_numbers_and_mode(runtime, bundle, loop_device):
    rdev = os.stat(loop_device[0]).st_rdev
    devices = [{"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 0o620, "uid": 1, "gid": 2},
               {"path": "/dev/xvdb", "type": "b", "major": os.major(rdev), "minor": os.minor(rdev), "fileMode": 0o660},
               {"path": "/dev/sub/myfifo", "type": "p", "fileMode": 0o600}]
    path = bundle("stat", "-c", "%n %F %t:%T %a %u:%g", "/dev/mynull", "/dev/xvdb", "/dev/sub/myfifo",
                  edit=lambda c: c["linux"].update(devices=devices))
    result = runtime("run", "--bundle", path, "devices")
    assert result.returncode == 0, result.stderr
    null, disk, fifo = result.stdout.decode().splitlines()
    assert null == "/dev/mynull character special file 1:3 620 1:2"
    assert disk.startswith("/dev/xvdb block special file ") and disk.endswith(" 660 0:0")  # the guest's disk numbers
    assert fifo == "/dev/sub/myfifo fifo 0:0 600 0:0"


def test_a_host_block_device_is_a_disk_the_container_can_format_and_write(runtime, bundle, loop_device, tmp_path):
    device, image = loop_device
    rdev = os.stat(device).st_rdev

    def edit(config):
        config["linux"]["devices"] = [{"path": "/dev/xvdb", "type": "b", "major": os.major(rdev),
                                       "minor": os.minor(rdev), "fileMode": 0o660}]
        config["process"]["capabilities"] = {k: ["CAP_SYS_ADMIN", "CAP_MKNOD"] for k in
                                             ("bounding", "effective", "permitted")}
    path = bundle("sh", "-c", "mke2fs -q /dev/xvdb && mkdir -p /mnt && mount -t ext2 /dev/xvdb /mnt && "
                  "echo written-in-the-vm > /mnt/proof && umount /mnt", edit=edit)
    result = runtime("run", "--bundle", path, "disk")
    assert result.returncode == 0, result.stderr
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "ro", device, str(mountpoint)], check=True)
    try:
        assert (mountpoint / "proof").read_text() == "written-in-the-vm\n"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    assert runtime.leftovers() == []


def test_a_block_device_the_host_does_not_have_is_a_node_as_runc_makes_it(runtime, bundle):
    device = {"path": "/dev/xvdb", "type": "b", "major": 250, "minor": 99, "fileMode": 0o600}
    path = bundle("stat", "-c", "%F %t:%T %a", "/dev/xvdb", edit=lambda c: c["linux"].update(devices=[device]))
    result = runtime("run", "--bundle", path, "nodisk")
    assert (result.returncode, result.stdout) == (0, b"block special file fa:63 600\n"), result.stderr


def test_numbers_of_a_disk_of_the_vm_are_refused_in_one_line(runtime, bundle, tmp_path):
    loops = []
    for n in range(2):
        image = tmp_path / f"disk{n}.img"
        image.write_bytes(b"")
        os.truncate(image, 8 << 20)
        loops.append(subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                                    check=True).stdout.strip())
    try:
        disks = [{"path": f"/dev/xvd{n}", "type": "b", "major": os.major(os.stat(loop).st_rdev),
                  "minor": os.minor(os.stat(loop).st_rdev)} for n, loop in enumerate(loops)]
        path = bundle("stat", "-c", "%t %T", "/dev/xvd1", edit=lambda c: c["linux"].update(devices=disks))
        result = runtime("run", "--bundle", path, "two")
        assert result.returncode == 0, result.stderr
        major, minor = (int(n, 16) for n in result.stdout.split())  # the second disk's numbers in the guest
        if os.path.exists(f"/sys/dev/block/{major}:{minor}"):
            pytest.skip(f"the host has a block device {major}:{minor} too")
        other = {"path": "/dev/other", "type": "b", "major": major, "minor": minor}
        path = bundle("true", edit=lambda c: c["linux"].update(devices=disks + [other]))
        result = runtime.detached("create", "--bundle", path, "theirs", check=False)
        assert one_line_error(result).endswith(f"device /dev/other: {major}:{minor} is a disk of the VM's, "
                                               "not the container's")
        assert runtime.leftovers() == []
    finally:
        for loop in loops:
            subprocess.run(["losetup", "--detach", loop])


def test_checkpoint_refuses_in_one_line_without_the_qemu_it_needs_and_leaves_the_container(runtime, bundle,
                                                                                           tmp_path):
    """Debian 12's QEMU 7.2 cannot save a VM with a vhost-user-fs device; the container goes on untouched."""
    from pyrunv import config
    from pyrunv.vm import versions
    refusal = versions.checkpoint_refusal(config.load())
    if refusal is None:
        pytest.skip("this host's QEMU and virtiofsd could save a VM")
    runtime.detached("run", "--detach", "--bundle", bundle("sleep", "600"), "cp")
    result = runtime("checkpoint", "--image-path", tmp_path / "image", "cp")
    assert one_line_error(result) == f"pyrunv: cannot checkpoint cp: {refusal}"
    assert "QEMU >= 8.2" in refusal and "this host has QEMU 7.2" in refusal
    result = runtime("checkpoint", "--page-server", "127.0.0.1:9", "cp")
    assert one_line_error(result) == f"pyrunv: cannot checkpoint cp: {refusal}"
    result = runtime.detached("restore", "--listen", "127.0.0.1:0", "--bundle", bundle("true"), "new", check=False)
    assert one_line_error(result) == f"pyrunv: cannot restore new: {refusal}"
    assert runtime.state("cp")["status"] == "running"
    assert runtime("exec", "cp", "true").returncode == 0
    runtime("kill", "cp", "KILL", check=True)
    assert wait_until(lambda: runtime.state("cp")["status"] == "stopped")
    assert "cannot checkpoint container cp in state stopped" in one_line_error(
        runtime("checkpoint", "--image-path", tmp_path / "image", "cp"))


def test_restore_refuses_what_is_not_a_checkpoint_and_an_id_that_exists(runtime, bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    path = bundle("sleep", "600")
    result = runtime.detached("restore", "--image-path", tmp_path / "empty", "--bundle", path, "new", check=False)
    assert one_line_error(result) == f"pyrunv: {tmp_path / 'empty'} is not a pyrunv checkpoint"
    runtime.detached("create", "--bundle", path, "taken")
    result = runtime.detached("restore", "--image-path", tmp_path / "empty", "--bundle", path, "taken", check=False)
    assert one_line_error(result) == "pyrunv: container with id exists: taken"
    assert not (runtime.root / "new").exists()
    assert runtime.state("taken")["status"] == "created"
