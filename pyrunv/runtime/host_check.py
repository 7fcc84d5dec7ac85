"""`pyrunv check`: can this host run pyrunv's containers, and how well? Each line says ok, warning or fail,
with the fix; a fail means containers cannot run."""
import dataclasses
import os
import subprocess

from .. import config as config_mod
from ..errors import PyrunvError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(REPO, "kernel", "build.sh")


@dataclasses.dataclass
class Line:
    level: str   # ok, warning or fail
    name: str
    detail: str
    fix: str = ""

    def text(self) -> str:
        return f"{self.level:<8}{self.name}: {self.detail}" + (f" (fix: {self.fix})" if self.fix else "")


def run() -> list:
    lines = []
    try:
        config = config_mod.load()
        where = os.environ.get("PYRUNV_CONFIG") or config_mod.DEFAULT_PATH
        lines.append(Line("ok", "config", f"{where}" + ("" if os.path.exists(where) else " (absent: defaults)")))
    except PyrunvError as e:
        return [Line("fail", "config", e.message, "correct the file (docs/configuration.md)")]

    from ..vm import versions
    for name, binary, fix in (("qemu", config.qemu, "apt-get install qemu-system-x86, or set qemu"),
                              ("virtiofsd", config.virtiofsd, "apt-get install qemu-system-common (Debian 12) "
                               "or virtiofsd (Debian 13), or set virtiofsd")):
        try:
            lines.append(Line("ok", name, f"{binary}: {versions.version(binary)}"))
        except PyrunvError as e:
            lines.append(Line("fail", name, e.message, fix))
    if not any(line.level == "fail" for line in lines):
        refusal = versions.checkpoint_refusal(config)
        lines.append(Line("warning", "checkpoint", f"not possible: {refusal}", "Debian 13's QEMU and virtiofsd")
                     if refusal else Line("ok", "checkpoint", "possible with this QEMU and virtiofsd"))
        lines.append(_templates(config))
    lines += _guest(config)
    if not any(line.level == "fail" for line in lines):
        lines += _accelerators(config)
    lines += [_device("/dev/net/tun", "warning", "containers get no network", "modprobe tun"),
              _device("/dev/vhost-net", "warning", "not used yet: the NIC's data goes through QEMU", "modprobe vhost_net"),
              _device("/dev/vhost-vsock", "warning", "not used yet: the agent talks over virtio-serial",
                      "modprobe vhost_vsock")]
    lines.append(_cgroups())
    lines.append(_memfd())
    return lines


def _templates(config) -> Line:
    from ..vm import versions
    if config.template == "off":
        return Line("ok", "templates", "off in the config: every VM boots")
    refusal = versions.template_refusal(config)
    if refusal:
        return Line("warning", "templates", f"VMs boot: {refusal}", "machine = \"auto\" or \"q35\", or Debian 13")
    kind = ("without the share, which is plugged in after the load (q35)" if versions.share_plugged_in(config)
            else "the whole VM, share included")
    return Line("ok", "templates", f"a VM of a shape seen before is loaded, not booted: {kind}; kept in "
                f"{config.template_dir}")


def _guest(config) -> list:
    missing = [path for path in (config.kernel, config.initrd) if not os.path.isfile(path)]
    if missing:
        return [Line("fail", "guest", f"{', '.join(missing)} missing", "tools/setup, or kernel/build.sh")]
    built = os.path.join(os.path.dirname(config.initrd), "build.txt")
    if not os.path.exists(BUILD):
        return [Line("ok", "guest", f"{config.kernel}, {config.initrd} (no checkout here to compare with)")]
    try:
        with open(built) as f:
            installed = f.read().strip()
        wanted = subprocess.run([BUILD, "--keys"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return [Line("warning", "guest", f"cannot tell whether it matches the checkout: {e}", "kernel/build.sh")]
    if installed != wanted:
        return [Line("warning", "guest", f"built from other sources ({installed}) than the checkout's ({wanted})",
                     "kernel/build.sh")]
    return [Line("ok", "guest", f"{installed}, as the checkout builds it")]


def _accelerators(config) -> list:
    from ..vm import accelerator, plan as plan_mod, qemu
    plan = plan_mod.VmPlan(machine=qemu.booted_machine(config.machine), accel="auto", vcpus=1,
                           memory_mib=config.memory_mib, kernel=config.kernel, initrd=config.initrd,
                           kernel_params=config.kernel_params, shared=(), init_records=b"")
    kvm = os.path.exists("/dev/kvm") and accelerator.probe(config, plan, "kvm")
    if not os.path.exists("/dev/kvm"):
        line = Line("warning", "kvm", "no /dev/kvm: the VMs run under TCG, much slower",
                    "load kvm_intel or kvm_amd; enable nested virtualisation in a VM")
    elif kvm:
        line = Line("ok", "kvm", "the probe guest boots under KVM")
    else:
        line = Line("warning", "kvm", "/dev/kvm opens but the probe guest does not boot under it (a PVM or broken "
                    "nested KVM): the VMs run under TCG", "a host whose KVM runs standard guests")
    tcg = accelerator.probe(config, plan, "tcg", deadline=30)
    return [line, Line("ok", "tcg", "the probe guest boots under TCG") if tcg else
            Line("warning" if kvm else "fail", "tcg", "the probe guest does not boot under TCG"),
            Line("ok" if kvm or tcg else "fail", "accelerator",
                 f"containers run under {'KVM' if kvm else 'TCG' if tcg else 'nothing'}")]


def _device(path: str, level: str, without: str, fix: str) -> Line:
    if os.path.exists(path):
        return Line("ok", os.path.basename(path), path)
    return Line(level, os.path.basename(path), f"{path} missing: {without}", fix)


def _cgroups() -> Line:
    from ..host import cgroups
    try:
        found = cgroups.hierarchies()
    except OSError as e:
        return Line("warning", "cgroups", f"cannot read the mounts: {e.strerror}")
    if not found:
        return Line("warning", "cgroups", "no cgroup hierarchy mounted: cgroupsPath cannot be honoured",
                    "mount cgroup2 on /sys/fs/cgroup")
    version = cgroups.version()
    return Line("ok", "cgroups", f"v{version}" + (f" ({', '.join(sorted(found))})" if version == 1 else ""))


def _memfd() -> Line:
    try:
        os.close(os.memfd_create("pyrunv-check"))
    except OSError as e:
        return Line("fail", "memfd", f"memfd_create: {e.strerror}: the guest's memory cannot be shared with virtiofsd")
    return Line("ok", "memfd", "memfd_create works")
