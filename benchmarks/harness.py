"""What every benchmark shares: a scratch directory, bundles, pyrunv and runc containers that are
always deleted, timing, and the host memory (PSS) of a container's processes."""
import concurrent.futures
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_BUNDLE = os.path.join(REPO, "tools", "make-busybox-bundle.sh")
MIB = 1 << 20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark could not measure what it set out to (a container failed, output was wrong)."""


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def spread(values) -> str:
    """min-max of a sample, or '' for a single value."""
    values = list(values)
    return "" if len(values) < 2 else f"{min(values):.3g}-{max(values):.3g}"


def tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read()[-4096:].decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


def pss_kib(pid: int) -> int:
    """The process's proportional set size in KiB (0 if it is gone)."""
    try:
        return psutil.Process(pid).memory_full_info().pss // 1024
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def process_table() -> dict:
    """pid -> (ppid, start time, comm) for every process on the host, the start time in clock ticks since boot
    (as in helpers.json). Fresh Process objects: process_iter() caches create_time(), which a clock step puts off."""
    table, boot = {}, psutil.boot_time()
    for pid in psutil.pids():
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                table[pid] = (proc.ppid(), round((proc.create_time() - boot) * CLOCK_TICKS), proc.name())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return table


def descendants(table: dict, pid: int) -> list:
    """The pids below pid in one process_table(): all of a container's roles are read from the same snapshot."""
    children: dict = {}
    for child, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def containers_under(root: str) -> list:
    """The IDs of the containers a runtime root holds (its state directories), tracked or not."""
    if not os.path.isdir(root):
        return []
    return [e for e in os.listdir(root) if not e.startswith(".") and os.path.isdir(os.path.join(root, e))]


class Workspace:
    """One scratch directory for the whole run; every root, bundle, log and boot directory lives under it,
    so that anything left running afterwards can be found by its command line."""

    def __init__(self, pyrunv: str, runc: str, keep: bool = False):
        self.pyrunv, self.runc, self.keep = pyrunv, runc, keep
        self.base = tempfile.mkdtemp(prefix="pyrunv-bench-")
        self.logs = self.mkdir("logs")
        self._lock = threading.Lock()
        self._live: dict = {}   # (kind, root, id) -> True while the container may exist
        self._counter = 0
        self._bundles: dict = {}
        self.env = dict(os.environ)
        # make-busybox-bundle.sh runs `python3 -m pyrunv spec`: the venv's python3 comes first.
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")

    def mkdir(self, *parts) -> str:
        path = os.path.join(self.base, *parts)
        os.makedirs(path, exist_ok=True)
        return path

    def unique(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}-{os.getpid()}-{self._counter}"

    # Bundles ---------------------------------------------------------------------------------------

    def bundle(self, name: str, *args: str, edit=None) -> str:
        """A busybox bundle under the workspace (made once per name) whose process runs ARGS without a terminal."""
        if name in self._bundles:
            return self._bundles[name]
        path = os.path.join(self.base, "bundles", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        result = subprocess.run([MAKE_BUNDLE, path, *args], capture_output=True, env=self.env)
        if result.returncode:
            raise BenchError(f"make-busybox-bundle.sh {name} failed: {result.stderr.decode(errors='replace')[-500:]}")
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["process"]["terminal"] = False  # runc needs it without a console socket; the script sets it too
        if edit:
            edit(config)
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
        self._bundles[name] = path
        return path

    def bundle_pair(self, name: str, *args: str, edit=None) -> tuple:
        """(pyrunv bundle, runc bundle): two separate copies of the same bundle."""
        return self.bundle(name + "-pyrunv", *args, edit=edit), self.bundle(name + "-runc", *args, edit=edit)

    # Containers ------------------------------------------------------------------------------------

    def root(self, kind: str, name: str) -> str:
        return self.mkdir("roots", f"{kind}-{name}")

    def _track(self, kind: str, root: str, container_id: str, live: bool) -> None:
        with self._lock:
            if live:
                self._live[(kind, root, container_id)] = True
            else:
                self._live.pop((kind, root, container_id), None)

    def _argv(self, kind: str, root: str, *args: str) -> list:
        binary = self.pyrunv if kind == "pyrunv" else self.runc
        return [binary, "--root", root, *args]

    def command(self, kind: str, root: str, *args: str, stdout=subprocess.DEVNULL, env=None, timeout: float = 120,
                log: str = "") -> tuple:
        """`pyrunv` or `runc --root ROOT ARGS...`, timed from exec to exit: (seconds, its stdout: bytes with
        stdout=subprocess.PIPE, else None). Its stderr goes to LOG.err under the workspace's logs (log=os.devnull:
        nowhere). Raises
        BenchError when it fails or outlives timeout. A command that leaves a container running (`run -d`,
        `restore -d`) must not be given a pipe, which the container keeps open."""
        err = log if log == os.devnull else os.path.join(self.logs, f"{log or self.unique(f'{kind}-{args[0]}')}.err")
        what = f"{kind} {' '.join(args)}"
        with open(err, "wb") as err_file:
            started = time.perf_counter()
            try:
                result = subprocess.run(self._argv(kind, root, *args), stdin=subprocess.DEVNULL, stdout=stdout,
                                        stderr=err_file, timeout=timeout, env=env)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{what} did not finish within {timeout:g}s") from None
            elapsed = time.perf_counter() - started
        if result.returncode:
            raise BenchError(f"{what} exited {result.returncode}: {tail(err)}")
        return elapsed, result.stdout

    def run(self, kind: str, root: str, bundle: str, container_id: str, *, detach: bool = False,
            stdout=subprocess.DEVNULL, env=None, timeout: float = 300, log: str = "") -> tuple:
        """`run [-d]` of a container: (seconds, exit status). Raises BenchError when it fails.
        Not detached, it is deleted by `run` itself (pyrunv) or right after (runc). log: as for command()."""
        self._track(kind, root, container_id, True)
        try:
            elapsed, _ = self.command(kind, root, "run", *(["--detach"] if detach else []), "--bundle", bundle,
                                      container_id, stdout=stdout, env=env, timeout=timeout,
                                      log=log or f"{kind}-{container_id}")
        finally:
            if not detach:  # `run` deletes the container when it exits (runc: unless --keep)
                if os.path.exists(os.path.join(root, container_id)):
                    self.delete(kind, root, container_id)
                else:
                    self._track(kind, root, container_id, False)
        return elapsed, 0

    def start_idle(self, kind: str, root: str, bundle: str, prefix: str = "idle", log: str = "") -> tuple:
        """A detached container (the bundle's process should be long-lived): (id, seconds to start)."""
        container_id = self.unique(prefix)
        elapsed, _ = self.run(kind, root, bundle, container_id, detach=True, log=log)
        return container_id, elapsed

    def state(self, kind: str, root: str, container_id: str) -> dict:
        result = subprocess.run(self._argv(kind, root, "state", container_id), capture_output=True, timeout=60)
        if result.returncode:
            raise BenchError(f"{kind} state {container_id}: {result.stderr.decode(errors='replace').strip()}")
        return json.loads(result.stdout)

    def delete(self, kind: str, root: str, container_id: str) -> None:
        result = subprocess.run(self._argv(kind, root, "delete", "--force", container_id), stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=120)
        gone = not os.path.exists(os.path.join(root, container_id))
        if gone:
            self._track(kind, root, container_id, False)
        if result.returncode and not gone:
            raise BenchError(f"{kind} delete --force {container_id}: {result.stderr.decode(errors='replace').strip()}")

    def delete_many(self, kind: str, root: str, ids) -> list:
        """Deletes in parallel; returns the errors (as text) instead of raising on the first."""
        errors = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            for future in [pool.submit(self.delete, kind, root, i) for i in ids]:
                try:
                    future.result()
                except (BenchError, subprocess.TimeoutExpired) as e:
                    errors.append(str(e))
        return errors

    def cleanup(self) -> list:
        """Deletes every container the run may have left (tracked, or found under a root). Errors as text."""
        with self._lock:
            tracked = list(self._live)
        found = set(tracked)
        roots_dir = os.path.join(self.base, "roots")
        for name in (os.listdir(roots_dir) if os.path.isdir(roots_dir) else []):
            kind, root = name.split("-", 1)[0], os.path.join(roots_dir, name)
            found.update((kind, root, entry) for entry in containers_under(root))
        errors = []
        for kind in ("pyrunv", "runc"):
            by_root: dict = {}
            for k, root, container_id in found:
                if k == kind:
                    by_root.setdefault(root, []).append(container_id)
            for root, ids in by_root.items():
                errors += self.delete_many(kind, root, ids)
        return errors

    # Leftovers -------------------------------------------------------------------------------------

    def leftovers(self, wait: float = 5.0) -> list:
        """Processes still running whose command line names the workspace (QEMU, virtiofsd, monitors,
        runc containers' processes have none, so those are checked through their roots), after up to
        `wait` seconds for them to go. Returned as (pid, comm, cmdline)."""
        deadline = time.monotonic() + wait
        me = os.getpid()
        while True:
            table = process_table()
            stray = [(pid, comm, cmdline(pid)) for pid, (_, _, comm) in table.items()
                     if pid != me and self.base in cmdline(pid)]
            if not stray or time.monotonic() > deadline:
                return stray
            time.sleep(0.2)

    def kill(self, pids) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def mounts(self) -> list:
        # By hand: the raw lines are what is reported, and psutil.disk_partitions() rewrites their devices.
        with open("/proc/mounts") as f:
            return [line.strip() for line in f if self.base in line]

    def remove(self) -> None:
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)


def container_processes(root: str, container_id: str, monitor_pid: int, table: dict) -> dict:
    """The host processes of one pyrunv container, by role: monitor, qemu, virtiofsd (with its
    sandboxed child) and anything else the monitor started."""
    roles = {"monitor": [monitor_pid]}
    with open(os.path.join(root, container_id, "helpers.json")) as f:
        helpers = json.load(f)
    for role, (pid, start) in zip(("qemu", "virtiofsd"), helpers):
        if pid in table and table[pid][1] == start:
            roles[role] = [pid] + descendants(table, pid)
    claimed = {p for pids in roles.values() for p in pids}
    other = [p for p in descendants(table, monitor_pid) if p not in claimed]
    if other:
        roles["other"] = other
    return roles


def container_pss(root: str, container_id: str, monitor_pid: int, table: dict) -> dict:
    """KiB of PSS by role (see container_processes), plus "total"."""
    roles = container_processes(root, container_id, monitor_pid, table)
    pss = {role: sum(pss_kib(p) for p in pids) for role, pids in roles.items()}
    pss["total"] = sum(pss.values())
    return pss
