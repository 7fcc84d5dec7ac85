"""VM templates without a VM: which template a VM's shape names, when a VM must boot, and the guest RAM
that a save touched given back."""
import dataclasses
import mmap
import os

import pytest

from pyrunv import plan, template, vm
from pyrunv.config import Config
from pyrunv.resources import Resources
from pyrunv.spec import Process, Spec

PAGE = 4096


@pytest.fixture
def config(tmp_path, monkeypatch):
    """A host whose QEMU could load templates, with files for the binaries, kernel and initrd."""
    for name in ("qemu", "virtiofsd", "vmlinux", "initrd.img"):
        (tmp_path / name).write_text(name)
    monkeypatch.setattr(vm, "template_refusal", lambda config: None)
    monkeypatch.setattr(vm, "host_tsc_khz", lambda: 2100000)
    return Config(qemu=str(tmp_path / "qemu"), virtiofsd=str(tmp_path / "virtiofsd"),
                  kernel=str(tmp_path / "vmlinux"), initrd=str(tmp_path / "initrd.img"),
                  template_dir=str(tmp_path / "templates"), annotations_allowed=["memory_mib"])


def a_plan(config, **annotations):
    spec = Spec(bundle="/b", rootfs="/b/rootfs", root_readonly=False, process=Process(args=("sh",)),
                resources=Resources(), annotations={f"io.pyrunv.vm.{k}": v for k, v in annotations.items()})
    return plan.make(spec, config)


def chosen(config, vm_plan, fd=3, share="/run/pyrunv/a/share"):
    argv = vm.qemu_argv(config, vm_plan, "tcg", agent_fd=fd, qmp_fd=fd + 1, fs_fd=fd + 2, console_fd=fd + 3)
    return template.choose(config, vm_plan, argv, ["virtiofsd", f"--fd={fd + 4}", f"--shared-dir={share}"])


def test_vms_of_one_shape_name_one_template_whatever_their_fds_and_shares(config):
    one = chosen(config, a_plan(config))
    assert one.path.startswith(config.template_dir + "/") and one.path.endswith(".vm") and not one.exists
    assert chosen(config, a_plan(config), fd=9, share="/run/pyrunv/b/share").path == one.path
    assert chosen(config, a_plan(config, memory_mib="256")).path != one.path


def test_a_new_kernel_makes_a_new_template(config):
    before = chosen(config, a_plan(config)).path
    with open(config.kernel, "a") as f:
        f.write("rebuilt")
    assert chosen(config, a_plan(config)).path != before


def test_vms_with_disks_a_display_or_an_unprivileged_qemu_or_with_templates_off_boot(config):
    assert chosen(config, dataclasses.replace(a_plan(config), disks=(("/dev/loop0", "disk0"),))) is None
    assert chosen(config, dataclasses.replace(a_plan(config), display="vnc")) is None
    assert chosen(dataclasses.replace(config, qemu_user="nobody"), a_plan(config)) is None
    config.template = "off"
    assert chosen(config, a_plan(config)) is None


def test_what_a_save_read_of_the_guest_ram_is_given_back_and_its_data_kept():
    fd = os.memfd_create("memory-backend-memfd")
    try:
        os.ftruncate(fd, 64 * PAGE)
        os.pwrite(fd, b"kernel", 0)
        os.pwrite(fd, b"slab", 40 * PAGE)
        ram = vm.GuestRam(os.getpid())
        holes = ram.holes()
        assert holes == [(PAGE, 39 * PAGE), (41 * PAGE, 23 * PAGE)]
        with mmap.mmap(fd, 64 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert sum(m[i * PAGE] for i in range(64)) == ord("k") + ord("s")  # as QEMU's save reads every page
        assert ram.holes() == []
        ram.punch(holes)
        assert ram.holes() == holes
        assert os.pread(fd, 6, 0) == b"kernel" and os.pread(fd, 4, 40 * PAGE) == b"slab"
        ram.close()
    finally:
        os.close(fd)


def test_a_new_template_is_kept_with_the_most_recently_used_and_the_oldest_go(tmp_path):
    for age in range(template.KEEP + 2):
        old = tmp_path / f"old{age}.vm"
        old.write_text("saved VM")
        os.utime(old, (1000 - age, 1000 - age))
    template.Template(str(tmp_path / "old9.vm"), True).used()  # the oldest, used just now
    fresh = template.Template(str(tmp_path / "fresh.vm"), False)
    saving = fresh.saving()
    with open(saving, "w") as f:
        f.write("saved VM")
    fresh.saved(saving)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["fresh.vm", "old9.vm"] + [f"old{age}.vm" for age in range(template.KEEP - 2)])
