"""The QEMU command line of a VM: its machine, its devices, the guest kernel's command line."""
from ..config import Config
from . import versions
from . import plan as plan_mod
from .plan import VmPlan


AGENT_PORT = "pyrunv.agent"
QMP_SOCKET = "qmp.sock"  # in the state directory: `pyrunv qmp` and qmp-shell connect to it
VNC_SOCKET = "vnc.sock"  # in the state directory of a VM with a display: VNC clients connect to it
SHARE_TAG = "pyrunv"
SHARE_PORT = "share-port"  # the PCIe port a template's VM gets its share on (template.py)
# noreplace-smp: a one-vCPU guest would otherwise rewrite every LOCK prefix in its text at boot, one
# text_poke each (about 40 ms under TCG).
BASE_PARAMS = ("console=ttyS0 quiet panic=-1 reboot=t tsc=reliable no_timer_check rdinit=/init "
               "8250.nr_uarts=1 cryptomgr.notests random.trust_cpu=on rcupdate.rcu_expedited=1 noreplace-smp")


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
        if versions.qemu_release(config.qemu) >= versions.PCREL_QEMU:
            # This QEMU keys x86 translations by physical address. virtiofsd refills freed page-cache pages
            # behind TCG's back, so a page that had held other code ran its stale translation: SIGSEGV and
            # SIGILL at random. A page the guest zeroes as it allocates it loses its translations first.
            # (init_on_free would do too, but it zeroes all of the guest's RAM at boot: every page touched.)
            params.append("init_on_alloc=1")
    if plan_mod.present_cpus(plan) > plan.vcpus:  # the others wait, offline, for `update` to bring them online
        params.append(f"maxcpus={plan.vcpus}")
    if plan_mod.ram_mib(plan) > plan.memory_mib:  # the rest waits, unused, for `update` to add it
        params.append(f"mem={plan.memory_mib}M")
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
    cpus, ram = plan_mod.present_cpus(plan), plan_mod.ram_mib(plan)
    # The translation cache is each vCPU's room: with one shared by more vCPUs than are online, a start from
    # a template of 1 online vCPU of 2 took 1.11x as long (1.02x with this; the idle PSS did not change).
    tcg = f"tcg,thread={'multi' if cpus > 1 else 'single'},tb-size={config.tcg_tb_size_mib * cpus}"
    argv = [config.qemu, *machine_args(plan, accel),
            "-accel", tcg if accel == "tcg" else "kvm",
            "-cpu", TCG_CPU if accel == "tcg" else "host",
            # One socket per vCPU: the guest has no ACPI, and the firmware's MP table, its only list of CPUs,
            # names one core per socket, while QEMU (6.2 and later) would make them cores of one socket.
            "-smp", f"{cpus},sockets={cpus},cores=1,threads=1", "-m", f"{ram}M",
            # Pages the guest never touches cost the host nothing: the memfd allocates them on first use.
            "-object", f"memory-backend-memfd,id=mem,size={ram}M,share=on",
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
    if plan.display:  # a VNC server without a socket: the monitor hands it each client (QMP add_client), which
        # skips the password on the owner-only unix socket and is asked for it on `display --listen`'s port
        argv += ["-device", device(plan, "virtio-gpu"), "-vnc", "none,password=on"]
    if incoming:  # a saved VM's state comes through QMP's migrate-incoming (snapshot.py)
        argv += ["-incoming", "defer"]
    if tap_fd is not None:
        argv += ["-netdev", f"tap,id=net,fd={tap_fd}", "-device", f"{device(plan, 'virtio-net')},netdev=net"]
    return argv
