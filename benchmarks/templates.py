"""Figure 10: a VM loaded from its template beside one that boots (pyrunv/template.py), where QEMU can."""
import os
import time

from pyrunv import config as config_mod
from pyrunv.vm import template
from pyrunv.vm import versions

from .figures import TIME_HEADERS, Figure, Settings, Table, measure_containers, mib, ms, ratio, rounds, timed_row, x
from .harness import Workspace, median

SIDES = ("boot", "template")
ROLES = ("qemu", "virtiofsd", "monitor")


def templates(ws: Workspace, s: Settings, kvm: dict) -> Figure:
    fig = Figure(10, "Starting from a template")
    fig.method = (
        "`pyrunv run -d` of an idle busybox `sleep 3600`, timed from exec to exit (create and start: the container "
        "runs), with every VM booted (`template = \"off\"`) and with VMs loaded from the template of their shape "
        "(`template = \"auto\"`, a template directory of the run's own, the template made beforehand by one "
        f"untimed VM), in turn, {rounds(s.iterations)}. Then, {s.settle:g} s later, the host PSS of that "
        "container's QEMU, virtiofsd and monitor (one container running at a time), and the container is deleted. "
        "Only where QEMU can load a template: QEMU >= 9.0 with the Rust virtiofsd (Debian 13), the whole VM on "
        "microvm; QEMU < 8.2 (Debian 12), on q35 with the share plugged in after the load, while the booted VMs "
        "are microvm (`machine = \"auto\"`). The other settings are the defaults.")
    refusal = versions.template_refusal(config_mod.load())
    if refusal:
        fig.tables.append(Table(["", "not measured"], [["a VM loaded from its template", refusal]]))
        fig.summary = f"templates: not measured here: {refusal}"
        return fig
    envs, directory = {}, ws.mkdir("templates")
    for side, setting in zip(SIDES, ('template = "off"', f'template_dir = "{directory}"')):
        path = os.path.join(ws.base, f"{side}.toml")
        with open(path, "w") as f:
            f.write(setting + "\n")
        envs[side] = dict(ws.env, PYRUNV_CONFIG=path)
    bundle = ws.bundle("template-idle", "sleep", "3600")
    root = ws.root("pyrunv", "templates")
    maker = ws.unique("template-maker")
    ws.run("pyrunv", root, bundle, maker, detach=True, env=envs["template"])
    ws.delete("pyrunv", root, maker)
    times: dict = {side: [] for side in SIDES}
    pss: dict = {side: [] for side in SIDES}
    for _ in range(s.iterations):
        for side in SIDES:
            container_id = ws.unique(f"template-{side}")
            elapsed, _ = ws.run("pyrunv", root, bundle, container_id, detach=True, env=envs[side])
            times[side].append(elapsed)
            time.sleep(s.settle)
            monitor = ws.state("pyrunv", root, container_id)["pid"]
            pss[side].append(measure_containers(ws, root, {container_id: monitor})[0])
            ws.delete("pyrunv", root, container_id)
    saved = [e for e in os.scandir(directory) if e.name.endswith(".vm")]
    med = {side: median(times[side]) for side in SIDES}
    memory = {side: {role: median(row.get(role, 0) for row in pss[side]) for role in ROLES + ("total",)}
              for side in SIDES}
    fig.tables.append(Table(TIME_HEADERS, [timed_row("run -d, the VM booted", times["boot"]),
                                           timed_row("run -d, the VM loaded from its template", times["template"])]))
    fig.tables.append(Table(["PSS of one container (median)"] + list(ROLES) + ["total"], [
        [label] + [mib(memory[side][role]) for role in ROLES + ("total",)]
        for label, side in (("booted", "boot"), ("loaded from its template", "template"))]))
    disk = sum(e.stat().st_blocks * 512 for e in saved) / max(len(saved), 1) / 1024
    fig.notes.append(f"The template on disk: {mib(disk)} (a sparse file; {template.KEEP} are kept at most).")
    fig.ratios = [("run -d, template / boot", ratio(med["template"], med["boot"]),
                   f"{ms(med['boot'] - med['template'])} faster"),
                  ("PSS, template / boot", ratio(memory["template"]["total"], memory["boot"]["total"]),
                   f"{mib(memory['boot']['total'] - memory['template']['total'])} less")]
    fig.data = {"samples": times, "medians": med, "pss_kib": memory, "template_kib_on_disk": disk}
    fig.summary = (f"templates: run -d {ms(med['template'])} from a template, {ms(med['boot'])} booted; PSS "
                   f"{mib(memory['template']['total'])} against {mib(memory['boot']['total'])} | ratio time "
                   f"template/boot {x(fig.ratios[0][1])} | ratio PSS template/boot {x(fig.ratios[1][1])}")
    return fig
