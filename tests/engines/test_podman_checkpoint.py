"""podman's `container checkpoint` and `container restore`, also through a tarball (--export, --import), of a
pyrunv container: pyrunv saves the whole VM, podman keeps its own files around it. Runs where QEMU and
virtiofsd can save a VM (tools/debian13, in CI); skipped on Debian 12."""
import pytest

from conftest import IMAGE, inspect, wait_for
from pyrunv import config
from pyrunv.vm import versions

pytestmark = [pytest.mark.engine, pytest.mark.vm, pytest.mark.checkpoint, pytest.mark.skipif(
    versions.checkpoint_refusal(config.load()) is not None, reason="this host's QEMU and virtiofsd cannot save a VM")]

# Appends rather than rewrites, so that the file shows any count lost or repeated. No network: Debian 13's
# podman needs nftables for its default one.
COUNTER = "i=0; while true; do i=$((i+1)); echo $i >> /tmp/n; sleep 0.2; done"


def counted(podman, name):
    """The counts the container wrote, read on the host through its rootfs (it may be checkpointed)."""
    rootfs = podman("mount", name, check=True).stdout.strip()
    try:
        with open(f"{rootfs}/tmp/n") as f:
            return [int(n) for n in f.read().split("\n")[:-1]]  # not a line still being written
    except FileNotFoundError:  # not yet
        return []


def counts_on(podman, name, saved):
    assert wait_for(lambda: len(counted(podman, name)) > len(saved) + 3, timeout=60), "it counts on"
    counts = counted(podman, name)
    assert counts == list(range(1, len(counts) + 1)), "from where it was: none lost, none repeated"


def test_podman_checkpoint_and_restore_resume_the_vm(podman, name, tmp_path):
    podman("run", "-d", "--network", "none", "--name", name, IMAGE, "sh", "-c", COUNTER, check=True)
    try:
        assert wait_for(lambda: len(counted(podman, name)) >= 5, timeout=60)
        podman("container", "checkpoint", name, check=True)
        assert (inspect(podman, name, ".State.Status"), inspect(podman, name, ".State.Checkpointed")) == (
            "exited", "true")
        saved = counted(podman, name)
        podman("container", "restore", name, check=True)
        assert inspect(podman, name, ".State.Status") == "running"
        counts_on(podman, name, saved)
        assert podman("exec", name, "cat", "/proc/1/cmdline", check=True).stdout.startswith("sh\0")

        archive = tmp_path / "checkpoint.tar"
        podman("container", "checkpoint", "--export", archive, name, check=True)
        saved = counted(podman, name)
        podman("rm", name, check=True)
        podman("container", "restore", "--import", archive, "--name", name, check=True)
        counts_on(podman, name, saved)
    finally:
        podman("rm", "--force", "--time", "0", name)
