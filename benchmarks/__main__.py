"""The benchmark suite: python -m benchmarks [--iterations N] [--quick] [--out docs/performance.md]

Thirteen figures, each measured side by side with what it is compared with (runc, the bare-QEMU floor, the
bare interpreter, a booted VM), printed with their ratios and written to a markdown page with a PNG plot next
to it. Figure 8 (pods) drives pyrunv and runc through containerd's CRI, as a kubelet would; figure 9 resizes a
running VM's memory and saves and restores whole VMs; figure 10 loads VMs from templates where QEMU can;
figure 11 starts containers with docker's default seccomp profile; figure 12 reaches a pod's port as containerd's
port-forward does; figure 13 grows a VM's vCPUs, and fills a VM."""
import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback

from pyrunv import config as config_mod
from pyrunv.vm import accelerator

from . import boot, figures, growth, pods, portforward, report, resize, seccomp, templates
from .harness import REPO, BenchError, Workspace, process_table

FIGURES = [*figures.ALL, pods.pods, resize.resize, templates.templates, seccomp.seccomp, portforward.portforward,
           growth.growth]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, help="runs of each side of figure 1 (default 10; --quick: 1); "
                        "figure 2 runs 5x as many, figures 5-7 a fifth as many rounds (at least 1), "
                        "figure 8 as many pods of each runtime, figure 9 as many rounds of `update`")
    parser.add_argument("--quick", action="store_true", help="the smoke run: 1 iteration, small N and sizes (~1 min)")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "performance.md"),
                        help="the markdown page to write; the PNG goes next to it (default: docs/performance.md)")
    parser.add_argument("--only", help="comma-separated figure numbers to run, e.g. 1,2 (default: all thirteen)")
    parser.add_argument("--idle", type=int, help="idle containers for figure 3 (default 20; --quick: 2)")
    parser.add_argument("--density", type=int, help="the largest N of figure 4 (default 50; --quick: 3)")
    parser.add_argument("--parallel", type=int, help="containers started at once in figure 5 (default 10; --quick: 2)")
    parser.add_argument("--rounds", type=int, help="rounds of figures 5-7 and of figure 9's checkpoints "
                        "(default: iterations / 5, at least 1)")
    parser.add_argument("--throughput-mib", type=int, help="MiB written to stdout in figure 6 (default 256; --quick: 8)")
    parser.add_argument("--file-mib", type=int, help="size of the big file in figure 7 (default 256; --quick: 16)")
    parser.add_argument("--small-files", type=int, help="small files in figure 7 (default 10000; --quick: 200)")
    parser.add_argument("--settle", type=float, help="seconds idle before memory is read (default 5; --quick: 1)")
    parser.add_argument("--pyrunv", default=shutil.which("pyrunv") or "/usr/local/bin/pyrunv",
                        help="the pyrunv command (default: the installed launcher)")
    parser.add_argument("--runc", default=shutil.which("runc") or "/usr/sbin/runc", help="the runc command")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, bundles)")
    args = parser.parse_args(argv)
    quick = args.quick
    iterations = args.iterations or (1 if quick else 10)

    def pick(value, normal, small):
        return value if value is not None else (small if quick else normal)
    settings = figures.Settings(
        iterations=iterations, cli_runs=5 * iterations, rounds=pick(args.rounds, max(1, iterations // 5), 1),
        idle=pick(args.idle, 20, 2), density=pick(args.density, 50, 3), parallel=pick(args.parallel, 10, 2),
        throughput_mib=pick(args.throughput_mib, 256, 8), file_mib=pick(args.file_mib, 256, 16),
        small_files=pick(args.small_files, 10000, 200), settle=pick(args.settle, 5.0, 1.0), quick=quick)
    numbers = range(1, len(FIGURES) + 1)
    only = sorted({int(n) for n in args.only.split(",")}) if args.only else list(numbers)
    if any(n not in numbers for n in only) or min(settings.iterations, settings.idle, settings.density,
                                                      settings.parallel, settings.rounds) < 1:
        parser.error(f"figures are numbered 1 to {len(FIGURES)}, and every count must be at least 1")
    return args, settings, only


def first_line(argv) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def guest_kernel(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return "unknown"
    at = data.find(b"Linux version ")
    if at < 0:
        return os.path.basename(path)
    return data[at:at + 200].split(b"\n")[0].split(b"\0")[0].decode(errors="replace").split(" (")[0] \
        + f" ({os.path.basename(path)})"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def foreign_qemu(base: str) -> str:
    table = process_table()
    others = 0
    for pid, (_, _, comm) in table.items():
        if comm.startswith("qemu-system"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if base.encode() not in f.read():
                        others += 1
            except OSError:
                pass
    return f"{others} other QEMU process(es) running on the host (not this suite's)"


def runtime_accel(config, kvm: dict) -> str:
    """What `create` picks for figures 2-9: the configured accelerator, or with `auto` KVM where it works."""
    return config.accel if config.accel != "auto" else ("kvm" if kvm["usable"] else "tcg")


def metadata(ws: Workspace, settings, args, kvm: dict) -> dict:
    config = config_mod.load()
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    commit = first_line(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    # A checkout without git (a root that has only the tree, as tools/debian13's) is not dirty as far as we know.
    dirty = first_line(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"]) != "unknown"
    return {
        "date": report.now(), "cores": str(os.cpu_count()), "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "accel": (f"figure 1: TCG{' and KVM' if kvm['usable'] else ''}; figures 2-9: the runtime's own choice "
                  f"(accel = {config.accel}): {runtime_accel(config, kvm).upper()}"),
        "runtime_accel": runtime_accel(config, kvm),
        "kvm": ("usable (pyrunv.vm.accelerator.probe booted the guest)" if kvm["usable"]
                else f"not usable: {kvm['reason']}"),
        "qemu": first_line([config.qemu, "--version"]), "host_kernel": os.uname().release,
        "guest_kernel": guest_kernel(config.kernel), "runc": first_line([ws.runc, "--version"]),
        "pyrunv": f"{commit}{' with uncommitted changes' if dirty else ''} ({ws.pyrunv})",
        "command": shlex.join([os.path.basename(sys.executable), "-m", "benchmarks", *sys.argv[1:]]),
        "settings": ", ".join(f"{k}={v}" for k, v in vars(settings).items()),
        "load_start": loadavg(), "foreign_qemu": foreign_qemu(ws.base),
    }


def probe_kvm() -> dict:
    config = config_mod.load()
    if not os.path.exists("/dev/kvm"):
        return {"usable": False, "reason": "no /dev/kvm"}
    started = time.monotonic()
    usable = accelerator.probe(config, boot.plan_for(config, "kvm"), "kvm")
    return {"usable": usable,
            "reason": "" if usable else f"pyrunv.vm.accelerator.probe did not boot the guest with KVM "
                                        f"({time.monotonic() - started:.1f} s probe)"}


def main(argv=None) -> int:
    args, settings, only = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("benchmarks: run as root (pyrunv and runc need it)", file=sys.stderr)
        return 2
    for name, path in (("pyrunv", args.pyrunv), ("runc", args.runc)):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            print(f"benchmarks: no {name} command at {path}", file=sys.stderr)
            return 2
    out = os.path.abspath(args.out)
    png = os.path.join(os.path.dirname(out), "performance.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    suite_started = time.monotonic()
    ws = Workspace(args.pyrunv, args.runc, keep=args.keep)
    results, failures, interrupted = [], [], False
    print(f"benchmarks: scratch directory {ws.base}; figures {','.join(map(str, only))}; "
          f"{'quick (smoke) run' if settings.quick else 'full run'}", flush=True)
    try:
        kvm = probe_kvm()
        meta = metadata(ws, settings, args, kvm)
        print(f"benchmarks: KVM {meta['kvm']}; {meta['foreign_qemu']}; load {meta['load_start']}", flush=True)
        for number in only:
            func = FIGURES[number - 1]
            print(f"benchmarks: figure {number} ({func.__name__}) ...", flush=True)
            started = time.monotonic()
            try:
                fig = func(ws, settings, kvm)
            except (BenchError, subprocess.SubprocessError, OSError, RuntimeError, ValueError) as e:
                fig = figures.Figure(number, func.__name__.replace("_", " ").capitalize(), error=str(e) or repr(e))
                failures.append(f"figure {number}: {fig.error}")
                traceback.print_exc()
            fig.seconds = time.monotonic() - started
            results.append(fig)
            print(f"benchmarks: figure {number} done in {fig.seconds:.0f} s", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        failures.append("interrupted")
    finally:
        errors = ws.cleanup()
        failures += [f"cleanup: {e}" for e in errors]
        stray = ws.leftovers()
        if stray:
            failures.append("processes left behind (killed now): " + "; ".join(
                f"{pid} {comm}: {cmd[:160]}" for pid, comm, cmd in stray))
            ws.kill(pid for pid, _, _ in stray)
        mounts = ws.mounts()
        if mounts:
            failures.append("mounts left behind: " + "; ".join(mounts))
        roots = os.path.join(ws.base, "roots")
        for name in (os.listdir(roots) if os.path.isdir(roots) else []):
            entries = [e for e in os.listdir(os.path.join(roots, name)) if not e.startswith(".")]
            if entries:
                failures.append(f"state left under root {name}: {', '.join(entries)}")
    if interrupted:
        print("benchmarks: interrupted; containers deleted, nothing written", file=sys.stderr)
        ws.remove()
        return 130

    meta["load_end"] = loadavg()
    meta["run_time"] = f"{time.monotonic() - suite_started:.0f} s"
    by_number = {f.number: f for f in results}
    try:
        png_name = os.path.basename(png) if report.plot(by_number, png, meta) else None
    except Exception as e:  # a plot must not lose the figures
        failures.append(f"plot: {e}")
        png_name = None
    text = report.console(results, meta)
    print()
    print(text)
    page = report.markdown(results, meta, png_name, report.read_analysis(REPO), failures)
    with open(out, "w") as f:
        f.write(page)
    print(f"\nwrote {out}" + (f" and {png}" if png_name else "") + f"; suite run time {meta['run_time']}")
    if failures:
        print("benchmarks: FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
    if args.keep:
        print(f"benchmarks: scratch directory kept: {ws.base}")
    ws.remove()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
