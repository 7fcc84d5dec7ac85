"""Figure 13: what growing costs: `update` bringing a vCPU online beside runc's update, a VM that can grow
against one that cannot (start and memory), and a container that fills its VM, from start to its exit."""
import os
import time

from .figures import TIME_HEADERS, Figure, Settings, Table, mib, ms, ratio, rounds, timed_row, x
from .harness import Workspace, container_pss, median, process_table

QUOTA = {"cpu": {"quota": 100000, "period": 100000}}
FILL = ("sh", "-c", "(x=a; while :; do x=$x$x; done); true")  # the subshell dies; the container exits 0
LIMIT = 96 << 20


def _config(ws: Workspace, name: str, text: str) -> dict:
    path = os.path.join(ws.mkdir("config"), f"{name}.toml")
    with open(path, "w") as f:
        f.write(text)
    return dict(ws.env, PYRUNV_CONFIG=path)


def _cpu_update(ws: Workspace, s: Settings, samples: dict) -> None:
    bundles = ws.bundle_pair("quota1", "sleep", "3600", edit=lambda c: c["linux"].update(resources=QUOTA))
    for kind, bundle in zip(("pyrunv", "runc"), bundles):
        root = ws.root(kind, "growth")
        cid, _ = ws.start_idle(kind, root, bundle, "cpu")
        try:
            for _ in range(s.iterations):
                for direction, quota in (("up", "200000"), ("down", "100000")):
                    samples[f"{kind} {direction}"].append(ws.command(kind, root, "update", "--cpu-quota", quota, cid)[0])
        finally:
            ws.delete(kind, root, cid)


def _growable_against_fixed(ws: Workspace, s: Settings, samples: dict) -> dict:
    envs = {"fixed": _config(ws, "fixed", "max_vcpus = 1\n"), "growable": _config(ws, "growable", "max_vcpus = 2\n")}
    bundle = ws.bundle("grow-true", "/bin/true")
    idle = ws.bundle("grow-idle", "sleep", "3600")
    root = ws.root("pyrunv", "growable")
    for env in envs.values():  # the first of each shape saves its template
        ws.run("pyrunv", root, bundle, ws.unique("g"), env=env)
    for _ in range(s.iterations):
        for side, env in envs.items():
            samples[f"start {side}"].append(ws.run("pyrunv", root, bundle, ws.unique("g"), env=env)[0])
    started = {}
    for side, env in envs.items():
        started[side] = ws.unique(side)
        ws.run("pyrunv", root, idle, started[side], detach=True, env=env)
    time.sleep(s.settle)
    table = process_table()
    try:
        return {side: container_pss(root, cid, ws.state("pyrunv", root, cid)["pid"], table)["total"]
                for side, cid in started.items()}
    finally:
        ws.delete_many("pyrunv", root, list(started.values()))


def growth(ws: Workspace, s: Settings, kvm: dict) -> Figure:
    fig = Figure(13, "Growing and filling a VM")
    fig.method = (
        "CPU: a container with a quota of 1 CPU (`sleep`), then `update --cpu-quota 200000` and back to 100000, "
        f"timed from exec to exit, {rounds(s.iterations)} each way, for pyrunv (the VM's second vCPU brought "
        "online and offline) and runc. Growable against fixed: `run` of `/bin/true` with `max_vcpus = 2` (2 "
        "vCPUs present, 1 online) and with `max_vcpus = 1`, in turn, after one untimed run of each (which saves "
        f"each shape's template); then the host PSS of one idle VM of each (figure 3's way), after {s.settle:g} s. "
        f"Filling: a shell doubling a string until the OOM killer takes it, from `run` to exit, {rounds(s.rounds)}: "
        f"pyrunv without a limit (the containers' parent cgroup in the guest stops it), pyrunv and runc with a "
        f"{LIMIT >> 20} MiB limit. Memory cannot grow beyond the VM's boot size yet: not measured.")
    samples = {k: [] for k in ("pyrunv up", "pyrunv down", "runc up", "runc down", "start fixed", "start growable",
                               "fill pyrunv", "fill pyrunv limited", "fill runc limited")}
    if (os.cpu_count() or 1) >= 2:
        _cpu_update(ws, s, samples)
    else:
        fig.notes.append("One core: max_vcpus is 1 here, the CPU update is not measured.")
    pss = _growable_against_fixed(ws, s, samples)
    limited = lambda c: c["linux"].update(resources={"memory": {"limit": LIMIT}})  # noqa: E731
    fill = {"fill pyrunv": ("pyrunv", ws.bundle("fill", *FILL)),
            "fill pyrunv limited": ("pyrunv", ws.bundle("fill-limited-pyrunv", *FILL, edit=limited)),
            "fill runc limited": ("runc", ws.bundle("fill-limited-runc", *FILL, edit=limited))}
    for _ in range(s.rounds):
        for key, (kind, bundle) in fill.items():
            samples[key].append(ws.run(kind, ws.root(kind, "fill"), bundle, ws.unique("fill"))[0])
    rows = [timed_row(key, times) for key, times in samples.items() if times]
    rows += [[f"PSS of an idle VM, {side}", mib(kib), "", "1"] for side, kib in sorted(pss.items())]
    fig.tables.append(Table(TIME_HEADERS, rows))
    med = {key: median(times) for key, times in samples.items() if times}
    fig.ratios = [("start, growable / fixed", ratio(med["start growable"], med["start fixed"]), ""),
                  ("idle PSS, growable / fixed", ratio(pss.get("growable", 0), pss.get("fixed", 0)), ""),
                  ("filling, no limit / a limit", ratio(med["fill pyrunv"], med["fill pyrunv limited"]),
                   f"{ms(med['fill pyrunv'])} against {ms(med['fill pyrunv limited'])}")]
    if "pyrunv up" in med:
        fig.ratios.insert(0, ("update one more CPU, pyrunv / runc", ratio(med["pyrunv up"], med["runc up"]),
                              f"{ms(med['pyrunv up'])} against {ms(med['runc up'])}"))
    fig.data = {"medians": med, "pss_kib": pss}
    fig.summary = ("growth: " + ", ".join(f"{c} {x(v)}" for c, v, _ in fig.ratios) + " | ratio "
                   + " ".join(x(v) for _, v, _ in fig.ratios))
    return fig
