"""Helper processes (QEMU, virtiofsd) started from an argv list, each inside a context manager that always
cleans up, and dying with the monitor that started them."""
import contextlib
import ctypes
import functools
import os
import select
import signal
import subprocess

from ..errors import PyrunvError
from ..logs import log


PR_SET_PDEATHSIG = 1


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
        """What Daemon.adopt needs in the monitor's fresh interpreter (see monitor/main.py)."""
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


def _shown(argv: list) -> str:
    """The command line as a shell would take it (shlex imports re: only on this failure path)."""
    import shlex
    return shlex.join(argv)
