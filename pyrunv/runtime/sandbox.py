"""The owner of a VM's lifetime, on the CLI's side: it starts the VM's monitor and ends it.

The monitor (monitor/main.py, monitor/service.py) runs the VM; it lives as long as the VM's own container, the
sandbox of a pod. The pod's other containers come and go inside it (container.py)."""
import contextlib
import json
import os
import select
import signal
import sys
import time

from .. import logs
from ..config import Config
from ..errors import PyrunvError
from ..logs import log
from ..monitor import control
from ..state import store as state
from ..vm.plan import VmPlan


# pyrunv's own directory: an editable install finds it by a meta-path hook, not a path entry, so the CLI's
# sys.path has it only when the cwd happens to be the source tree.
PYRUNV_PATH = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The monitor's fresh interpreter (monitor.main) lives as long as the container and need not carry the
# modules the CLI loaded (click, jsonschema) in its memory. -S and the CLI's own sys.path spare it the
# site-packages scan.
_BOOTSTRAP = ("import os, sys; sys.path.insert(0, sys.argv[4]); from pyrunv import jsonlite; "
              "data = jsonlite.loads(os.fdopen(int(sys.argv[2])).read()); sys.path[:] = data['path']; "
              "from pyrunv.monitor.main import main; main(data, int(sys.argv[3]))")


def launch(store: state.Store, record: state.Record, plan: VmPlan, config: Config, *,
           terminal: bool, console_socket: str | None, console_size: tuple | None, cgroup=None,
           restore_from: dict | None = None, while_booting=None) -> tuple:
    """Starts the monitor and returns (pid, accel) once the container's process is prepared in the VM;
    while_booting() runs meanwhile, and if it raises, the monitor is killed with its VM.
    restore_from is a saved VM's incoming (snapshot.Source.open); the monitor inherits the fd its `fd:` URI names.
    The monitor enters `cgroup` (a cgroups.HostCgroup) before it starts QEMU and virtiofsd, so that their
    memory is charged there from the first page; the hierarchies that count CPU time wait for `start`."""
    from ..monitor.main import Monitor
    monitor = Monitor(store, record, plan, config, terminal, console_socket, console_size, restore_from)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _become_monitor(monitor, cgroup, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reports:
        try:
            if while_booting:
                while_booting()
            report = _report(reports, config.boot_timeout + 30)
            if not report.startswith("ok "):
                raise PyrunvError(report.strip() or "the container's monitor failed; see the log")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # its helpers die with it (PDEATHSIG)
            os.waitpid(pid, 0)
            raise
    return pid, report.split()[1]


def _become_monitor(monitor, cgroup, report_fd: int) -> None:
    """The forked child: starts the VM at once, with the modules the CLI has loaded, then execs the monitor's
    fresh interpreter, which takes the VM over while it boots. Never returns into the CLI's code."""
    try:
        handover = monitor.start_vm(report_fd, cgroup)
        data = os.memfd_create("pyrunv-monitor", 0)  # not a pipe: that could fill before anyone reads it
        with open(data, "w", closefd=False) as f:
            json.dump({"path": [PYRUNV_PATH] + sys.path, "log": logs.settings(), **monitor.to_json(),
                       "vm": handover}, f)
        os.lseek(data, 0, os.SEEK_SET)
        for fd in (data, report_fd):
            os.set_inheritable(fd, True)
        os.execv(sys.executable, [sys.executable, "-S", "-c", _BOOTSTRAP, f"pyrunv-monitor:{monitor.record.id}",
                                  str(data), str(report_fd), PYRUNV_PATH])
    except PyrunvError as e:
        monitor.report(report_fd, str(e))  # only now: what start_vm started is gone
    except BaseException as e:
        log.exception("monitor failed")
        monitor.report(report_fd, f"monitor failed: {e}")
    finally:
        os._exit(1)  # also if the report itself failed: create then says the monitor failed


def _report(reports, deadline: float) -> str:
    """What the monitor wrote before it closed its end: "ok ACCEL", or why it failed."""
    report = b""
    while select.select([reports], [], [], deadline)[0]:
        chunk = reports.read1(4096)
        if not chunk:
            break
        report += chunk
    return report.decode(errors="replace")


def stop(store: state.Store, record: state.Record, timeout: float = 10.0) -> None:
    """Ends the VM's monitor and with it the VM and every container in it. QEMU and virtiofsd die with
    the monitor (PDEATHSIG); they are made sure of before the state goes."""
    # A start time of 0 means it was already dead when recorded: waiting for it to change would never end.
    if record.pid and record.pid_start and state.process_start_time(record.pid) == record.pid_start:
        with contextlib.suppress(PyrunvError):
            control.call(store.path(record.id), "shutdown", timeout=timeout)
        stop_process(record.pid, record.pid_start, timeout)
    _kill_helpers(store.path(record.id))


def stop_process(pid: int, start_time: int, timeout: float = 10.0) -> None:
    """Waits for a process that has been told to go, and kills it if it does not go in time."""
    if not pid or not start_time:
        return
    deadline = time.monotonic() + timeout
    while state.process_start_time(pid) == start_time:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.01)


def _kill_helpers(state_dir: str) -> None:
    try:
        with open(os.path.join(state_dir, "helpers.json")) as f:
            helpers = json.load(f)
    except (OSError, ValueError):
        return
    for pid, start_time in helpers:
        if state.process_start_time(pid) == start_time:
            os.kill(pid, signal.SIGKILL)
            while state.process_start_time(pid) == start_time:
                time.sleep(0.01)
