"""The VM: the QEMU command line, virtiofsd, the KVM probe, and helper daemons that always get cleaned up."""
import contextlib
import ctypes
import functools
import os
import select
import signal
import socket
import subprocess
import time

from ..config import Config
from .. import jsonlite
from ..errors import PyrunvError
from ..logs import log
from .plan import VmPlan


AGENT_PORT = "pyrunv.agent"
QMP_SOCKET = "qmp.sock"  # in the state directory: `pyrunv qmp` and qmp-shell connect to it
VNC_SOCKET = "vnc.sock"  # in the state directory of a VM with a display: VNC clients connect to it
SHARE_TAG = "pyrunv"
SHARE_PORT = "share-port"  # the PCIe port a template's VM gets its share on (template.py)
PR_SET_PDEATHSIG = 1
# noreplace-smp: a one-vCPU guest would otherwise rewrite every LOCK prefix in its text at boot, one
# text_poke each (about 40 ms under TCG).
BASE_PARAMS = ("console=ttyS0 quiet panic=-1 reboot=t tsc=reliable no_timer_check rdinit=/init "
               "8250.nr_uarts=1 cryptomgr.notests random.trust_cpu=on rcupdate.rcu_expedited=1 noreplace-smp")


def _die_with(parent: int) -> None:
    # A helper outlives nothing: if the monitor is SIGKILLed, the kernel kills QEMU and virtiofsd too
    # (create kills a booting monitor when the spec fails its check). A monitor already gone took no one.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class Daemon:
    """A helper process started from an argv list; `with` guarantees it is gone afterwards."""

    def __init__(self, name: str, argv: list, pass_fds=(), log_path: str | None = None, user: str = ""):
        self.name, self.argv, self.pass_fds, self.log_path = name, list(argv), tuple(pass_fds), log_path
        self.user = user
        self.proc: subprocess.Popen | None = None

    def handover(self) -> dict:
        """What Daemon.adopt needs in the monitor's fresh interpreter (see monitor.py)."""
        return {"name": self.name, "argv": self.argv, "pid": self.proc.pid, "log_path": self.log_path}

    @classmethod
    def adopt(cls, name: str, argv: list, pid: int, log_path: str | None) -> "Daemon":
        """A helper this process started before its exec: its child still, with `with` as for one it starts."""
        daemon = cls(name, argv, log_path=log_path)
        daemon.proc = _Child(pid)
        return daemon

    def __enter__(self) -> "Daemon":
        if self.proc is not None:
            return self  # adopted
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # Credentials change before exec, so the helper never holds root; PDEATHSIG is set after that
        # change (a change of credentials would clear it).
        credentials = unprivileged(self.user) if self.user else {}
        try:
            self.proc = subprocess.Popen(self.argv, pass_fds=self.pass_fds, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out,
                                         preexec_fn=functools.partial(_die_with, os.getpid()), **credentials)
        except OSError as e:
            raise PyrunvError(f"cannot start {self.name}: {e.strerror}: {_shown(self.argv)}") from None
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = 1.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def failure(self, what: str) -> str:
        """A one-line description for the user; the exact command line and output go to the log."""
        code = self.proc.poll() if self.proc else None
        tail = ""
        if self.log_path and os.path.exists(self.log_path):
            with open(self.log_path, "rb") as f:
                lines = [line for line in f.read()[-4096:].decode(errors="replace").splitlines() if line.strip()]
            tail = lines[-1].strip() if lines else ""
        log.error("%s %s (exit status %s): %s", self.name, what, code, _shown(self.argv))
        return f"{self.name} {what}" + (f": {tail}" if tail else "")


class _Child:
    """A child started before this process's exec: the part of Popen that Daemon uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.poll() is None:
            pidfd = os.pidfd_open(self.pid)
            try:
                ended = select.select([pidfd], [], [], timeout)[0]
            finally:
                os.close(pidfd)
            if not ended:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            self.poll()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def unprivileged(user: str) -> dict:
    """Popen's credentials for `user`: its uid and gid, and the kvm group if there is one (for /dev/kvm)."""
    import grp
    import pwd
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PyrunvError(f"qemu_user {user!r} does not exist") from None
    groups = []
    with contextlib.suppress(KeyError):
        groups.append(grp.getgrnam("kvm").gr_gid)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": groups}


def is_c_virtiofsd(version_line: str) -> bool:
    """QEMU's own C virtiofsd (Debian 12) says "virtiofsd version 7.2.x"; the Rust one "virtiofsd 1.13.2"."""
    return "version" in version_line.split()


class GuestRam:
    """The guest RAM of a running QEMU (its memfd), to give back what a save touched. QEMU's save reads
    every page, and the read of a page never written allocates it: all 128 MiB of a 128 MiB guest that had
    used 20. The holes from before the save are punched again after it, while the VM is stopped."""
    def __init__(self, qemu_pid: int):
        self.fd = None
        directory = f"/proc/{qemu_pid}/fd"
        for name in os.listdir(directory):
            if os.readlink(os.path.join(directory, name)).startswith("/memfd:memory-backend-memfd"):
                self.fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CLOEXEC)
                break
        if self.fd is None:
            raise OSError(f"no guest RAM among QEMU's files ({directory})")

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def holes(self) -> list:
        found, offset = [], 0
        for start, end in _data_runs(self.fd, self.size):
            if start > offset:
                found.append((offset, start - offset))
            offset = end
        if offset < self.size:
            found.append((offset, self.size - offset))
        return found

    def save_to(self, fd: int) -> None:
        """Writes the guest's RAM into a file at the same offsets, leaving out the pages that hold only zeros:
        the file is sparse, and as long as the RAM."""
        os.ftruncate(fd, self.size)
        for start, end in _data_runs(self.fd, self.size):
            for offset in range(start, end, COPY_CHUNK):
                chunk = os.pread(self.fd, min(COPY_CHUNK, end - offset), offset)
                for page in range(0, len(chunk), PAGE):
                    if chunk[page:page + PAGE] != ZERO_PAGE:
                        os.pwrite(fd, chunk[page:page + PAGE], offset + page)

    def load_from(self, fd: int) -> None:
        """The RAM save_to wrote, into this guest's RAM, which is still all holes: its holes stay holes."""
        for start, end in _data_runs(fd, self.size):
            for offset in range(start, end, COPY_CHUNK):
                os.pwrite(self.fd, os.pread(fd, min(COPY_CHUNK, end - offset), offset), offset)

    def punch(self, holes: list) -> None:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for offset, length in holes:
            if libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(offset),
                              ctypes.c_long(length)) < 0:
                raise OSError(ctypes.get_errno(), "fallocate")

    def close(self) -> None:
        os.close(self.fd)


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
PAGE = 4096
ZERO_PAGE = bytes(PAGE)
COPY_CHUNK = 2 << 20


def _data_runs(fd: int, end: int):
    """The (start, end) of each run of data in the file before end, between its holes."""
    offset = 0
    while offset < end:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but a hole from offset on
            return
        offset = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        if start < end:
            yield start, offset


def virtiofsd(config: Config, share_dir: str, listen_fd: int, log_path: str) -> Daemon:
    """Either virtiofsd, each with its own flags; both sandbox themselves in namespaces, in the share."""
    found = cached_version(config.virtiofsd) or version(config.virtiofsd)  # the latter says why not
    threads = f"--thread-pool-size={config.share_threads}"
    if is_c_virtiofsd(found):
        if config.share_threads > 1:
            raise PyrunvError(f"share_threads = {config.share_threads} needs the Rust virtiofsd: QEMU's C virtiofsd "
                              "kills its own pool threads (its seccomp filter lacks sched_getaffinity)")
        cache = "none" if config.share_cache == "never" else config.share_cache
        argv = [config.virtiofsd, f"--fd={listen_fd}", "-o", f"source={share_dir}", "-o", f"cache={cache}",
                "-o", "announce_submounts", threads]
    else:
        argv = [config.virtiofsd, f"--fd={listen_fd}", f"--shared-dir={share_dir}", f"--cache={config.share_cache}",
                "--announce-submounts", threads, "--sandbox=namespace"]
        if _numbers(found) >= CHECKPOINT_VIRTIOFSD:
            # Its open files travel with a saved VM, found by their paths. One that is gone at the restore
            # (podman's import makes a fresh rootfs without the mount points) fails only when used, as a
            # file deleted on the host under a running container does.
            argv += ["--migration-mode=find-paths", "--migration-on-error=guest-error"]
    return Daemon("virtiofsd", argv, (listen_fd,), log_path)


def host_tsc_khz() -> int:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 0


def machine_args(plan: VmPlan, accel: str) -> list:
    if plan.machine == "microvm":
        return ["-M", "microvm,acpi=off,rtc=on,x-option-roms=off",
                "-global", "virtio-mmio.force-legacy=false"]
    return ["-M", "q35"]


def share_device(plan: VmPlan, plugged: bool = False) -> dict:
    """The virtio-fs device's properties: on QEMU's command line, or for QMP's device_add (plugged)."""
    properties = {"driver": device(plan, "vhost-user-fs"), "chardev": "fs", "tag": SHARE_TAG}
    if plugged:
        properties.update(bus=SHARE_PORT, id="share")
    return properties


def booted_machine(machine: str) -> str:
    """The machine of a VM that boots, with no template: "auto" is microvm, which boots fastest."""
    return "microvm" if machine == "auto" else machine


def device(plan: VmPlan, kind: str) -> str:
    return f"{kind}-{'device' if plan.machine == 'microvm' else 'pci'}"


def kernel_cmdline(config: Config, plan: VmPlan, accel: str, extra: str = "") -> str:
    # With a display the kernel's log shows on it too; the last console= stays /dev/console (the serial).
    # No cursor: it would blink, and the display would never be still.
    params = ["console=tty0 vt.global_cursor_default=0" if plan.display else "", BASE_PARAMS]
    if accel == "tcg":
        # Under TCG the guest reads the host's TSC; telling it the rate skips a calibration that can hang.
        # The local APIC timer's calibration costs ~250 ms under TCG; the PIT ticks instead.
        params.append(f"tsc_early_khz={host_tsc_khz()} nolapic_timer")
        if qemu_release(config.qemu) >= PCREL_QEMU:
            # This QEMU keys x86 translations by physical address. virtiofsd refills freed page-cache pages
            # behind TCG's back, so a page that had held other code ran its stale translation: SIGSEGV and
            # SIGILL at random. A page the guest zeroes as it allocates it loses its translations first.
            # (init_on_free would do too, but it zeroes all of the guest's RAM at boot: every page touched.)
            params.append("init_on_alloc=1")
    params += [plan.kernel_params, extra]
    return " ".join(p for p in params if p)


# TCG runs `rep movs`/`rep stos` one element per step: without ERMS/FSRM, the guest's memcpy and memset
# use word-sized loops instead of byte-wise `rep movsb`.
TCG_CPU = "max,-erms,-fsrm"


def qemu_argv(config: Config, plan: VmPlan, accel: str, *, agent_fd: int, qmp_fd: int, fs_fd: int | None,
              console_fd: int, tap_fd: int | None = None, user_qmp_fd: int | None = None,
              disks=(), incoming: bool = False, plug_share: bool = False, extra_params: str = "") -> list:
    """Every file QEMU needs besides the kernel and initrd comes as an fd, so that it can run as an
    unprivileged user who cannot open the 0700 state directory. With plug_share, the share's device is
    left out, to be plugged into an empty PCIe port after the boot or load (template.py)."""
    if plug_share:
        extra_params = " ".join(p for p in (extra_params, "pyrunv.share=plugged") if p)
    tcg = f"tcg,thread={'multi' if plan.vcpus > 1 else 'single'},tb-size={config.tcg_tb_size_mib}"
    argv = [config.qemu, *machine_args(plan, accel),
            "-accel", tcg if accel == "tcg" else "kvm",
            "-cpu", TCG_CPU if accel == "tcg" else "host",
            "-smp", str(plan.vcpus), "-m", f"{plan.memory_mib}M",
            "-object", f"memory-backend-memfd,id=mem,size={plan.memory_mib}M,share=on",
            "-machine", "memory-backend=mem",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", plan.kernel, "-initrd", plan.initrd,
            "-append", kernel_cmdline(config, plan, accel, extra_params),
            "-add-fd", f"fd={console_fd},set=1", "-serial", "file:/dev/fdset/1",
            "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
            # The guest sets up queues for every port the device may have (31 by default): about 4.5 MiB of
            # its memory. Port 0 is kept for a console, so the agent's port needs 2.
            "-device", f"{device(plan, 'virtio-serial')},max_ports=2",
            "-chardev", f"socket,id=agent,fd={agent_fd}",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
            "-device", device(plan, "virtio-rng"),
            # `update` gives memory back to the host, and takes it again up to the boot size.
            "-device", device(plan, "virtio-balloon"),
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    if fs_fd is not None:
        argv += ["-chardev", f"socket,id=fs,fd={fs_fd}"]
        if plug_share:  # a port with PCIe's own hot-plug: q35 would use ACPI's, and the guest has no ACPI
            argv += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
                     "-device", f"pcie-root-port,id={SHARE_PORT},chassis=1"]
        else:
            properties = share_device(plan)
            argv += ["-device", ",".join([properties.pop("driver")] + [f"{k}={v}" for k, v in properties.items()])]
    if user_qmp_fd is not None:
        argv += ["-chardev", f"socket,id=userqmp,fd={user_qmp_fd},server=on,wait=off",
                 "-mon", "chardev=userqmp,mode=control"]
    for number, (fds, serial) in enumerate(disks, start=2):  # fd set 1 is the console's
        for fd in fds:
            argv += ["-add-fd", f"fd={fd},set={number}"]
        argv += ["-drive", f"file=/dev/fdset/{number},file.driver=host_device,format=raw,if=none,id={serial}",
                 "-device", f"{device(plan, 'virtio-blk')},drive={serial},serial={serial}"]
    if plan.display:  # a VNC server without a socket: the monitor hands it each client (QMP add_client)
        argv += ["-device", device(plan, "virtio-gpu"), "-vnc", "none"]
    if incoming:  # a saved VM's state comes through QMP's migrate-incoming (snapshot.py)
        argv += ["-incoming", "defer"]
    if tap_fd is not None:
        argv += ["-netdev", f"tap,id=net,fd={tap_fd}", "-device", f"{device(plan, 'virtio-net')},netdev=net"]
    return argv


def probe(config: Config, plan: VmPlan, accel: str, deadline: float = 5.0) -> bool:
    """Whether the guest boots under accel. For KVM, opening /dev/kvm proves nothing (a PVM host aborts or
    hangs a normal guest): boot the guest and see."""
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    import tempfile
    with tempfile.TemporaryDirectory(prefix="pyrunv-probe-") as tmp:
        console = os.path.join(tmp, "console.log")
        agent_host, agent_guest = socket.socketpair()
        qmp_host, qmp_guest = socket.socketpair()
        console_fd = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        argv = qemu_argv(config, plan, accel, agent_fd=agent_guest.fileno(), qmp_fd=qmp_guest.fileno(),
                         fs_fd=None, console_fd=console_fd, extra_params="pyrunv.probe")
        fds = (agent_guest.fileno(), qmp_guest.fileno(), console_fd)
        with agent_host, qmp_host, agent_guest, qmp_guest, Daemon(f"qemu ({accel} probe)", argv, fds,
                                                                   os.path.join(tmp, "qemu.log")) as qemu:
            os.close(console_fd)
            try:
                qemu.proc.wait(deadline)
            except subprocess.TimeoutExpired:
                return False
            try:
                with open(console, "rb") as f:
                    return b"pyrunv-agent: probe ok" in f.read()
            except FileNotFoundError:
                return False  # QEMU refused to start with this accelerator


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


def _shown(argv: list) -> str:
    """The command line as a shell would take it (shlex imports re: only on this failure path)."""
    import shlex
    return shlex.join(argv)


def _numbers(text: str) -> tuple:
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
    found = (f"QEMU {'.'.join(map(str, _numbers(qemu)))} and {'the Rust' if rust else 'the C'} "
             f"virtiofsd {'.'.join(map(str, _numbers(virtiofsd)))}")
    if _numbers(qemu) >= CHECKPOINT_QEMU and rust and _numbers(virtiofsd) >= CHECKPOINT_VIRTIOFSD:
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


VERDICT_PATH = "/run/pyrunv-accel.json"  # tmpfs: a reboot or a new kvm module asks again
VERSION_PATH = "/run/pyrunv-version{}.json"  # one per binary, named after its path


def _remembered(path: str, key: str, compute):
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


def choose_accel(config: Config, plan: VmPlan) -> str:
    """KVM if it really boots our guest, else TCG. The verdict is remembered until the host reboots."""
    if plan.accel != "auto":
        return plan.accel

    def probe_kvm() -> str:
        started = time.monotonic()
        accel = "kvm" if probe(config, plan, "kvm") else "tcg"
        log.info("accel probe: %s in %.2fs", accel, time.monotonic() - started)
        return accel
    key = f"{config.qemu} {plan.kernel} {os.stat(plan.kernel).st_mtime_ns if os.path.exists(plan.kernel) else 0}"
    return _remembered(VERDICT_PATH, key, probe_kvm)


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
    return _remembered(VERSION_PATH.format(binary.replace("/", "_")), f"{binary} {st.st_mtime_ns} {st.st_size}", ask)


def qemu_release(qemu: str) -> tuple:
    """(major, minor) of the QEMU binary, (0, 0) if it cannot say."""
    return _numbers(cached_version(qemu))
