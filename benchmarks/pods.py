"""Figure 8, pods: a Kubernetes pod is one VM, driven through containerd's CRI with the gRPC calls the kubelet
makes, pyrunv beside runc in the same containerd.

The containerd (with its CRI plugin, a CNI bridge of its own, the busybox and pause images built offline) and the
CRI client are the engine tests' (tests/engines/cri.py, enginelib.py), imported from there: grpc and the
container-runtime-interface-api package are needed for this figure only, and only when it runs."""
import os
import sys
import time

from pyrunv.state import store as state
from pyrunv.runtime.container import pod_members

from .figures import (ROLES, TIME_HEADERS, Figure, Settings, Table, measure_containers, mib, ms, ratio, rounds,
                      timed_row, x)
from .harness import REPO, BenchError, Workspace, container_pss, descendants, median, process_table, pss_kib

ENGINES = os.path.join(REPO, "tests", "engines")
# Not the engine tests' bridge and subnet (pyrunvcri0, 10.213.99.0/24): the suite may run beside them.
BRIDGE, SUBNET = "pyrunvbench0", "10.213.98.0/24"
TARGET_JOIN_S = 0.2        # the issue: a second container in a running pod, under TCG ("it boots nothing")
TARGET_PSS_RATIO = 1.2     # the issue: a pod with three idle containers against one single-container VM
MEMBERS = 3                # the pod's idle containers besides its sandbox
IDLE = ("sleep", "3600")
HANDLERS = ("pyrunv", "runc")


def engine_modules():
    """tests/engines' cri and enginelib modules, and grpc."""
    if ENGINES not in sys.path:
        sys.path.insert(0, ENGINES)
    try:
        import cri
        import enginelib
        import grpc
    except ImportError as e:
        raise BenchError(f"figure 8 needs the CRI client's packages (pip install .[test]): {e}") from None
    return cri, enginelib, grpc


class Pods:
    """Pods of one CRI endpoint, each stopped and removed (StopPodSandbox, RemovePodSandbox) when done with."""

    def __init__(self, ws: Workspace, client):
        self.ws, self.client = ws, client

    def run(self, handler: str) -> tuple:
        """RunPodSandbox, timed until it returns; the pod must then be READY. (pod id, its config, seconds)."""
        name = self.ws.unique(f"pod-{handler}")
        config = self.client.pod_config(name, log_directory=self.ws.mkdir("pod-logs", name))
        started = time.perf_counter()
        pod = self.client.run_pod(config=config, runtime_handler=handler)
        elapsed = time.perf_counter() - started
        status = self.client.pod_status(pod)[0]
        if status != "ready":
            self.remove(pod)
            raise BenchError(f"{handler}: pod {name} is {status} after RunPodSandbox")
        return pod, config, elapsed

    def container(self, pod: str, config, name: str) -> float:
        """CreateContainer + StartContainer of an idle busybox container, timed until StartContainer returns;
        the container must then be running."""
        started = time.perf_counter()
        cid = self.client.run_container(pod, config, name, *IDLE)
        elapsed = time.perf_counter() - started
        status = self.client.container_status(cid)
        if status[0] != "running":
            raise BenchError(f"container {name} of pod {pod} is {status[0]} (exit {status[1]}) after StartContainer")
        return elapsed

    def remove(self, pod: str) -> None:
        self.client.stop_pod(pod)
        self.client.remove_pod(pod)


def pod_round(pods: Pods, handler: str) -> tuple:
    """A pod started, one container started in it, then a second one: (pod start, second container start)."""
    pod, config, pod_start = pods.run(handler)
    try:
        pods.container(pod, config, "first")
        return pod_start, pods.container(pod, config, "second")
    finally:
        pods.remove(pod)


def pod_pss(root: str, pod: str, table: dict) -> dict:
    """KiB of PSS of a pyrunv pod by role: the sandbox's monitor, QEMU and virtiofsd (container_pss), and the
    waiters that stand for the members' inits (each member's pid-file process, its state.json `pid`); plus
    "members" (how many) and "total"."""
    store = state.Store(root)
    sandbox = store.load(pod)
    pss = container_pss(root, pod, sandbox.pid, table)
    del pss["total"]
    members = pod_members(store, pod)
    pss["waiters"] = sum(pss_kib(p) for m in members for p in [m.record.pid] + descendants(table, m.record.pid))
    pss["total"] = sum(pss.values())
    pss["members"] = len(members)
    return pss


def pod_memory(pods: Pods, s: Settings) -> dict:
    """pod_pss of a pyrunv pod with MEMBERS idle containers after s.settle seconds idle, with "shim" (the PSS of
    its containerd shim) and "accel" (what its VM runs with)."""
    pod, config, _ = pods.run("pyrunv")
    try:
        for i in range(MEMBERS):
            pods.container(pod, config, f"idle{i}")
        time.sleep(s.settle)
        root = str(pods.client.roots["pyrunv"])
        table = process_table()
        pss = pod_pss(root, pod, table)
        if pss["members"] != MEMBERS:
            raise BenchError(f"pod {pod}: {pss['members']} members in {root}, not {MEMBERS}")
        sandbox = state.Store(root).load(pod)
        shim = table.get(sandbox.pid, (0,))[0]
        pss["shim"] = pss_kib(shim) if table.get(shim, (0, 0, ""))[2].startswith("containerd-shim") else 0
        pss["accel"] = sandbox.accel
        return pss
    finally:
        pods.remove(pod)


def single_vms(ws: Workspace, s: Settings) -> tuple:
    """Total PSS (by role) of one single-container VM (`pyrunv run -d`, as before pods) running alone, then of
    MEMBERS of them running together, each after s.settle seconds idle."""
    bundle = ws.bundle("idle-pyrunv", *IDLE)
    root = ws.root("pyrunv", "pods")
    containers: dict = {}

    def add():
        cid, _ = ws.start_idle("pyrunv", root, bundle, "podvm")
        containers[cid] = ws.state("pyrunv", root, cid)["pid"]

    def total():
        time.sleep(s.settle)
        rows = measure_containers(ws, root, containers)
        return {k: sum(r.get(k, 0) for r in rows) for k in set().union(*rows)}
    try:
        add()
        one = total()
        while len(containers) < MEMBERS:
            add()
        return one, total()
    finally:
        errors = ws.delete_many("pyrunv", root, list(containers))
        if errors:
            raise BenchError("; ".join(errors))


def pods(ws: Workspace, s: Settings, kvm: dict) -> Figure:
    fig = Figure(8, "Pods")
    fig.method = (
        "Through containerd's CRI (runtime.v1 over gRPC, the calls a kubelet makes; containerd "
        "with its CRI plugin, a CNI bridge, the runc v2 shim and the runtime handlers `pyrunv` and `runc`, set up "
        "as in `tests/engines`; the pause image is a busybox stand-in that waits for a signal). With pyrunv a pod "
        "is one VM: the sandbox boots it, the pod's containers join it. Pod start: `RunPodSandbox`, timed until it "
        "returns (the pod is then READY, with its IP). Second container: `CreateContainer` + `StartContainer` of a "
        f"busybox `{' '.join(IDLE)}` in a pod that already runs one, timed until `StartContainer` returns. One pod "
        f"per round, pyrunv and runc alternating, after one untimed round each; {rounds(s.iterations)}. Memory: host "
        f"PSS (as in figure 3) of a pod with {MEMBERS} idle containers besides its sandbox (the pause container, "
        f"which Kubernetes does not list: `kubectl` would show {MEMBERS}/{MEMBERS}), all in one VM: the sandbox's "
        "monitor, QEMU and virtiofsd, and each member's waiter (its pid-file process), found through the runtime "
        f"root's `state.json` records; against {MEMBERS} single-container VMs as pyrunv ran before pods "
        f"(`pyrunv run -d` of {MEMBERS} bundles, running together) and against one running alone, each read after "
        f"{s.settle:g} s idle. containerd's shim (one per pod) is not counted in the pod; it is shown apart.")
    cri, enginelib, grpc = engine_modules()
    top = ws.mkdir("cri")
    samples = {f"{kind} {h}": [] for kind in ("pod", "join") for h in HANDLERS}
    try:
        image = enginelib.make_image(os.path.join(top, "busybox.tar"))
        with cri.serve(top, image, ws.pyrunv, BRIDGE, SUBNET, runc=ws.runc) as client:
            pods_ = Pods(ws, client)
            for handler in HANDLERS:  # the first pod of each handler pays for what is done once (CNI, snapshots)
                pod_round(pods_, handler)
            for _ in range(s.iterations):
                for handler in HANDLERS:
                    pod_start, join = pod_round(pods_, handler)
                    samples[f"pod {handler}"].append(pod_start)
                    samples[f"join {handler}"].append(join)
            pod = pod_memory(pods_, s)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        raise BenchError(f"CRI call failed: {code.name if code else ''} {e.details() if hasattr(e, 'details') else e}") \
            from None
    one, three = single_vms(ws, s)

    med = {k: median(v) for k, v in samples.items()}
    fig.tables.append(Table(TIME_HEADERS, [
        timed_row("pyrunv: RunPodSandbox (boots the pod's VM)", samples["pod pyrunv"]),
        timed_row("runc: RunPodSandbox", samples["pod runc"]),
        timed_row("pyrunv: second container, CreateContainer + StartContainer", samples["join pyrunv"]),
        timed_row("runc: second container, CreateContainer + StartContainer", samples["join runc"]),
    ]))
    roles = [r for r in ROLES[:3] + ("waiters",) + ROLES[3:] if pod.get(r) or one.get(r) or three.get(r)]
    headers = ["host PSS"] + [r + (" (+ child)" if r == "virtiofsd" else "") for r in roles] + ["total"]
    fig.tables.append(Table(headers, [
        [f"pod: sandbox + {MEMBERS} idle containers, one VM"] + [mib(pod.get(r, 0)) for r in roles] + [mib(pod["total"])],
        ["1 single-container VM, alone"] + [mib(one.get(r, 0)) for r in roles] + [mib(one["total"])],
        [f"{MEMBERS} single-container VMs, together (sum)"] + [mib(three.get(r, 0)) for r in roles]
        + [mib(three["total"])],
    ]))
    pss_one, pss_three = ratio(pod["total"], one["total"]), ratio(pod["total"], three["total"])
    fig.ratios = [
        ("pod start, pyrunv / runc", ratio(med["pod pyrunv"], med["pod runc"]),
         f"{ms(med['pod pyrunv'] - med['pod runc'])} slower"),
        ("second container start, pyrunv / runc", ratio(med["join pyrunv"], med["join runc"]),
         f"{ms(med['join pyrunv'] - med['join runc'])} slower"),
        ("pyrunv: second container start / pod start", ratio(med["join pyrunv"], med["pod pyrunv"]), ""),
        (f"PSS: pod of {MEMBERS} / 1 single-container VM", pss_one, f"goal <= {TARGET_PSS_RATIO:g}x"),
        (f"PSS: pod of {MEMBERS} / {MEMBERS} single-container VMs", pss_three,
         f"{mib(three['total'] - pod['total'])} saved"),
    ]
    if pod["shim"]:
        fig.notes.append(f"containerd's shim of the pod (containerd-shim-runc-v2, not counted above): "
                         f"{mib(pod['shim'])} PSS.")
    fig.data = {"medians": med, "samples": samples, "pod_kib": pod, "one_kib": one, "three_kib": three,
                "pss_ratio": pss_one, "accel": pod["accel"]}
    fig.summary = (f"pods: pod start pyrunv {ms(med['pod pyrunv'])} median, runc {ms(med['pod runc'])}; second "
                   f"container pyrunv {ms(med['join pyrunv'])}, runc {ms(med['join runc'])}; PSS pod of {MEMBERS} "
                   f"{mib(pod['total'])}, 1 VM {mib(one['total'])}, {MEMBERS} VMs {mib(three['total'])} | ratio "
                   f"pod-start pyrunv/runc {x(fig.ratios[0][1])} | ratio second-container pyrunv/runc "
                   f"{x(fig.ratios[1][1])} | ratio PSS pod/1-VM {x(pss_one)} | ratio PSS pod/{MEMBERS}-VMs "
                   f"{x(pss_three)}")
    return fig
