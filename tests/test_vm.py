"""The VM as a first-class entity: `check`, `qmp`, `console`."""
import json

import pytest
from faultlib import one_line_error, wait_until

pytestmark = pytest.mark.vm


def test_check_names_kvm_and_the_accelerator_and_passes(runtime):
    result = runtime("check", "--json")
    lines = {line["name"]: line for line in json.loads(result.stdout)}
    assert result.returncode == 0, result.stdout
    assert not [line for line in lines.values() if line["level"] == "fail"]
    assert {"config", "qemu", "virtiofsd", "guest", "kvm", "tcg", "accelerator", "tun", "vhost-net", "vhost-vsock",
            "cgroups", "memfd", "checkpoint"} <= set(lines)
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
    assert size["base-memory"] == 128 << 20  # the configured size: the spec sets no limit
    assert one_line_error(runtime("qmp", "vm1", "no-such-command")) == \
        "pyrunv: qmp: no-such-command: The command no-such-command has not been found"
    assert one_line_error(runtime("qmp", "vm1", "query-status", "[1]")) == \
        "pyrunv: qmp: arguments must be a JSON object"


def test_console_shows_the_guest_kernels_log(runtime, bundle):
    runtime.detached("run", "--detach", "--bundle", bundle("sleep", "600"), "vm2")
    text = runtime("console", "vm2", check=True).stdout.decode()
    assert "Linux version 6." in text, text[-2000:]


@pytest.mark.parametrize("verb", [["qmp", "{}", "query-status"], ["console", "{}"]])
def test_the_vm_of_an_unknown_or_stopped_container_is_one_line(runtime, bundle, verb):
    argv = [arg.format("nosuch") for arg in verb]
    assert one_line_error(runtime(*argv)) == "pyrunv: container nosuch does not exist"
    runtime.detached("run", "--detach", "--bundle", bundle("true"), "done")
    assert wait_until(lambda: runtime.state("done")["status"] == "stopped")
    if verb[0] == "qmp":
        assert one_line_error(runtime("qmp", "done", "query-status")) == \
            "pyrunv: container done is stopped: its VM is gone"
    else:
        assert runtime("console", "done").returncode == 0, "a stopped VM's console is still there to read"
