"""VM templates (pyrunv/template.py): the first VM of a shape is saved once booted, and the next ones of that
shape load it instead of booting. Both kinds: on Debian 12 (QEMU 7.2) the template holds no share, which is
plugged in after the load, on q35; on Debian 13 (tools/debian13 runs these there) it is the whole VM."""
import contextlib
import glob
import os
import time

import pytest
from faultlib import one_line_error

from pyrunv import config
from pyrunv.vm import versions

pytestmark = [pytest.mark.vm, pytest.mark.skipif(
    versions.template_refusal(config.load()) is not None, reason="this host's QEMU cannot load a VM from a template")]


@pytest.fixture
def templates(tmp_path, monkeypatch):
    """A template directory of the test's own, so that the first VM of each shape is the test's."""
    directory = tmp_path / "templates"
    path = tmp_path / "pyrunv.toml"
    path.write_text(f'template_dir = "{directory}"\n')
    monkeypatch.setenv("PYRUNV_CONFIG", str(path))
    return directory


def saved(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".vm")) if directory.exists() else []


def run_logged(runtime, tmp_path, path, container_id):
    log = tmp_path / f"{container_id}.log"
    result = runtime("--debug", "--log", log, "run", "--bundle", path, container_id)
    return result, log.read_text()


def test_the_first_vm_of_a_shape_is_saved_and_the_next_ones_load_it(runtime, bundle, templates, tmp_path):
    path = bundle("sh", "-c", "echo out; echo err >&2; exit 3")
    first, log = run_logged(runtime, tmp_path, path, "first")
    assert (first.returncode, first.stdout, first.stderr) == (3, b"out\n", b"err\n")
    assert "VM saved as template" in log and "loaded from template" not in log
    assert len(saved(templates)) == 1

    for name in ("second", "third"):
        result, log = run_logged(runtime, tmp_path, path, name)
        assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
        assert "VM loaded from template" in log
    assert len(saved(templates)) == 1

    other_shape = bundle("true", edit=lambda c: c.setdefault("annotations", {}).update(
        {"io.pyrunv.vm.memory_mib": "160"}))
    result, log = run_logged(runtime, tmp_path, other_shape, "bigger")
    assert result.returncode == 0 and "VM saved as template" in log
    assert len(saved(templates)) == 2
    assert runtime.leftovers() == []


def test_a_vm_whose_host_cgroup_limits_its_memory_saves_its_template_and_lives(runtime, bundle, templates, tmp_path):
    """QEMU's save reads all of the VM's RAM, up to max_memory_mib: far beyond the cgroup's limit of the VM's
    boot size, which the save's room lifts while the VM is stopped and sets back after."""
    cgroup = f"pyrunv-tests/{os.getpid()}-template"
    path = bundle("sh", "-c", "echo fits", edit=lambda c: (
        c["linux"].update(cgroupsPath=cgroup, resources={"memory": {"limit": 64 << 20}})))
    try:
        result, log = run_logged(runtime, tmp_path, path, "limited")
        assert (result.returncode, result.stdout) == (0, b"fits\n"), result.stderr
        assert "VM saved as template" in log
    finally:
        for directory in glob.glob(f"/sys/fs/cgroup/*/{cgroup}") + glob.glob(f"/sys/fs/cgroup/{cgroup}"):
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def test_vms_from_one_template_have_the_hosts_clock_and_their_own_randomness(runtime, bundle, templates):
    path = bundle("sleep", "600")
    runtime.detached("run", "--detach", "--bundle", path, "maker")  # boots, and saves the template
    time.sleep(3)  # the template's clock stood still since: a VM that kept it would be 3 s late
    drawn = []
    for name in ("one", "two"):
        runtime.detached("run", "--detach", "--bundle", path, name)
        before = time.time()
        clock = runtime("exec", name, "date", "+%s", check=True)
        after = time.time()
        assert int(before) - 1 <= int(clock.stdout) <= after + 1
        drawn.append(runtime("exec", name, "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1", check=True).stdout)
    assert drawn[0] != drawn[1]


def test_a_template_that_cannot_be_loaded_is_one_line_and_removed_and_the_next_vm_boots(
        runtime, bundle, templates, tmp_path):
    path = bundle("true")
    assert runtime("run", "--bundle", path, "maker").returncode == 0
    [name] = saved(templates)
    (templates / name).write_bytes(b"not a saved VM")
    result = runtime("run", "--bundle", path, "broken")
    assert "template" in one_line_error(result)
    assert saved(templates) == [] and runtime.leftovers() == []

    again, log = run_logged(runtime, tmp_path, path, "again")
    assert again.returncode == 0 and "VM saved as template" in log


def test_templates_off_boots_every_vm_and_saves_none(runtime, bundle, templates, tmp_path, monkeypatch):
    path = tmp_path / "off.toml"
    path.write_text(f'template_dir = "{templates}"\ntemplate = "off"\n')
    monkeypatch.setenv("PYRUNV_CONFIG", str(path))
    for name in ("a", "b"):
        assert runtime("run", "--bundle", bundle("true"), name).returncode == 0
    assert not os.path.exists(templates)
