"""Figure 12: port-forward, as containerd does it: a connection to 127.0.0.1:PORT made in the pod's network
namespace on the host, against runc, where the container listens in that namespace itself."""
import subprocess
import time

from .figures import TIME_HEADERS, Figure, Settings, Table, ms, ratio, rounds, timed_row, x
from .harness import BenchError, Workspace, median

PORT = 9000
BIG_MIB = 32
SANDBOX = {"io.kubernetes.cri.container-type": "sandbox"}  # pyrunv forwards the ports of a pod's sandbox
SERVER = ("sh", "-c", f"echo ok > /www/small && head -c {BIG_MIB}m /dev/zero > /www/big && "
          f"exec httpd -f -p {PORT} -h /www")


def _server(config: dict) -> None:
    config.setdefault("annotations", {}).update(SANDBOX)
    config["mounts"].append({"destination": "/www", "type": "tmpfs", "source": "tmpfs",
                             "options": [f"size={BIG_MIB + 8}m"]})
    config["linux"].setdefault("resources", {})["memory"] = {"limit": 256 << 20}  # room for the file


def _get(netns: str, name: str) -> float:
    """Seconds for busybox wget of /NAME from 127.0.0.1:PORT in the network namespace, to /dev/null."""
    started = time.perf_counter()
    result = subprocess.run(["nsenter", f"--net={netns}", "busybox", "wget", "-q", "-O", "/dev/null",
                             f"http://127.0.0.1:{PORT}/{name}"], capture_output=True, timeout=60)
    if result.returncode:
        raise BenchError(f"wget /{name} in {netns}: {result.stderr.decode(errors='replace').strip()}")
    return time.perf_counter() - started


def _serving(netns: str, deadline: float = 30.0) -> None:
    subprocess.run(["nsenter", f"--net={netns}", "ip", "link", "set", "lo", "up"], check=True)  # as CNI does
    until = time.monotonic() + deadline
    while True:
        try:
            _get(netns, "small")
            return
        except BenchError:
            if time.monotonic() > until:
                raise
            time.sleep(0.1)


def portforward(ws: Workspace, s: Settings, kvm: dict) -> Figure:
    fig = Figure(12, "Port-forward")
    fig.method = (
        f"A pod's busybox `httpd` on port {PORT} (its files on a tmpfs), reached the way containerd's port-forward "
        f"reaches it: `busybox wget` run on the host inside the pod's network namespace (`nsenter --net`), to "
        f"`127.0.0.1:{PORT}`. With runc the server listens in that namespace itself; with pyrunv it listens in the "
        f"VM, and the monitor relays the connection to the guest's `127.0.0.1` (docs/kubernetes.md). A request "
        f"of a 3-byte file (the connection's set-up and one round trip, with wget's own start) and of a "
        f"{BIG_MIB} MiB file, each timed from wget's exec to its exit, pyrunv and runc in turn, "
        f"{rounds(s.iterations)}, after the server answered once.")
    bundles = ws.bundle_pair("httpd", *SERVER, edit=_server)
    samples = {(kind, name): [] for kind in ("pyrunv", "runc") for name in ("small", "big")}
    netns = {}
    for kind, bundle in zip(("pyrunv", "runc"), bundles):
        root = ws.root(kind, "portforward")
        container_id, _ = ws.start_idle(kind, root, bundle, prefix="pf")
        netns[kind] = f"/proc/{ws.state(kind, root, container_id)['pid']}/ns/net"
        _serving(netns[kind])
    for _ in range(s.iterations):
        for (kind, name), times in samples.items():
            times.append(_get(netns[kind], name))
    med = {key: median(times) for key, times in samples.items()}
    fig.tables.append(Table(TIME_HEADERS, [
        timed_row(f"{kind}: GET of the {'3-byte' if name == 'small' else f'{BIG_MIB} MiB'} file", times)
        for (kind, name), times in samples.items()]))
    rate = {kind: BIG_MIB / med[(kind, "big")] for kind in ("pyrunv", "runc")}
    fig.ratios = [("3-byte GET, pyrunv / runc", ratio(med[("pyrunv", "small")], med[("runc", "small")]),
                   f"{ms(med[('pyrunv', 'small')] - med[('runc', 'small')])} more"),
                  (f"{BIG_MIB} MiB GET, pyrunv / runc", ratio(med[("pyrunv", "big")], med[("runc", "big")]),
                   f"{rate['pyrunv']:.0f} MiB/s against {rate['runc']:.0f} MiB/s")]
    fig.data = {"medians": {f"{k} {n}": v for (k, n), v in med.items()}, "mib_per_s": rate}
    fig.summary = (f"port-forward: a 3-byte GET {ms(med[('pyrunv', 'small')])} (runc {ms(med[('runc', 'small')])}), "
                   f"{BIG_MIB} MiB at {rate['pyrunv']:.0f} MiB/s (runc {rate['runc']:.0f} MiB/s) | ratio "
                   f"{x(fig.ratios[0][1])} and {x(fig.ratios[1][1])}")
    return fig
