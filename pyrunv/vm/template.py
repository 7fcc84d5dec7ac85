"""VM templates: a VM loaded from a booted one instead of booting, as Firecracker's snapshots and Kata's
VM templating start theirs. The first VM of a shape is saved just after its agent's READY, before any
container exists in it; the next VMs of that shape load it, and each gets its own share, NIC, clock and
randomness (the agent's RESTORED). A shape is QEMU's and virtiofsd's command lines less their file
descriptors and paths, and the identity of QEMU, virtiofsd, the kernel and the initrd: any change makes
another template. Where QEMU cannot (versions.template_refusal), VMs boot; so do VMs with block devices or a
display, and those whose QEMU runs as another user (qemu_user).

Two kinds, by what QEMU can save. Where it can save the virtio-fs device (QEMU >= 9.0, the Rust virtiofsd),
the template is the whole VM, saved with mapped-ram, so that a load writes only the pages the template's
guest had written, not all of its RAM. Where it cannot (QEMU 7.2), the template holds no share: its VM
boots on q35 without one, and every VM of the shape gets its share plugged into an empty PCIe port after
the boot or load (the agent's SHARE). QEMU then saves only its devices' state (x-ignore-shared); the file
holds the guest's RAM first, written by the monitor at the RAM's own offsets, without its zero pages, and
that state after it."""
import contextlib
import os
import re

from ..config import Config
from ..errors import PyrunvError
from ..logs import log
from . import qemu, versions
from .plan import VmPlan

FORMAT = 1   # of the key: a change of what a template holds makes every old one unused
KEEP = 8     # templates kept, the most recently used
VARYING = re.compile(r"(fd|tsc_early_khz|--shared-dir|source)=[^,\s]*")  # per VM, or per host's clock reading


class Template:
    def __init__(self, plugged: bool, path: str = "", exists: bool = False):
        self.plugged, self.path, self.exists = plugged, path, exists  # plugged: it holds no share

    def locate(self, config: Config, plan: VmPlan, qemu_argv: list, virtiofsd_argv: list) -> None:
        """The template of this VM's shape, which may not exist yet."""
        self.path = os.path.join(config.template_dir, shape(config, plan, qemu_argv, virtiofsd_argv) + ".vm")
        self.exists = os.path.exists(self.path)

    def to_json(self) -> list:
        return [self.plugged, self.path, self.exists]

    def saving(self) -> str:
        """A path to save the template to; `saved` gives it its name."""
        os.makedirs(os.path.dirname(self.path), 0o700, exist_ok=True)
        return f"{self.path}.{os.getpid()}"

    def saved(self, saving: str) -> None:
        os.rename(saving, self.path)  # a VM that starts meanwhile boots, or finds the whole file
        templates = []
        for entry in os.scandir(os.path.dirname(self.path)):
            with contextlib.suppress(FileNotFoundError):  # another monitor may prune at the same time
                if entry.name.endswith(".vm"):
                    templates.append((entry.stat().st_mtime, entry.path))
        for _, path in sorted(templates, reverse=True)[KEEP:]:
            log.info("template %s: not used lately, removed", path)
            _remove(path)

    def used(self) -> None:
        """Marks it recently used; QEMU has loaded it, so it may be gone by now."""
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def discard(self) -> None:
        _remove(self.path)

    def failed(self, reason: str) -> PyrunvError:
        """The user's error for a template that could not be loaded, which is removed."""
        self.discard()
        return PyrunvError(f"{reason} (loading the template {self.path}, now removed: the next VM of this shape "
                           "boots)")

    def load(self, plan: VmPlan, qemu_pid: int, qmp_path: str, timeout: float) -> None:
        """In the child that started QEMU with -incoming defer, before the monitor's interpreter: QEMU loads
        this template, gets the share plugged in if the template has none, and runs. The guest's hot-plug
        then goes on while the monitor starts. A template that cannot be loaded is removed."""
        import asyncio
        try:
            asyncio.run(asyncio.wait_for(self._load(plan, qemu_pid, qmp_path), timeout))
        except Exception as e:  # PyrunvError, OSError, QMP's, or the timeout
            raise self.failed(str(e) or f"not loaded within {timeout:g}s") from None
        log.info("VM loaded from template %s", self.path)

    @staticmethod
    async def save_with_ram(qmp, qemu_pid: int, path: str) -> None:
        """A template that holds no share: the guest's RAM, written here, then QEMU's state after it."""
        from . import guest_ram, migration
        ram = guest_ram.GuestRam(qemu_pid)
        try:
            with open(path, "wb") as saving:
                ram.save_to(saving.fileno())
                saving.seek(ram.size)
                uri = await migration.hand_fd(qmp, saving, "template")
                await migration.save(qmp, uri, "template", migration.IGNORE_SHARED)
        finally:
            ram.close()

    async def _load(self, plan: VmPlan, qemu_pid: int, qmp_path: str) -> None:
        from qemu.qmp import QMPClient
        from . import guest_ram, migration
        qmp = QMPClient("template")
        await qmp.connect(qmp_path)
        try:
            if not self.plugged:
                await migration.load(qmp, f"file:{self.path}", migration.MAPPED_RAM)
                return
            ram = guest_ram.GuestRam(qemu_pid)
            try:
                with open(self.path, "rb") as saved:
                    ram.load_from(saved.fileno())
                    saved.seek(ram.size)  # QEMU's state follows the RAM, as save_with_ram wrote it
                    uri = await migration.hand_fd(qmp, saved, "template")
                    await migration.load(qmp, uri, migration.IGNORE_SHARED, plug=qemu.share_device(plan, plugged=True))
            finally:
                ram.close()
        finally:
            await qmp.disconnect()


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def choose(config: Config, plan: VmPlan) -> Template | None:
    """This VM's kind of template, to be located once its command line is known; None if it must boot."""
    if not _may_load(config, plan) or versions.template_refusal(config, plan.machine):
        return None
    return Template(versions.share_plugged_in(config))


def machine(config: Config, plan: VmPlan) -> str:
    """The machine of this VM, whose plan may ask for "auto": q35 where it may start from a template whose share
    is plugged in (PCIe hot-plug), else microvm, which boots faster."""
    if plan.machine == "auto" and _may_load(config, plan) and versions.share_plugged_in(config):
        return "q35"
    return qemu.booted_machine(plan.machine)


def _may_load(config: Config, plan: VmPlan) -> bool:
    # QEMU opens a whole template itself: one running as qemu_user could not read it.
    return config.template == "auto" and not (config.qemu_user or plan.disks or plan.display)


def shape(config: Config, plan: VmPlan, qemu_argv: list, virtiofsd_argv: list) -> str:
    import hashlib  # here, in the child that starts the VM: the monitor's interpreter never needs OpenSSL
    import json
    files = []
    for path in (config.qemu, config.virtiofsd, plan.kernel, plan.initrd):
        st = os.stat(path)
        files.append((path, st.st_size, st.st_mtime_ns))
    argv = [VARYING.sub(r"\1=", arg) for arg in qemu_argv + virtiofsd_argv]
    return hashlib.sha256(json.dumps([FORMAT, argv, files]).encode()).hexdigest()[:24]
