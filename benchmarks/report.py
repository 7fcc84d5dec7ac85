"""The console report, the targets, the PNG and docs/performance.md."""
import os
import time

from . import figures as F, pods as P
from .figures import mib, x

ANALYSIS_PLACEHOLDER = """\
_Placeholder: to be filled after profiling. Write this section in `benchmarks/analysis.md`; the suite copies that
file here on every run, so re-running it does not erase the analysis._

- Time to workload: where the time between the bare-QEMU floor and `pyrunv run` goes (TODO)
- CLI latency: what `state` and `list` spend above the bare interpreter (TODO)
- Memory: what makes up QEMU's, virtiofsd's and the monitor's PSS, and what could shrink it (TODO)
- Density and parallel start: what grows with N (TODO)
- Stdio throughput and files: the limits of the guest channel and of virtio-fs under TCG (TODO)
"""


def targets(figs: dict) -> list:
    """(target, measured, met, by how much it is missed) for the issues' targets, where measured."""
    rows = []
    ttw = figs.get(1)
    if ttw and not ttw.error:
        t = ttw.data["tcg"]
        ready = F.median(t["samples"]["ready"])
        rows.append((f"boot: QEMU exec -> agent READY <= {F.TARGET_BOOT_S:g} s median under TCG", F.ms(ready),
                     ready <= F.TARGET_BOOT_S, f"{F.ms(ready - F.TARGET_BOOT_S)} over"))
        p = t["pyrunv"]
        rows.append((f"time to workload <= {F.TARGET_TTW_S:g} s median under TCG", F.ms(p), p <= F.TARGET_TTW_S,
                     f"{F.ms(p - F.TARGET_TTW_S)} ({(p / F.TARGET_TTW_S - 1) * 100:.0f}%) over"))
        o = t["overhead"]
        rows.append((f"overhead above the bare-QEMU floor <= {F.TARGET_OVERHEAD * 100:.0f}%",
                     f"{o * 100:+.0f}% ({F.ms(t['overhead_s'])} over a {F.ms(t['floor'])} floor)",
                     o <= F.TARGET_OVERHEAD,
                     f"{(o - F.TARGET_OVERHEAD) * 100:.0f} points over "
                     f"({F.ms(t['overhead_s'] - F.TARGET_OVERHEAD * t['floor'])} too much)"))
    cli = figs.get(2)
    if cli and not cli.error:
        r = cli.data["state_ratio"]
        rows.append((f"`state` <= {F.TARGET_STATE_RATIO:g} x the bare interpreter",
                     f"{x(r)} ({F.ms(cli.data['medians']['pyrunv state'])} against "
                     f"{F.ms(cli.data['medians']['python3 -c pass'])})", r <= F.TARGET_STATE_RATIO,
                     f"{r - F.TARGET_STATE_RATIO:.2f}x over "
                     f"({F.ms(cli.data['medians']['pyrunv state'] - F.TARGET_STATE_RATIO * cli.data['medians']['python3 -c pass'])} too slow)"))
    mem = figs.get(3)
    if mem and not mem.error:
        m, n = mem.data["avg_mib"], mem.data["n"]
        note = "" if n >= F.TARGET_IDLE_N else f"; measured over {n}, not {F.TARGET_IDLE_N}"
        rows.append((f"<= {F.TARGET_PSS_MIB} MiB PSS per container, averaged over {F.TARGET_IDLE_N} idle containers "
                     f"(Kata: ~{F.KATA_PSS_MB} MB)", f"{m:.1f} MiB over {n}", m <= F.TARGET_PSS_MIB,
                     f"{m - F.TARGET_PSS_MIB:.1f} MiB ({(m / F.TARGET_PSS_MIB - 1) * 100:.0f}%) over{note}"))
    stdio = figs.get(6)
    if stdio and not stdio.error:
        rate, floor = stdio.data["rate"]["pyrunv"], stdio.data["floor"]
        rows.append((f"stdio >= {F.TARGET_STDIO_OF_FLOOR * 100:.0f}% of the floor (the guest's own `head -c` into "
                     f"/dev/null)", f"{rate / floor * 100:.0f}% ({rate:.1f} MB/s against {floor:.1f} MB/s)",
                     rate >= F.TARGET_STDIO_OF_FLOOR * floor,
                     f"{(F.TARGET_STDIO_OF_FLOOR - rate / floor) * 100:.0f} points short"))
    pods = figs.get(8)
    if pods and not pods.error:
        j, r, accel = pods.data["medians"]["join pyrunv"], pods.data["medians"]["join runc"], pods.data["accel"]
        rows.append((f"second container in a running pod (CRI CreateContainer + StartContainer) <= "
                     f"{F.ms(P.TARGET_JOIN_S)} median under TCG", f"{F.ms(j)} ({accel.upper()}; runc {F.ms(r)})",
                     j <= P.TARGET_JOIN_S,
                     f"{F.ms(j - P.TARGET_JOIN_S)} ({(j / P.TARGET_JOIN_S - 1) * 100:.0f}%) over"))
        q, pod, one = pods.data["pss_ratio"], pods.data["pod_kib"]["total"], pods.data["one_kib"]["total"]
        rows.append((f"host PSS of a pod with {P.MEMBERS} idle containers <= {P.TARGET_PSS_RATIO:g} x one "
                     f"single-container VM", f"{x(q)} ({mib(pod)} against {mib(one)})", q <= P.TARGET_PSS_RATIO,
                     f"{q - P.TARGET_PSS_RATIO:.2f}x over ({mib(pod - P.TARGET_PSS_RATIO * one)} too much)"))
    return rows


def format_table(table) -> list:
    cells = [table.headers] + table.rows
    widths = [max(len(str(row[i])) if i < len(row) else 0 for row in cells) for i in range(len(table.headers))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def console(figs: list, meta: dict) -> str:
    lines = [f"pyrunv benchmarks: {meta['date']}, {meta['cores']} cores, {meta['memory']}, accel {meta['accel']}, "
             f"{meta['qemu']}, host kernel {meta['host_kernel']}",
             f"KVM: {meta['kvm']}", f"load average at start {meta['load_start']}; {meta['foreign_qemu']}", ""]
    for fig in figs:
        lines.append(f"== {fig.number}. {fig.title} ({fig.seconds:.0f} s) ==")
        if fig.error:
            lines.append(f"  FAILED: {fig.error}")
        for table in fig.tables[:1] if fig.number == 4 else fig.tables:
            lines += format_table(table)
        for comparison, value, note in fig.ratios:
            lines.append(f"  ratio {comparison}: {x(value)}" + (f"  ({note})" if note else ""))
        lines += [f"  note: {n}" for n in fig.notes]
        lines.append("")
    lines.append("Targets:")
    for target, measured, met, miss in targets({f.number: f for f in figs}):
        lines.append(f"  {'MET   ' if met else 'MISSED'} {target}: {measured}" + ("" if met else f"; {miss}"))
    lines.append("")
    lines.append("Summary:")
    for fig in figs:
        lines.append(f"figure {fig.number} " + (f"{fig.title.lower()}: FAILED: {fig.error}" if fig.error else fig.summary))
    return "\n".join(lines)


def plot(figs: dict, path: str, meta: dict) -> bool:
    """Start time and PSS per container against N (figure 4). False if there is nothing to plot."""
    dens = figs.get(4)
    if not dens or dens.error or not dens.data.get("points"):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    points = dens.data["points"]
    n = [p["n"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(n, [p["start_s"] for p in points], "o-", color="tab:blue", label="pyrunv run -d (sleep 3600)")
    ttw = figs.get(1)
    if ttw and not ttw.error:
        ready = F.median(ttw.data["tcg"]["samples"]["ready"])
        left.axhline(ready, color="tab:gray", ls=":", label="bare QEMU: exec to agent READY (figure 1)")
    left.set_xlabel("idle containers running (N)")
    left.set_ylabel("start time of the N-th container (s)")
    left.set_ylim(0, max(p["start_s"] for p in points) * 1.3)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.grid(alpha=0.3)
    left.legend(loc="upper left", fontsize=8)
    right.plot(n, [p["avg_kib"] / 1024 for p in points], "o-", color="tab:green", label="pyrunv, average over N")
    right.axhline(F.TARGET_PSS_MIB, color="tab:red", ls="--", label=f"target {F.TARGET_PSS_MIB} MiB")
    right.axhline(F.KATA_PSS_MB * 1e6 / F.MIB, color="tab:gray", ls=":", label=f"Kata published ~{F.KATA_PSS_MB} MB")
    right.set_xlabel("idle containers running (N)")
    right.set_ylabel("host PSS per container (MiB)")
    right.set_ylim(0, max([p["avg_kib"] / 1024 for p in points] + [F.KATA_PSS_MB * 1e6 / F.MIB]) * 1.3)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.grid(alpha=0.3)
    right.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"pyrunv density: up to {points[-1]['n']} idle containers, {meta['runtime_accel'].upper()}, "
                 f"{meta['cores']}-core host, {meta['date'][:10]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def md_table(headers, rows) -> list:
    esc = lambda c: str(c).replace("|", "\\|")
    return (["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows])


def markdown(figs: list, meta: dict, png_name: str | None, analysis: str | None, failures: list) -> str:
    by_number = {f.number: f for f in figs}
    out = ["# Performance", "",
           f"_Written by the benchmark suite (`python -m benchmarks`) on {meta['date']}: re-running it rewrites this "
           "page. Only the section \"What holds it back\" is kept, from `benchmarks/analysis.md`._", "",
           "Every comparison below was measured side by side in the same run, the two (or more) sides alternating "
           "run by run. Times are wall-clock medians, reported and never asserted. This machine is shared: other "
           "VM tests may have run at the same time (see the load average), so the figures are noisy.", "",
           "## Machine and run", ""]
    out += md_table(["", ""], [
        ["date", meta["date"]], ["cores", meta["cores"]], ["memory", meta["memory"]],
        ["accelerator", meta["accel"]], ["KVM", meta["kvm"]], ["QEMU", meta["qemu"]],
        ["host kernel", meta["host_kernel"]], ["guest kernel", meta["guest_kernel"]], ["runc", meta["runc"]],
        ["pyrunv", meta["pyrunv"]], ["command", f"`{meta['command']}`"], ["settings", meta["settings"]],
        ["load average at start / end", f"{meta['load_start']} / {meta['load_end']}"],
        ["other VMs at start", meta["foreign_qemu"]], ["suite run time", meta["run_time"]],
    ])
    out += ["", "## Targets", ""]
    rows = [[t, m, "met" if ok else "**missed**", "" if ok else miss] for t, m, ok, miss in targets(by_number)]
    out += md_table(["target (from the issue)", "measured", "", "missed by"], rows) if rows else ["_Not measured in this run._"]
    if failures:
        out += ["", "**Failures in this run:**", ""] + [f"- {f}" for f in failures]
    for fig in figs:
        out += ["", f"## {fig.number}. {fig.title}", "", fig.method, ""]
        if fig.error:
            out += [f"**Failed:** {fig.error}", ""]
        for i, table in enumerate(fig.tables):
            if fig.number == 4 and i == 1:
                out += ["<details><summary>every N</summary>", ""] + md_table(table.headers, table.rows) + ["", "</details>", ""]
            else:
                out += md_table(table.headers, table.rows) + [""]
        if fig.ratios:
            out += md_table(["comparison", "ratio", ""], [[c, x(v), n] for c, v, n in fig.ratios]) + [""]
        if fig.number == 4 and png_name:
            out += [f"![Start time and PSS per container against N]({png_name})", ""]
        out += [f"_{n}_" for n in fig.notes]
    if png_name and 4 not in by_number:
        out += ["", f"![plot]({png_name})"]
    out += ["", "## What holds it back", "", "<!-- BEGIN analysis: carried over from benchmarks/analysis.md -->", ""]
    out += [(analysis or ANALYSIS_PLACEHOLDER).rstrip(), "", "<!-- END analysis -->"]
    out += ["", "## Reproduce", "", "From the repository root, as root, on the machine described above:", "", "```sh",
            "tools/setup bench                                  # set-up, then the full run: writes docs/performance.md and docs/performance.png",
            "/opt/pyrunv/venv/bin/python -m benchmarks          # the same, without the set-up (defaults: --iterations 10, 20 idle, density 50)",
            "/opt/pyrunv/venv/bin/python -m benchmarks --quick --out /tmp/perf/performance.md   # smoke run, about a minute",
            "/opt/pyrunv/venv/bin/python -m benchmarks --iterations 3 --density 20 --only 1,2,3  # a subset",
            "/opt/pyrunv/venv/bin/python -m benchmarks --only 8 --iterations 5   # pods, through containerd's CRI",
            "/opt/pyrunv/venv/bin/python -m benchmarks --only 9 --iterations 5   # update's balloon, checkpoint and restore",
            "tools/debian13 bench --only 10 --iterations 5 --out /tmp/perf/performance.md  # templates, on Debian 13",
            "/opt/pyrunv/venv/bin/python -m benchmarks.boot --runs 10   # boot to agent READY alone",
            "/opt/pyrunv/venv/bin/python -m pytest -m 'vm and slow' tests/test_benchmarks_smoke.py",
            "```", "", f"This page: `{meta['command']}`", ""]
    return "\n".join(out)


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def read_analysis(repo: str) -> str | None:
    path = os.path.join(repo, "benchmarks", "analysis.md")
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None
