"""What this host's QEMU and virtiofsd are, asked once per binary and host boot, and what they can do:
save a VM with its share (checkpoints), start VMs from templates."""
import contextlib
import os
import subprocess

from .. import jsonlite
from ..config import Config
from ..errors import PyrunvError


def version(binary: str) -> str:
    """The first line `binary --version` prints; the user's error if it cannot say."""
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PyrunvError(f"{binary}: {getattr(e, 'strerror', None) or e}") from None
    lines = (result.stdout or result.stderr).strip().splitlines()
    if result.returncode or not lines:
        raise PyrunvError(f"{binary}: --version gave exit status {result.returncode}")
    return lines[0]


def is_c_virtiofsd(version_line: str) -> bool:
    """QEMU's own C virtiofsd (Debian 12) says "virtiofsd version 7.2.x"; the Rust one "virtiofsd 1.13.2"."""
    return "version" in version_line.split()


def major_minor(text: str) -> tuple:
    import re
    found = re.search(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


CHECKPOINT_QEMU = (8, 2)        # QEMU that migrates a vhost-user-fs device
PCREL_QEMU = (8, 1)             # QEMU whose TCG translates x86 code position-independently (CF_PCREL)
CHECKPOINT_VIRTIOFSD = (1, 11)  # the Rust virtiofsd that migrates its state (--migration-mode)
MAPPED_RAM_QEMU = (9, 0)        # QEMU that saves RAM at fixed offsets in a file and loads only what is not zero


def checkpoint_refusal(config: Config) -> str | None:
    """Why this host's QEMU and virtiofsd cannot save a VM with its virtio-fs share; None if they can."""
    qemu, virtiofsd = (cached_version(binary) or version(binary) for binary in (config.qemu, config.virtiofsd))
    rust = not is_c_virtiofsd(virtiofsd)
    found = (f"QEMU {'.'.join(map(str, major_minor(qemu)))} and {'the Rust' if rust else 'the C'} "
             f"virtiofsd {'.'.join(map(str, major_minor(virtiofsd)))}")
    if major_minor(qemu) >= CHECKPOINT_QEMU and rust and major_minor(virtiofsd) >= CHECKPOINT_VIRTIOFSD:
        return None
    return (f"saving a VM with its virtio-fs share needs QEMU >= 8.2 and the Rust virtiofsd >= 1.11 "
            f"(Debian 13's); this host has {found}")


def template_refusal(config: Config, machine: str | None = None) -> str | None:
    """Why this host cannot start VMs of this machine (by default the config's) from templates (template.py);
    None if it can. "auto" is q35 where that is what a template needs (template.machine)."""
    machine = machine or config.machine
    if share_plugged_in(config):
        return None if machine in ("auto", "q35") else (
            f"a template on QEMU < {'.'.join(map(str, CHECKPOINT_QEMU))}, which cannot save a virtio-fs device, "
            "holds none: the share is plugged in after the load, which needs the q35 machine (PCIe hot-plug)")
    refusal = checkpoint_refusal(config)
    if refusal or qemu_release(config.qemu) >= MAPPED_RAM_QEMU:
        return refusal
    return "a template's load without touching its zero pages needs QEMU >= 9.0 (mapped-ram)"


def share_plugged_in(config: Config) -> bool:
    """Whether a template holds no share, which is plugged in after its load: QEMU cannot save a vhost-user-fs
    device. Such a template saves the guest's RAM itself, besides QEMU's state (x-ignore-shared)."""
    return (0, 0) < qemu_release(config.qemu) < CHECKPOINT_QEMU


VERSION_PATH = "/run/pyrunv-version{}.json"  # one per binary, named after its path


def remembered(path: str, key: str, compute):
    """compute()'s JSON value, kept in path (on a tmpfs: until the host reboots) for as long as key holds."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(path) as f:
            saved = jsonlite.loads(f.read())
        if saved["key"] == key:
            return saved["value"]
    value = compute()
    tmp = f"{path}.{os.getpid()}"
    with contextlib.suppress(OSError):
        with open(tmp, "w") as f:
            f.write(jsonlite.dumps({"key": key, "value": value}))
        os.rename(tmp, path)
    return value


def cached_version(binary: str) -> str:
    """version(binary), asked once per binary (its size and mtime) and boot of the host; "" if it cannot say."""
    try:
        st = os.stat(binary)
    except OSError:
        return ""

    def ask() -> str:
        try:
            return version(binary)
        except PyrunvError:
            return ""
    return remembered(VERSION_PATH.format(binary.replace("/", "_")), f"{binary} {st.st_mtime_ns} {st.st_size}", ask)


def qemu_release(qemu: str) -> tuple:
    """(major, minor) of the QEMU binary, (0, 0) if it cannot say."""
    return major_minor(cached_version(qemu))
