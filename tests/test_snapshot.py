"""checkpoint and restore: the whole VM saved and resumed (QEMU >= 8.2 and the Rust virtiofsd >= 1.11, as
Debian 13 has them: tools/debian13 runs these there). Where the host cannot, the refusal is tested in
test_vm.py."""
import os
import re
import socket
import subprocess
import time

import pytest
from faultlib import describe_status, one_line_error, wait_pid, wait_until

from pyrunv import config
from pyrunv.vm import versions

pytestmark = [pytest.mark.vm, pytest.mark.checkpoint, pytest.mark.skipif(
    versions.checkpoint_refusal(config.load()) is not None, reason="this host's QEMU and virtiofsd cannot save a VM")]

# Counts into a file it keeps open on the share (its fd survives with virtiofsd's state), and exits 7 when
# told to. Shell builtins only: under Debian 13's QEMU 10 (TCG) forked processes of the guest segfault now
# and then (docs/vm.md), which would end the loop early.
COUNTER = ("exec 3>/data/count; i=0; while [ ! -e /data/stop ]; do i=$((i+1)); "
           "[ $((i % 2000)) = 0 ] && echo $i >&3; done; exit 7")


@pytest.fixture
def counter(runtime, bundle, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    bind = {"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind"]}
    path = bundle("sh", "-c", COUNTER, edit=lambda c: c["mounts"].append(bind))

    def last():
        lines = (data / "count").read_text().split()
        return int(lines[-1]) if lines else 0
    return path, data, last


def test_a_counter_survives_checkpoint_and_restore_and_exits_with_its_code(runtime, counter, tmp_path, subreaper):
    path, data, last = counter
    runtime.detached("run", "--detach", "--bundle", path, "cnt")
    assert wait_until(lambda: (data / "count").exists() and last() >= 4000)
    image = tmp_path / "image"
    runtime("checkpoint", "--image-path", image, "cnt", check=True)
    assert wait_until(lambda: runtime.state("cnt")["status"] == "stopped")
    saved = last()
    runtime("delete", "cnt", check=True)
    runtime.detached("restore", "--detach", "--image-path", image, "--bundle", path, "--pid-file",
                     tmp_path / "pid", "cnt")
    assert runtime.state("cnt")["status"] == "running"
    assert wait_until(lambda: last() > saved), "it counts on"
    counts = [int(n) for n in (data / "count").read_text().split()]
    assert counts == list(range(2000, counts[-1] + 1, 2000)), "one file, written on from where it was, never reset"
    execed = runtime("exec", "cnt", "cat", "/proc/1/cmdline")
    assert execed.returncode == 0, execed.stderr  # a normal container afterwards
    (data / "stop").touch()
    assert describe_status(wait_pid(int((tmp_path / "pid").read_text()))) == "exit 7"
    runtime("delete", "cnt", check=True)
    assert runtime.leftovers() == []


def test_a_restored_vm_has_the_hosts_clock_not_the_one_it_was_saved_with(runtime, bundle, tmp_path):
    path = bundle("sleep", "600")
    runtime.detached("run", "--detach", "--bundle", path, "clock")
    runtime("checkpoint", "--image-path", tmp_path / "image", "clock", check=True)
    runtime("delete", "--force", "clock", check=True)
    time.sleep(3)  # the saved guest's clock stands still meanwhile: kept, it would be 3 s late
    runtime.detached("restore", "--detach", "--image-path", tmp_path / "image", "--bundle", path, "clock")
    before = time.time()
    shown = runtime("exec", "clock", "date", "+%s", check=True)
    assert int(before) - 1 <= int(shown.stdout) <= time.time() + 1
    runtime("delete", "--force", "clock", check=True)


def test_leave_running_keeps_the_container_going(runtime, counter, tmp_path):
    path, data, last = counter
    runtime.detached("run", "--detach", "--bundle", path, "keep")
    assert wait_until(lambda: (data / "count").exists() and last() >= 4000)
    runtime("checkpoint", "--leave-running", "--image-path", tmp_path / "image", "keep", check=True)
    assert runtime.state("keep")["status"] == "running"
    saved = last()
    assert wait_until(lambda: last() > saved)
    assert os.path.getsize(tmp_path / "image" / "vm.state") > 1 << 20
    runtime("delete", "--force", "keep", check=True)


def _listening(runtime, tmp_path, *args):
    """A `restore --listen 127.0.0.1:0` in the background: (its process, its output file, the address)."""
    out = open(tmp_path / "restore.out", "w+b")
    restore = subprocess.Popen(runtime.argv("restore", "--listen", "127.0.0.1:0", *args), stdin=subprocess.DEVNULL,
                               stdout=out, stderr=out)
    said = wait_until(lambda: re.search(rb"listening on (\S+)", (tmp_path / "restore.out").read_bytes()))
    assert said, (tmp_path / "restore.out").read_bytes()
    return restore, said.group(1).decode()


def test_a_checkpoint_streamed_into_a_restore_runs_on_there(runtime, counter, tmp_path, subreaper):
    """Migration as between two hosts with the same files: one VM's state through a TCP socket into another."""
    path, data, last = counter
    runtime.detached("run", "--detach", "--bundle", path, "here")
    assert wait_until(lambda: (data / "count").exists() and last() >= 4000)
    restore, address = _listening(runtime, tmp_path, "--detach", "--bundle", path, "--pid-file", tmp_path / "pid",
                                  "there")
    runtime("checkpoint", "--page-server", address, "here", check=True)
    assert restore.wait(timeout=120) == 0, (tmp_path / "restore.out").read_bytes()
    assert runtime.state("here")["status"] == "stopped"
    assert runtime.state("there")["status"] == "running"
    saved = last()
    assert wait_until(lambda: last() > saved), "it counts on there"
    counts = [int(n) for n in (data / "count").read_text().split()]
    assert counts == list(range(2000, counts[-1] + 1, 2000)), "from where it was, never reset"
    assert runtime("exec", "there", "true").returncode == 0
    (data / "stop").touch()
    assert describe_status(wait_pid(int((tmp_path / "pid").read_text()))) == "exit 7"
    for name in ("here", "there"):
        runtime("delete", name, check=True)
    assert runtime.leftovers() == []


def test_a_stream_the_restore_refuses_leaves_the_source_running(runtime, counter, bundle, tmp_path):
    """The restoring side reads the header, finds the bundle unlike the saved one and says no: the source
    has not heard "ok", so it runs on, and the refusing side leaves nothing behind."""
    path, data, last = counter
    runtime.detached("run", "--detach", "--bundle", path, "kept")
    assert wait_until(lambda: (data / "count").exists() and last() >= 2000)
    restore, address = _listening(runtime, tmp_path, "--detach", "--bundle", bundle("true"), "refuser")
    assert one_line_error(runtime("checkpoint", "--page-server", address, "kept")).startswith("pyrunv: checkpoint: ")
    assert restore.wait(timeout=120) == 1
    assert (tmp_path / "restore.out").read_text().splitlines()[-1] == (
        "pyrunv: cannot restore refuser: the bundle's mounts, devices or network are not those of the checkpoint's "
        "container")
    assert runtime.state("kept")["status"] == "running"
    saved = last()
    assert wait_until(lambda: last() > saved), "the source counts on"
    runtime("delete", "--force", "kept", check=True)
    assert runtime.leftovers() == []


def test_a_restore_refuses_a_stream_that_is_not_a_checkpoint(runtime, bundle, tmp_path):
    restore, address = _listening(runtime, tmp_path, "--bundle", bundle("true"), "junk")
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port))) as sender:
        sender.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert restore.wait(timeout=60) == 1
    assert (tmp_path / "restore.out").read_text().splitlines()[-1] == (
        "pyrunv: what 127.0.0.1 sent is not a pyrunv checkpoint")
    assert runtime.leftovers() == []
