"""VM templates without a VM: which template a VM's shape names, when a VM must boot, which VMs get their
share plugged in, and the guest RAM that a save touched given back, or that a template holds."""
import dataclasses
import mmap
import os

import pytest

from pyrunv.vm import plan
from pyrunv.vm import template
from pyrunv.vm import guest_ram, qemu, versions
from pyrunv.config import Config
from pyrunv.oci.resources import Resources
from pyrunv.oci.spec import Process, Spec

PAGE = 4096


def a_config(tmp_path, monkeypatch, qemu_release: tuple) -> Config:
    """A host with this QEMU and a virtiofsd that can save its state, with files for the binaries, kernel and
    initrd."""
    for name in ("qemu", "virtiofsd", "vmlinux", "initrd.img"):
        (tmp_path / name).write_text(name)
    monkeypatch.setattr(versions, "qemu_release", lambda qemu: qemu_release)
    monkeypatch.setattr(versions, "checkpoint_refusal", lambda config: None if qemu_release >= versions.CHECKPOINT_QEMU else "old")
    monkeypatch.setattr(qemu, "host_tsc_khz", lambda: 2100000)
    return Config(qemu=str(tmp_path / "qemu"), virtiofsd=str(tmp_path / "virtiofsd"),
                  kernel=str(tmp_path / "vmlinux"), initrd=str(tmp_path / "initrd.img"),
                  template_dir=str(tmp_path / "templates"), annotations_allowed=["memory_mib", "machine"])


@pytest.fixture
def config(tmp_path, monkeypatch):
    """Debian 13's QEMU: a template is the whole VM, share included."""
    return a_config(tmp_path, monkeypatch, (10, 0))


@pytest.fixture
def old_qemu(tmp_path, monkeypatch):
    """Debian 12's QEMU, which cannot save a virtio-fs device."""
    return a_config(tmp_path, monkeypatch, (7, 2))


def a_plan(config, **annotations):
    """A VM's plan with its machine as the monitor makes it (template.machine)."""
    spec = Spec(bundle="/b", rootfs="/b/rootfs", root_readonly=False, process=Process(args=("sh",)),
                resources=Resources(), annotations={f"io.pyrunv.vm.{k}": v for k, v in annotations.items()})
    vm_plan = plan.make(spec, config)
    return dataclasses.replace(vm_plan, machine=template.machine(config, vm_plan))


def argv_of(config, vm_plan, fd=3, plug_share=False):
    return qemu.qemu_argv(config, vm_plan, "tcg", agent_fd=fd, qmp_fd=fd + 1, fs_fd=fd + 2, console_fd=fd + 3,
                        plug_share=plug_share)


def chosen(config, vm_plan, fd=3, share="/run/pyrunv/a/share"):
    """The template a monitor would start this VM for, located as the monitor locates it."""
    found = template.choose(config, vm_plan)
    if found:
        argv = argv_of(config, vm_plan, fd, found.plugged)
        found.locate(config, vm_plan, argv, ["virtiofsd", f"--fd={fd + 4}", f"--shared-dir={share}"])
    return found


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


def test_a_template_holds_the_share_where_qemu_can_save_it(config):
    vm_plan = a_plan(config)
    assert vm_plan.machine == "microvm" and not chosen(config, vm_plan).plugged
    assert "vhost-user-fs-device,chardev=fs,tag=pyrunv" in argv_of(config, vm_plan)


def test_where_qemu_cannot_save_the_share_a_templated_vm_is_q35_and_gets_its_share_plugged_in(old_qemu):
    vm_plan = a_plan(old_qemu)
    assert vm_plan.machine == "q35" and chosen(old_qemu, vm_plan).plugged
    argv = argv_of(old_qemu, vm_plan, plug_share=True)
    assert "pcie-root-port,id=share-port,chassis=1" in argv and not any("vhost-user-fs" in arg for arg in argv)
    assert "pyrunv.share=plugged" in argv[argv.index("-append") + 1]
    assert qemu.share_device(vm_plan, plugged=True) == {
        "driver": "vhost-user-fs-pci", "chardev": "fs", "tag": "pyrunv", "bus": "share-port", "id": "share"}
    assert "pyrunv.share=plugged" not in " ".join(argv_of(old_qemu, vm_plan))


def test_where_qemu_cannot_save_the_share_other_vms_boot_on_microvm_or_the_machine_asked_for(old_qemu):
    assert chosen(old_qemu, a_plan(old_qemu, machine="microvm")) is None
    disk = dataclasses.replace(a_plan(old_qemu), disks=(("/dev/loop0", "disk0"),), machine="auto")
    assert template.machine(old_qemu, disk) == "microvm" and chosen(old_qemu, disk) is None
    old_qemu.template = "off"
    assert a_plan(old_qemu).machine == "microvm"


def test_a_templates_ram_is_the_guests_without_its_zero_pages_and_loads_into_holes(tmp_path):
    saved = os.open(tmp_path / "template.vm", os.O_RDWR | os.O_CREAT)
    fd = os.memfd_create("memory-backend-memfd")
    os.ftruncate(fd, 64 * PAGE)
    os.pwrite(fd, b"kernel", 0)
    os.pwrite(fd, bytes(PAGE), PAGE)  # written, but only zeros: as a page the guest freed and cleared
    os.pwrite(fd, b"slab", 40 * PAGE)
    ram = guest_ram.GuestRam(os.getpid())
    ram.save_to(saved)
    ram.close()
    os.close(fd)
    assert os.fstat(saved).st_size == 64 * PAGE and os.fstat(saved).st_blocks * 512 <= 2 * PAGE
    fd = os.memfd_create("memory-backend-memfd")
    try:
        os.ftruncate(fd, 64 * PAGE)
        ram = guest_ram.GuestRam(os.getpid())
        ram.load_from(saved)
        assert ram.holes() == [(PAGE, 39 * PAGE), (41 * PAGE, 23 * PAGE)]
        assert os.pread(fd, 6, 0) == b"kernel" and os.pread(fd, 4, 40 * PAGE) == b"slab"
        ram.close()
    finally:
        os.close(fd)
        os.close(saved)


def test_what_a_save_read_of_the_guest_ram_is_given_back_and_its_data_kept():
    fd = os.memfd_create("memory-backend-memfd")
    try:
        os.ftruncate(fd, 64 * PAGE)
        os.pwrite(fd, b"kernel", 0)
        os.pwrite(fd, b"slab", 40 * PAGE)
        ram = guest_ram.GuestRam(os.getpid())
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
    template.Template(False, str(tmp_path / "old9.vm"), True).used()  # the oldest, used just now
    fresh = template.Template(False, str(tmp_path / "fresh.vm"), False)
    saving = fresh.saving()
    with open(saving, "w") as f:
        f.write("saved VM")
    fresh.saved(saving)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["fresh.vm", "old9.vm"] + [f"old{age}.vm" for age in range(template.KEEP - 2)])
