"""Limits and cgroup paths: the spec's and update's resources, the guest's and the host's cgroup files."""
import pytest

from pyrunv.host import cgroups
from pyrunv.oci import resources
from pyrunv.errors import PyrunvError
from pyrunv.oci.resources import MIB, UNLIMITED, Resources


@pytest.mark.parametrize("path, systemd, expected", [
    ("/docker/abc", False, "docker/abc"),
    ("k8s.io/abc", False, "k8s.io/abc"),  # relative: from the cgroup root
    ("system.slice:docker:abc", True, "system.slice/docker-abc.scope"),
    ("kubepods-burstable-pod1.slice:cri-containerd:abc", True,
     "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope"),
    (":runc:abc", True, "system.slice/runc-abc.scope"),
    ("machine.slice:libpod:x:y", True, None),
    ("/a/../../escape", False, None),
    ("-.slice:p:n", True, "p-n.scope"),
])
def test_cgroups_path_maps_onto_cgroupfs_as_runc_does(path, systemd, expected):
    if expected is None:
        with pytest.raises(PyrunvError, match="^invalid cgroupsPath"):
            cgroups.relative_path(path, systemd)
    else:
        assert cgroups.relative_path(path, systemd) == expected


def test_guest_files_carry_the_specs_limits():
    limits = resources.parse({"memory": {"limit": 64 * MIB, "reservation": 32 * MIB}, "pids": {"limit": 10},
                              "cpu": {"quota": 50000, "period": 100000, "shares": 1024}})
    assert resources.guest_files(limits) == [("memory.max", 64 * MIB), ("memory.low", 32 * MIB), ("pids.max", 10),
                                             ("cpu.max", "50000 100000"), ("cpu.weight", 39)]


def test_host_files_add_the_vms_overhead_to_the_memory_limit():
    limits = Resources(memory_limit=64 * MIB, pids_limit=10)
    assert resources.host_files(limits, 1, 96, 128, 1024) == [("memory.limit_in_bytes", (96 + 128) * MIB),
                                                             ("pids.max", 1024)]
    assert resources.host_files(limits, 2, 0, 128, 1024) == [("memory.max", 64 * MIB), ("pids.max", 1024)]


def test_an_update_of_minus_one_lifts_a_limit_and_keeps_the_rest():
    current = Resources(memory_limit=64 * MIB, pids_limit=10)
    update = resources.from_update(None, {("memory", "limit"): -1, ("pids", "limit"): None})
    assert update.memory_limit == UNLIMITED
    merged = resources.merge(current, update)
    assert (merged.memory_limit, merged.pids_limit) == (UNLIMITED, 10)
    assert resources.guest_files(update) == [("memory.max", "max")]


@pytest.mark.parametrize("text, size", [("64m", 64 * MIB), ("1g", 1 << 30), ("1024", 1024), ("128MiB", 128 * MIB),
                                        ("-1", -1)])
def test_sizes_as_runc_reads_them(text, size):
    assert resources.ram_in_bytes(text, "--memory") == size


def test_a_size_that_is_not_one_is_one_line():
    with pytest.raises(PyrunvError, match="^invalid value for --memory: '12q'$"):
        resources.ram_in_bytes("12q", "--memory")
