"""The VM plan: the agent's records (as kernel/agent/spawn.c parses them), VM sizing, annotations, shares."""
import resource

import pytest

from pyrunv.vm import plan
from pyrunv.vm import qemu, versions, virtiofsd
from pyrunv.config import Config
from pyrunv.errors import PyrunvError
from pyrunv.oci.resources import Resources
from pyrunv.oci.spec import CAPABILITIES, RLIMITS, Mount, Process, Spec

MIB = 1 << 20


def make_spec(**fields) -> Spec:
    limits = {k: fields.pop(k) for k in ("memory_limit", "cpu_quota", "cpu_period") if k in fields}
    return Spec(**{"bundle": "/b", "rootfs": "/b/rootfs", "root_readonly": False,
                   "process": Process(args=("sh",)), "resources": Resources(**limits), **fields})


def decoded(records: bytes) -> list:
    """The records back as (key, value) pairs, the way the agent splits them."""
    assert records.endswith(b"\0")
    return [tuple(r.decode().split("=", 1)) for r in records[:-1].split(b"\0")]


def test_records_are_nul_terminated_key_value_pairs():
    assert plan.records([("arg", "sh"), ("uid", 0), ("env", "A=b=c")]) == b"arg=sh\0uid=0\0env=A=b=c\0"
    assert plan.records([]) == b""


def test_records_refuse_a_nul_in_a_value():
    with pytest.raises(PyrunvError, match="^arg: value contains a NUL byte$"):
        plan.records([("arg", "a\0b")])


def test_process_pairs_carry_every_process_field():
    process = Process(args=("sh", "-c", "x"), env=("A=1",), cwd="/w", uid=1, gid=2, additional_gids=(3, 4),
                      umask=0o27, rlimits=(("RLIMIT_NOFILE", 512, 1024),), no_new_privileges=True, terminal=True,
                      oom_score_adj=-5)
    assert plan.process_pairs(process) == [
        ("arg", "sh"), ("arg", "-c"), ("arg", "x"), ("env", "A=1"), ("cwd", "/w"), ("uid", 1), ("gid", 2),
        ("group", 3), ("group", 4), ("umask", "27"), ("rlimit", "7 512 1024"), ("nnp", 1), ("terminal", 1),
        ("oom_score_adj", -5)]


def test_unset_optional_process_fields_send_no_record():
    assert plan.process_pairs(Process(args=("sh",))) == [("arg", "sh"), ("cwd", "/"), ("uid", 0), ("gid", 0)]


def test_capabilities_are_hex_masks_in_the_agents_set_order():
    caps = {"bounding": ("CAP_CHOWN", "CAP_KILL"), "effective": ("CAP_KILL",), "permitted": (),
            "inheritable": ("CAP_SYS_ADMIN",), "ambient": ("CAP_CHOWN",)}
    pairs = dict(plan.process_pairs(Process(args=("sh",), capabilities=caps)))
    # bounding effective permitted inheritable ambient; CAP_CHOWN is bit 0, CAP_KILL bit 5, CAP_SYS_ADMIN bit 21
    assert pairs["caps"] == "21 20 0 200000 1"


def test_no_capabilities_at_all_is_five_empty_masks():
    empty = {name: () for name in ("bounding", "effective", "permitted", "inheritable", "ambient")}
    assert dict(plan.process_pairs(Process(args=("sh",), capabilities=empty)))["caps"] == "0 0 0 0 0"


def test_capability_and_rlimit_numbers_are_the_kernels():
    assert [CAPABILITIES[name] for name in ("CAP_SYS_ADMIN", "CAP_BPF", "CAP_CHECKPOINT_RESTORE")] == [21, 39, 40]
    assert {name: number for name, number in RLIMITS.items() if hasattr(resource, name)} == \
        {name: getattr(resource, name) for name in RLIMITS if hasattr(resource, name)}


def mount_fields(options, type="tmpfs", source="tmpfs", destination="/mnt", shared_name=None):
    return plan.mount_record(Mount(destination, type, source, tuple(options)), shared_name).split("\t")


def test_mount_flags_are_hex_ms_flags():
    assert mount_fields(["ro", "nosuid"])[:2] == ["3", "0"]
    assert mount_fields(["nosuid", "nodev", "noexec", "relatime"])[0] == f"{0xe | 1 << 21:x}"


def test_clearing_options_set_no_flag():
    assert mount_fields(["rw", "suid", "dev", "exec"])[:2] == ["0", "0"]


def test_an_rbind_mount_is_a_recursive_bind_of_its_share():
    flags, propagation, kind, source, destination, data = mount_fields(
        ["rbind", "rprivate"], type="bind", source="/host/dir", destination="/data", shared_name="m1")
    assert int(flags, 16) & 0x5000 == 0x5000
    assert int(propagation, 16) == 1 << 18 | 0x4000
    assert (kind, source, destination, data) == ("bind", "m1", "/data", "")


def test_unknown_options_become_mount_data():
    flags, _, kind, source, destination, data = mount_fields(["nosuid", "mode=755", "size=65536k"])
    assert (flags, kind, source, destination, data) == ("2", "tmpfs", "tmpfs", "/mnt", "mode=755,size=65536k")


def test_a_mount_without_source_uses_its_type():
    assert mount_fields([], type="proc", source="")[2:4] == ["proc", "proc"]


def test_a_tab_in_a_mount_field_is_refused_on_one_line():
    with pytest.raises(PyrunvError, match=r"^invalid config.json: mount '/a\\tb\\n': tab in a mount field$"):
        mount_fields([], destination="/a\tb\n")


def test_without_limits_the_vm_has_the_configured_size():
    vm = plan.make(make_spec(), Config(vcpus=2, memory_mib=200))
    assert (vm.vcpus, vm.memory_mib) == (2, 200)


def test_the_memory_limit_plus_the_guest_overhead_is_the_vm_memory():
    config = Config()
    assert plan.make(make_spec(memory_limit=256 * MIB), config).memory_mib == 256 + config.guest_overhead_mib
    assert plan.make(make_spec(memory_limit=256 * MIB + 1), config).memory_mib == 257 + config.guest_overhead_mib


@pytest.mark.parametrize("quota,period,vcpus", [(150000, 100000, 2), (50000, 100000, 1), (100000, 100000, 1),
                                                (400000, 100000, 4), (10 ** 7, 100000, 16), (150000, 0, 1)])
def test_the_cpu_quota_rounds_up_to_whole_vcpus(quota, period, vcpus):
    assert plan.make(make_spec(cpu_quota=quota, cpu_period=period), Config()).vcpus == vcpus


def test_vcpus_beyond_those_online_are_present_from_boot_as_sockets_for_update():
    config = Config(max_vcpus=4, machine="microvm")
    vm = plan.make(make_spec(cpu_quota=150000, cpu_period=100000), config)
    assert (vm.vcpus, plan.present_cpus(vm)) == (2, 4)
    argv = qemu.qemu_argv(config, vm, "tcg", agent_fd=3, qmp_fd=4, fs_fd=5, console_fd=6)
    assert argv[argv.index("-smp") + 1] == "4,sockets=4,cores=1,threads=1"  # the MP table's one core a socket
    assert " maxcpus=2" in argv[argv.index("-append") + 1] and "thread=multi" in argv[argv.index("-accel") + 1]
    fixed = plan.make(make_spec(), Config(max_vcpus=1, machine="microvm"))
    argv = qemu.qemu_argv(config, fixed, "tcg", agent_fd=3, qmp_fd=4, fs_fd=5, console_fd=6)
    assert argv[argv.index("-smp") + 1] == "1,sockets=1,cores=1,threads=1" and "maxcpus" not in " ".join(argv)


def test_memory_beyond_the_boot_size_is_in_qemu_and_hidden_from_the_kernel_for_update():
    config = Config(max_memory_mib=2048, machine="microvm")
    vm = plan.make(make_spec(memory_limit=128 * MIB), config)
    argv = qemu.qemu_argv(config, vm, "tcg", agent_fd=3, qmp_fd=4, fs_fd=5, console_fd=6)
    assert (vm.memory_mib, plan.ram_mib(vm), argv[argv.index("-m") + 1]) == (160, 2048, "2048M")
    assert "size=2048M" in argv[argv.index("-object") + 1] and " mem=160M" in argv[argv.index("-append") + 1]
    fixed = plan.make(make_spec(memory_limit=128 * MIB), Config(max_memory_mib=64, machine="microvm"))
    argv = qemu.qemu_argv(config, fixed, "tcg", agent_fd=3, qmp_fd=4, fs_fd=5, console_fd=6)
    assert argv[argv.index("-m") + 1] == "160M" and " mem=" not in argv[argv.index("-append") + 1]


def annotated(**annotations) -> Spec:
    return make_spec(annotations={f"io.pyrunv.vm.{k}": v for k, v in annotations.items()},
                     cpu_quota=150000, cpu_period=100000, memory_limit=256 * MIB)


def test_allowed_annotations_size_and_shape_the_vm():
    config = Config(kernel_params="loglevel=3")
    vm = plan.make(annotated(vcpus="4", memory_mib="512", machine="q35", accel="tcg", kernel_params="foo=1"), config)
    assert (vm.vcpus, vm.memory_mib, vm.machine, vm.accel) == (4, 512, "q35", "tcg")
    assert vm.kernel_params == "loglevel=3 foo=1"


def test_annotations_not_allowed_by_the_config_are_ignored():
    vm = plan.make(annotated(vcpus="4", memory_mib="512"), Config(annotations_allowed=[]))
    assert (vm.vcpus, vm.memory_mib) == (2, 256 + Config().guest_overhead_mib)


def test_the_kernel_annotation_is_ignored_unless_the_config_allows_it():
    spec = annotated(kernel="/evil/vmlinux")
    assert plan.make(spec, Config(kernel="/guest/vmlinux")).kernel == "/guest/vmlinux"
    allowed = Config(kernel="/guest/vmlinux", annotations_allowed=["kernel"])
    assert plan.make(spec, allowed).kernel == "/evil/vmlinux"


def test_a_display_needs_the_config_to_allow_it_and_then_gets_a_gpu_and_vnc():
    with pytest.raises(PyrunvError, match=r"^annotation io.pyrunv.vm.display: not allowed by the config file"):
        plan.make(annotated(display="vnc"), Config())
    allowed = Config(annotations_allowed=["display"], machine="microvm")
    with pytest.raises(PyrunvError, match=r"^annotation io.pyrunv.vm.display: invalid value 'sdl'"):
        plan.make(annotated(display="sdl"), allowed)
    shown = plan.make(annotated(display="vnc"), allowed)
    argv = qemu.qemu_argv(allowed, shown, "tcg", agent_fd=3, qmp_fd=4, fs_fd=5, console_fd=6)
    assert argv[argv.index("-vnc") + 1] == "none,password=on" and "virtio-gpu-device" in argv
    assert argv[argv.index("-append") + 1].startswith("console=tty0 vt.global_cursor_default=0 console=ttyS0 ")
    plain = qemu.qemu_argv(allowed, plan.make(annotated(), allowed), "tcg", agent_fd=3, qmp_fd=4, fs_fd=5, console_fd=6)
    assert "-vnc" not in plain and not any("virtio-gpu" in arg or "tty0" in arg for arg in plain)


def test_annotations_of_other_prefixes_are_ignored():
    spec = make_spec(annotations={"io.other.vcpus": "8", "vcpus": "8"})
    assert plan.make(spec, Config(vcpus=1)).vcpus == 1


@pytest.mark.parametrize("key,value,expected", [
    ("vcpus", "two", "^annotation io.pyrunv.vm.vcpus: invalid value 'two'$"),
    ("memory_mib", "1.5", "^annotation io.pyrunv.vm.memory_mib: invalid value '1.5'$"),
    ("vcpus", "99", "^annotations: vcpus must be between 1 and 16, not 99$"),
    ("memory_mib", "8", "^annotations: memory_mib must be between 32 and 65536, not 8$"),
    ("machine", "pc", "^annotations: machine must be one of auto, microvm, q35, not 'pc'$"),
    ("accel", "hvf", "^annotations: accel must be one of auto, kvm, tcg, not 'hvf'$"),
])
def test_a_bad_annotation_value_is_named(key, value, expected):
    with pytest.raises(PyrunvError, match=expected):
        plan.make(annotated(**{key: value}), Config())


def test_bind_mounts_are_shared_as_m1_m2_after_the_rootfs():
    mounts = (Mount("/data", "bind", "/host/data", ("rbind", "ro")),
              Mount("/tmp", "tmpfs", "tmpfs", ("nosuid",)),
              Mount("/etc/hosts", "none", "/host/hosts", ("bind", "rw")))
    vm = plan.make(make_spec(mounts=mounts), Config())
    assert vm.shared == (plan.SharedPath("/b/rootfs", "rootfs", False), plan.SharedPath("/host/data", "m1", True),
                         plan.SharedPath("/host/hosts", "m2", False))
    records = [value.split("\t") for key, value in decoded(vm.init_records) if key == "mount"]
    assert [(r[2], r[3], r[4]) for r in records] == [("bind", "m1", "/data"), ("tmpfs", "tmpfs", "/tmp"),
                                                      ("bind", "m2", "/etc/hosts")]


def test_the_init_records_describe_the_whole_container():
    spec = make_spec(root_readonly=True, hostname="box", masked_paths=("/proc/kcore",),
                     readonly_paths=("/proc/sys",), sysctl=(("net.ipv4.ip_forward", "1"),),
                     process=Process(args=("sh",), env=("A=1",)))
    assert decoded(plan.make(spec, Config()).init_records) == [
        ("root", "rootfs"), ("arg", "sh"), ("env", "A=1"), ("cwd", "/"), ("uid", "0"), ("gid", "0"),
        ("root_readonly", "1"), ("hostname", "box"), ("masked", "/proc/kcore"), ("readonly", "/proc/sys"),
        ("sysctl", "net.ipv4.ip_forward=1")]


def test_the_plan_carries_the_config_paths():
    config = Config(kernel="/k", initrd="/i", machine="q35")
    vm = plan.make(make_spec(), config)
    assert (vm.kernel, vm.initrd, vm.machine, vm.accel) == ("/k", "/i", "q35", "auto")


@pytest.mark.parametrize("release, accel, zeroing", [((7, 2), "tcg", False), ((8, 1), "tcg", True),
                                                     ((10, 0), "tcg", True), ((10, 0), "kvm", False)])
def test_a_qemu_that_translates_by_physical_address_gets_a_guest_that_zeroes_the_pages_it_allocates(
        monkeypatch, release, accel, zeroing):
    """QEMU >= 8.1's TCG keeps translations of a page that virtiofsd refills behind its back (Debian 13)."""
    monkeypatch.setattr(versions, "qemu_release", lambda qemu: release)
    plan_ = plan.make(annotated(), Config())
    assert ("init_on_alloc=1" in qemu.kernel_cmdline(Config(), plan_, accel).split()) == zeroing


@pytest.mark.parametrize("version, flags", [
    ("virtiofsd version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)", ["cache=none", "--thread-pool-size=0"]),
    ("virtiofsd 1.13.2", ["--cache=never", "--thread-pool-size=0", "--migration-on-error=guest-error"]),
])
def test_the_shares_cache_and_threads_reach_either_virtiofsd(monkeypatch, version, flags):
    monkeypatch.setattr(versions, "cached_version", lambda binary: version)
    argv = virtiofsd.daemon(Config(share_cache="never", share_threads=0), "/share", 3, None).argv
    assert set(flags) <= set(argv), argv


@pytest.mark.parametrize("setting, line", [
    ('share_cache = "metadata"', "share_cache must be one of auto, always, never, not 'metadata'"),
    ("share_threads = 99", "share_threads must be between 0 and 64, not 99"),
])
def test_the_config_file_refuses_a_share_setting_out_of_range(tmp_path, setting, line):
    path = tmp_path / "config.toml"
    path.write_text(setting + "\n")
    from pyrunv import config
    with pytest.raises(PyrunvError) as failure:
        config.load(str(path))
    assert str(failure.value) == f"config file {path}: {line}"


def test_the_c_virtiofsd_gets_no_thread_pool_it_would_kill(monkeypatch):
    monkeypatch.setattr(versions, "cached_version", lambda binary: "virtiofsd version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)")
    with pytest.raises(PyrunvError, match=r"^share_threads = 4 needs the Rust virtiofsd: QEMU's C virtiofsd kills"):
        virtiofsd.daemon(Config(share_threads=4), "/share", 3, None)


@pytest.mark.parametrize("room_mib, booted, fitted", [(None, 160, 160), (1024, 160, 160), (256, 160, 128), (192, 96, 64)])
def test_a_vm_fits_in_the_memory_its_host_cgroups_allow(room_mib, booted, fitted):
    """The guest gets the smallest limit above it less host_overhead_mib (128 by default): never more than planned."""
    vm = plan.VmPlan(machine="microvm", accel="tcg", vcpus=1, memory_mib=booted, kernel="k", initrd="i",
                     kernel_params="", shared=(), init_records=b"")
    room = room_mib and room_mib * plan.MIB
    assert plan.fit(vm, room, Config()).memory_mib == fitted


def test_a_host_cgroup_too_small_for_any_vm_is_one_line():
    vm = plan.VmPlan(machine="microvm", accel="tcg", vcpus=1, memory_mib=96, kernel="k", initrd="i",
                     kernel_params="", shared=(), init_records=b"")
    with pytest.raises(PyrunvError) as refused:
        plan.fit(vm, 64 * plan.MIB, Config())
    assert str(refused.value) == (
        "a memory limit of 64 MiB on the host cgroup is too small for a VM: it needs 192 MiB at least (128 MiB for "
        "QEMU, virtiofsd and the monitor, host_overhead_mib); give the pod's RuntimeClass an overhead "
        "(docs/kubernetes.md)")


@pytest.mark.parametrize("unified", [False, True])
def test_the_room_of_a_host_cgroup_is_the_smallest_limit_up_to_the_root(tmp_path, monkeypatch, unified):
    from pyrunv.host import cgroups
    monkeypatch.setattr(cgroups, "ROOT", str(tmp_path))
    hierarchy = tmp_path if unified else tmp_path / "memory"
    name, unlimited = ("memory.max", "max") if unified else ("memory.limit_in_bytes", "9223372036854771712")
    limits = {"": unlimited, "kubepods": unlimited, "kubepods/pod1": str(300 << 20), "kubepods/pod1/box": unlimited}
    for path, value in limits.items():
        (hierarchy / path).mkdir(parents=True, exist_ok=True)
        (hierarchy / path / name).write_text(value + "\n")
    box = cgroups.HostCgroup({"" if unified else "memory": str(hierarchy / "kubepods/pod1/box")}, [])
    assert box.memory_room() == 300 << 20
    (hierarchy / "kubepods/pod1" / name).write_text(unlimited)
    assert box.memory_room() is None


def test_a_privileged_container_gets_the_hosts_character_devices_but_none_of_its_disks(tmp_path):
    """Engines list every host device for a privileged container and allow all of them in its cgroup; in a VM
    that is privilege over the VM's devices: the host's disks are left out, not attached."""
    from pyrunv.oci import spec as spec_mod
    (tmp_path / "rootfs").mkdir()
    document = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"args": ["sh"], "cwd": "/"},
                "linux": {"devices": [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0},
                                      {"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11}],
                          "resources": {"devices": [{"allow": True, "access": "rwm"}]}}}
    privileged = spec_mod.parse(str(tmp_path), document)
    assert privileged.privileged
    planned = plan.container(privileged)
    assert planned.disks == ()
    assert [v for k, v in decoded(planned.records) if k == "device"] == ["c 1 11 666 0 0 /dev/kmsg"]
    document["linux"]["resources"]["devices"] = [{"allow": False, "access": "rwm"},
                                                 {"allow": True, "type": "c", "major": 1, "minor": 11, "access": "rw"}]
    assert not spec_mod.parse(str(tmp_path), document).privileged
