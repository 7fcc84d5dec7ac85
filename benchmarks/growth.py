"""Figure 13: what growing costs: `update` bringing a vCPU online and adding memory beside runc's update, a VM
that can grow against one that cannot (start and memory), and a container that fills its VM, until its exit."""
import os
import time

from .figures import TIME_HEADERS, Figure, Settings, Table, mib, ms, ratio, rounds, timed_row, x
from .harness import Workspace, container_pss, median, process_table

QUOTA = {"cpu": {"quota": 100000, "period": 100000}}
MEMORY = {"memory": {"limit": 128 << 20}}
FILL = ("sh", "-c", "(x=a; while :; do x=$x$x; done); true")  # the subshell dies; the container exits 0
LIMIT = 96 << 20
# (what grows, its limits at the start, the update's flags up and back down)
UPDATES = (("cpu", QUOTA, ("--cpu-quota", "200000"), ("--cpu-quota", "100000")),
           ("memory", MEMORY, ("--memory", "384m"), ("--memory", "128m")))


def _config(ws: Workspace, name: str, text: str) -> dict:
    path = os.path.join(ws.mkdir("config"), f"{name}.toml")
    with open(path, "w") as f:
        f.write(text)
    return dict(ws.env, PYRUNV_CONFIG=path)


def _update(ws: Workspace, s: Settings, samples: dict, what: str, limits: dict, up: tuple, down: tuple) -> None:
    bundles = ws.bundle_pair(f"{what}-update", "sleep", "3600", edit=lambda c: c["linux"].update(resources=limits))
    for kind, bundle in zip(("pyrunv", "runc"), bundles):
        root = ws.root(kind, "growth")
        cid, _ = ws.start_idle(kind, root, bundle, what)
        try:
            for _ in range(s.iterations):
                for direction, flags in (("up", up), ("down", down)):
                    samples[f"{what} {kind} {direction}"].append(ws.command(kind, root, "update", *flags, cid)[0])
        finally:
            ws.delete(kind, root, cid)


def _growable_against_fixed(ws: Workspace, s: Settings, samples: dict) -> dict:
    envs = {"fixed": _config(ws, "fixed", "max_vcpus = 1\nmax_memory_mib = 32\n"),
            "growable": _config(ws, "growable", "max_vcpus = 2\nmax_memory_mib = 2048\n")}
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
        "Updates: a container with a quota of 1 CPU (`sleep`), then `update --cpu-quota 200000` and back to 100000; "
        "one with a memory limit of 128 MiB, then `update --memory 384m` (its VM grows by 256 MiB, from 160 to 416) "
        f"and back to 128m; each timed from exec to exit, {rounds(s.iterations)} each way, for pyrunv (a vCPU "
        "brought online and offline; memory added by the agent, then taken back by the balloon) and runc. "
        "Growable against fixed: `run` of `/bin/true` with `max_vcpus = 2` and `max_memory_mib = 2048` (2 vCPUs "
        "and 2 GiB in QEMU, 1 vCPU and 128 MiB in use) and with `max_vcpus = 1`, `max_memory_mib = 32`, in turn, "
        "after one untimed run of each (which saves each shape's template); then the host PSS of one idle VM of "
        f"each (figure 3's way), after {s.settle:g} s. Filling: a shell doubling a string until the OOM killer "
        f"takes it, from `run` to exit, {rounds(s.rounds)}: pyrunv without a limit (the containers' parent cgroup "
        f"in the guest stops it), pyrunv and runc with a {LIMIT >> 20} MiB limit.")
    samples = {f"{what} {kind} {direction}": [] for what, *_ in UPDATES for kind in ("pyrunv", "runc")
               for direction in ("up", "down")}
    samples.update({k: [] for k in ("start fixed", "start growable", "fill pyrunv", "fill pyrunv limited",
                                    "fill runc limited")})
    for what, limits, up, down in UPDATES:
        if what == "cpu" and (os.cpu_count() or 1) < 2:
            fig.notes.append("One core: max_vcpus is 1 here, the CPU update is not measured.")
            continue
        _update(ws, s, samples, what, limits, up, down)
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
    for what, grown in (("memory", "256 MiB more"), ("cpu", "one more CPU")):
        if f"{what} pyrunv up" in med:
            mine, runc = med[f"{what} pyrunv up"], med[f"{what} runc up"]
            fig.ratios.insert(0, (f"update {grown}, pyrunv / runc", ratio(mine, runc), f"{ms(mine)} against {ms(runc)}"))
    fig.data = {"medians": med, "pss_kib": pss}
    fig.summary = ("growth: " + ", ".join(f"{c} {x(v)}" for c, v, _ in fig.ratios) + " | ratio "
                   + " ".join(x(v) for _, v, _ in fig.ratios))
    return fig
