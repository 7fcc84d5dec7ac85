"""The signals a host process that stands for a guest process forwards, and its exit like that process's.

Shared by the monitor (the VM's own container) and the waiter (a pod member's init, a detached exec). Only the
C module behind signal: the waiter's memory is counted per container."""
import _signal as signal
import os
import resource

FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGTERM, signal.SIGALRM, signal.SIGPWR, signal.SIGTSTP, signal.SIGCONT)
UNKILLABLE = (signal.SIGCHLD, signal.SIGWINCH, signal.SIGURG, signal.SIGCONT, signal.SIGSTOP, signal.SIGTSTP,
              signal.SIGTTIN, signal.SIGTTOU)


def exit_like(code: int, sig: int) -> None:
    """Exit as the guest process did: its code, or death by the very signal that killed it."""
    if sig and sig not in UNKILLABLE:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    os._exit(code & 0xFF)
