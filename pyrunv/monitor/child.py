"""The short-lived helpers the monitor runs on the host (the network's plumbing, the port-forward redirect),
each from an argv list and with a deadline."""
import asyncio
import shlex

from ..errors import PyrunvError
from ..logs import log


async def run_child(argv: list, timeout: float, what: str) -> bytes:
    """The stdout of a helper run in the monitor's namespaces; PyrunvError (its last line of stderr) if it
    fails or outlasts the timeout."""
    child = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(child.communicate(), timeout)
    except asyncio.TimeoutError:
        child.kill()
        await child.wait()
        out, err = b"", f"took over {timeout:g}s".encode()
    if child.returncode:
        log.error("%s failed: %s", what, shlex.join(argv))
        lines = err.decode(errors="replace").strip().splitlines()
        raise PyrunvError(f"{what}: {lines[-1] if lines else 'failed'}")
    return out
