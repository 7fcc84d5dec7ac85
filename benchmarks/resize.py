"""Figure 9, resizing and saving a VM: `update` of a running container's memory, which pyrunv carries out with the
VM's balloon, and checkpoint and restore of the whole VM, each beside runc in the same run.

Checkpoint and restore are measured only where this host's QEMU and virtiofsd can save a VM
(pyrunv.vm.checkpoint_refusal: QEMU >= 8.2 and the Rust virtiofsd, as on Debian 13), and runc's only where CRIU is
installed; elsewhere the figure says why in a row and measures nothing of it."""
import glob
import json
import os
import shutil
import subprocess
import time

from pyrunv.host import cgroups
from pyrunv import config as config_mod
from pyrunv.vm import snapshot
from pyrunv.vm import versions

from .figures import TIME_HEADERS, Figure, Settings, Table, mib, ms, ratio, rounds, timed_row, x
from .harness import MIB, BenchError, Workspace, container_pss, containers_under, median, process_table

LIMIT_MIB = 512       # the container's memory limit at start: its VM boots with this plus the guest's overhead
SHRUNK_MIB = 256      # `update --memory` shrinks to this, then grows back to LIMIT_MIB
TOUCH_MIB = 200       # touched and freed in the guest before each shrink, so that the balloon has pages to return
WRITTEN_MIB = 256     # what the loaded container of the checkpoint holds in its /dev/shm
SHM_MIB = WRITTEN_MIB + 64
IDLE = ("sleep", "3600")
# What is checkpointed: busybox's one long `sleep` ends as soon as CRIU restores it (its nanosleep is not
# resumed), where a loop of short ones runs on; pyrunv's restore resumes either.
SAVED_IDLE = ("sh", "-c", "while :; do sleep 1; done")
KINDS = ("pyrunv", "runc")
STAGES = ("touched", "shrunk", "grown")
# Non-zero data (QEMU saves a zero page as a flag, so /dev/zero would make the image small), 1 MiB made once and
# copied 256 times by one `cat`: shell builtins and two processes, a couple of seconds under TCG, where a
# `head -c 256m` through a pipe takes half a minute.
FILL = ("yes 0123456789abcdef | head -c 1048576 > /dev/shm/seed; set --; i=0; "
        f"while [ $i -lt {WRITTEN_MIB} ]; do set -- \"$@\" /dev/shm/seed; i=$((i+1)); done; "
        "cat \"$@\" > /dev/shm/x; rm /dev/shm/seed; "
        f"[ $(stat -c %s /dev/shm/x) = {WRITTEN_MIB * MIB} ]")
LOADS = ("idle", f"{WRITTEN_MIB} MiB written")


def bundles(ws: Workspace, name: str, cgroup_paths: list, shm_mib: int = 0, command=IDLE) -> dict:
    """kind -> a bundle of an idle busybox container with a memory limit of LIMIT_MIB and a cgroupsPath of its own
    (runc's `update` needs one), one level below the hierarchies' roots, named after the run, so that nothing else
    shares it and nothing is left above it; each path is added to cgroup_paths. shm_mib: /dev/shm's size."""
    made = {}
    for kind in KINDS:
        path = ws.unique(f"pyrunv-bench-{name}")
        cgroup_paths.append(path)

        def edit(config, path=path):
            config["linux"]["cgroupsPath"] = "/" + path
            config["linux"].setdefault("resources", {})["memory"] = {"limit": LIMIT_MIB * MIB}
            for mount in config["mounts"] if shm_mib else ():
                if mount["destination"] == "/dev/shm":
                    mount["options"] = [o for o in mount.get("options", []) if not o.startswith("size=")] \
                        + [f"size={shm_mib}m"]
        made[kind] = ws.bundle(f"{name}-{kind}", *command, edit=edit)
    return made


def clear(ws: Workspace, roots: dict, cgroup_paths: list) -> list:
    """Deletes every container under the roots, then removes what is left of the cgroups in every hierarchy
    (each runtime's delete should have: what this had to remove is returned, as text). Raises BenchError when a
    container or a cgroup cannot be removed."""
    errors = [e for kind, root in roots.items() for e in ws.delete_many(kind, root, containers_under(root))]
    left = []
    for path in cgroup_paths:
        tops = sorted({os.path.realpath(d) for d in glob.glob(os.path.join(cgroups.ROOT, "*", path))
                       + [os.path.join(cgroups.ROOT, path)] if os.path.isdir(d)})  # cpu, cpuacct: one directory
        found = [d for top in tops for d, _, _ in os.walk(top)]   # parents first: remove() goes deepest first
        cgroups.HostCgroup({}, found).remove(timeout=10)
        left += found
        errors += [f"cgroup {d} cannot be removed" for d in found if os.path.isdir(d)]
    if errors:
        raise BenchError("; ".join(errors))
    return left


def vm_memory(ws: Workspace, root: str, cid: str, monitor: int) -> tuple:
    """(host PSS of the container's QEMU in KiB, the guest's RAM in MiB as QEMU's balloon has it)."""
    qemu = container_pss(root, cid, monitor, process_table()).get("qemu", 0)
    _, out = ws.command("pyrunv", root, "qmp", cid, "query-balloon", stdout=subprocess.PIPE, timeout=60)
    return qemu, json.loads(out)["actual"] / MIB


def update_rounds(ws: Workspace, s: Settings, roots: dict, cgroup_paths: list) -> dict:
    """s.iterations rounds of: touch TOUCH_MIB in the pyrunv guest, then `update --memory SHRUNK_MIB` and back to
    LIMIT_MIB of the pyrunv container and of the runc one, in turn; the pyrunv VM's memory (vm_memory) idle and
    after each step."""
    made = bundles(ws, "resize", cgroup_paths)
    times = {f"{kind} {size}": [] for kind in KINDS for size in (SHRUNK_MIB, LIMIT_MIB)}
    memory = {stage: [] for stage in STAGES}
    proot, rroot = roots["pyrunv"], roots["runc"]
    try:
        pid_, _ = ws.start_idle("pyrunv", proot, made["pyrunv"], "resize")
        rid, _ = ws.start_idle("runc", rroot, made["runc"], "resize")
        monitor = ws.state("pyrunv", proot, pid_)["pid"]
        time.sleep(s.settle)
        idle = vm_memory(ws, proot, pid_, monitor)
        for _ in range(s.iterations):
            ws.command("pyrunv", proot, "exec", pid_, "dd", "if=/dev/zero", "of=/dev/null", f"bs={TOUCH_MIB}M",
                       "count=1", timeout=300)
            memory["touched"].append(vm_memory(ws, proot, pid_, monitor))
            for size, stage in ((SHRUNK_MIB, "shrunk"), (LIMIT_MIB, "grown")):
                times[f"pyrunv {size}"].append(ws.command("pyrunv", proot, "update", "--memory", f"{size}m", pid_,
                                                          timeout=120)[0])
                memory[stage].append(vm_memory(ws, proot, pid_, monitor))
                times[f"runc {size}"].append(ws.command("runc", rroot, "update", "--memory", f"{size}m", rid,
                                                        timeout=120)[0])
    finally:
        left = clear(ws, roots, cgroup_paths)
    return {"times": times, "idle": idle, "memory": memory, "cgroups_left": left}


def balloon_note(memory: dict, target_mib: int) -> str:
    """One sentence on what the shrinks (to a guest of target_mib) gave back to the host and the grows took again,
    round by round."""
    touched, shrunk, grown = ([kib for kib, _ in memory[stage]] for stage in STAGES)
    returned = [t - sh for t, sh in zip(touched, shrunk)]
    regained = max(g - sh for sh, g in zip(shrunk, grown))
    gave = [r > TOUCH_MIB * 1024 / 2 for r in returned]
    text = (f"The {'first ' if len(returned) > 1 else ''}shrink gave the host back {'' if gave[0] else 'only '}"
            f"{mib(returned[0])} of the {TOUCH_MIB} MiB the guest had touched and freed (QEMU's PSS "
            f"{mib(touched[0])} -> {mib(shrunk[0])})")
    later = len(returned) - 1
    reached = sum(ram <= target_mib for _, ram in memory["shrunk"][1:])
    if later and all(gave[1:]):
        text += f", and so did the {later} later one{'s' if later > 1 else ''}, each after a grow and a fresh touch"
    elif later:
        text += (f", but {sum(gave[1:]) or 'none'} of the {later} later one{'s' if later > 1 else ''}, each after a "
                 f"grow and a fresh touch, did (median {mib(median(returned[1:]))} back)" + (
                     f", though the balloon reached its {target_mib} MiB in {reached} of them: the pages the guest "
                     "handed it then were mostly ones the host did not back at the time" if reached else
                     f", the balloon never reaching its {target_mib} MiB"))
    return text + (f"; {'no grow' if later else 'the grow did not'} raise{'d' if later else ''} the PSS (at most "
                   f"{mib(max(regained, 0))}): a page the balloon gives back to the "
                   "guest costs the host nothing until the guest touches it." if regained < 16 * 1024 else
                   f"; a grow raised the PSS by up to {mib(regained)}.")


def wait_stopped(ws: Workspace, kind: str, root: str, cid: str, timeout: float = 120) -> None:
    """Until the checkpointed container is stopped, or gone (runc removes it)."""
    deadline = time.monotonic() + timeout
    while os.path.exists(os.path.join(root, cid)):
        try:
            if ws.state(kind, root, cid)["status"] == "stopped":
                return
        except BenchError:
            pass  # gone in the meantime
        if time.monotonic() > deadline:
            raise BenchError(f"{kind}: {cid} still not stopped {timeout:g} s after its checkpoint")
        time.sleep(0.1)


def image_size(kind: str, image: str) -> int:
    """Bytes of pyrunv's saved VM (vm.state), or of everything in CRIU's image directory."""
    if kind == "pyrunv":
        return os.path.getsize(os.path.join(image, snapshot.STATE))
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(image) for f in files)


def save_once(ws: Workspace, kind: str, root: str, bundle: str, load: str) -> tuple:
    """A container started (and loaded), checkpointed, deleted, restored under a new ID, checked running and
    deleted: (checkpoint seconds, restore seconds, image bytes). What fails is deleted by the caller's clear."""
    # Its stdio on /dev/null: CRIU cannot dump a file outside the container's mounts, as a log would be.
    cid, _ = ws.start_idle(kind, root, bundle, "save", log=os.devnull)
    if load != LOADS[0]:
        ws.command(kind, root, "exec", cid, "sh", "-c", FILL, timeout=600)
    image = ws.mkdir("images", cid)
    saved, _ = ws.command(kind, root, "checkpoint", "--image-path", image, cid, timeout=600)
    wait_stopped(ws, kind, root, cid)
    ws.delete(kind, root, cid)
    size = image_size(kind, image)
    restored = ws.unique("restored")
    resumed, _ = ws.command(kind, root, "restore", "--detach", "--image-path", image, "--bundle", bundle, restored,
                            timeout=600)
    status = ws.state(kind, root, restored)["status"]
    ws.delete(kind, root, restored)
    shutil.rmtree(image, ignore_errors=True)
    if status != "running":
        raise BenchError(f"{kind}: {restored} is {status} after `restore --detach`")
    return saved, resumed, size


def save_rounds(ws: Workspace, s: Settings, roots: dict, cgroup_paths: list) -> tuple:
    """Checkpoint and restore where each runtime can: ({"<kind> <load>": {"checkpoint", "restore", "size"}: lists},
    [(what, why not) for what is not measured], the cgroups clear had to remove)."""
    refusal = versions.checkpoint_refusal(config_mod.load())
    criu = shutil.which("criu")
    skipped = ([("pyrunv checkpoint and restore", refusal)] if refusal else []) + \
        ([] if criu else [("runc checkpoint and restore (CRIU)", "criu is not installed: `runc checkpoint` needs it")])
    kinds = [k for k, can in (("pyrunv", not refusal), ("runc", bool(criu))) if can]
    results = {f"{kind} {load}": {"checkpoint": [], "restore": [], "size": []} for load in LOADS for kind in kinds}
    if not kinds:
        return results, skipped, []
    made = bundles(ws, "saved", cgroup_paths, shm_mib=SHM_MIB, command=SAVED_IDLE)
    try:
        for _ in range(s.rounds):
            for load in LOADS:
                for kind in list(kinds):
                    try:
                        saved, resumed, size = save_once(ws, kind, roots[kind], made[kind], load)
                    except BenchError as e:
                        if kind == "pyrunv":
                            raise
                        # CRIU can fail where it installs (in a chroot, say): runc's side goes unmeasured.
                        skipped.append(("runc checkpoint and restore (CRIU)", f"failed: {e}"))
                        kinds.remove(kind)
                        for each in LOADS:
                            del results[f"{kind} {each}"]
                        continue
                    for key, value in (("checkpoint", saved), ("restore", resumed), ("size", size)):
                        results[f"{kind} {load}"][key].append(value)
    finally:
        left = clear(ws, roots, cgroup_paths)
    return results, skipped, left


def resize(ws: Workspace, s: Settings, kvm: dict) -> Figure:
    fig = Figure(9, "Resizing and saving a VM")
    guest = LIMIT_MIB + config_mod.load().guest_overhead_mib
    fig.method = (
        f"Update: an idle busybox `{' '.join(IDLE)}` started with a memory limit of {LIMIT_MIB} MiB "
        f"(`linux.resources.memory.limit`; its VM boots with {guest} MiB) and a `linux.cgroupsPath` of its own, "
        f"beside a runc container of a copy of the bundle. Each round: `pyrunv exec ID dd if=/dev/zero of=/dev/null "
        f"bs={TOUCH_MIB}M count=1` (untimed: the guest touches {TOUCH_MIB} MiB and frees it), then `update --memory "
        f"{SHRUNK_MIB}m ID` (pyrunv inflates the balloon by {LIMIT_MIB - SHRUNK_MIB} MiB and returns once QEMU's "
        f"balloon has reached the target, or after 10 s) and `update --memory {LIMIT_MIB}m ID` (it deflates; the "
        "command does not wait for that), pyrunv and runc in turn, timed from exec to exit; "
        f"{rounds(s.iterations)}, every one timed. Memory: the host PSS of the pyrunv container's QEMU and the "
        "guest's RAM as QEMU's `query-balloon` reports it, idle after "
        f"{s.settle:g} s, then right after each step, round by round. Checkpoint and restore: "
        "`checkpoint --image-path DIR ID`, then (the container stopped and deleted) `restore --detach --image-path "
        f"DIR --bundle B ID2`, of an idle container (`{' '.join(SAVED_IDLE[:2])} '{SAVED_IDLE[2]}'`) and of one "
        f"holding {WRITTEN_MIB} MiB of non-zero data in its "
        f"/dev/shm ({SHM_MIB} MiB there), timed from exec to exit, with the size of the image (pyrunv: "
        f"DIR/{snapshot.STATE}; runc: the whole of DIR); {rounds(s.rounds)}; pyrunv only where its QEMU and "
        "virtiofsd can save a VM, runc only where `criu` is installed.")
    roots = {kind: ws.root(kind, "resize") for kind in KINDS}
    cgroup_paths: list = []
    upd = update_rounds(ws, s, roots, cgroup_paths)
    saved, skipped, left = save_rounds(ws, s, roots, cgroup_paths)

    med = {k: median(v) for k, v in upd["times"].items()}
    fig.tables.append(Table(TIME_HEADERS, [
        timed_row(f"pyrunv update --memory {SHRUNK_MIB}m (balloon inflates)", upd["times"][f"pyrunv {SHRUNK_MIB}"]),
        timed_row(f"runc update --memory {SHRUNK_MIB}m", upd["times"][f"runc {SHRUNK_MIB}"]),
        timed_row(f"pyrunv update --memory {LIMIT_MIB}m (balloon deflates)", upd["times"][f"pyrunv {LIMIT_MIB}"]),
        timed_row(f"runc update --memory {LIMIT_MIB}m", upd["times"][f"runc {LIMIT_MIB}"]),
    ]))
    rounds_ = list(zip(*(upd["memory"][stage] for stage in STAGES)))   # (touched, shrunk, grown), each (KiB, MiB)
    returned = [t[0] - sh[0] for t, sh, _ in rounds_]
    fig.tables.append(Table(
        ["pyrunv's VM: QEMU host PSS", f"after touching {TOUCH_MIB} MiB (dd)", f"after --memory {SHRUNK_MIB}m",
         f"after --memory {LIMIT_MIB}m", "returned by the shrink", "guest RAM (balloon)"],
        [[f"idle, {s.settle:g} s after start: {mib(upd['idle'][0])}", "", "", "", "", f"{upd['idle'][1]:.0f} MiB"]]
        + [[f"round {i}", mib(t[0]), mib(sh[0]), mib(g[0]), mib(t[0] - sh[0]), f"{t[1]:.0f} -> {sh[1]:.0f} -> "
            f"{g[1]:.0f} MiB"] for i, (t, sh, g) in enumerate(rounds_, 1)]))
    first = ratio(rounds_[0][1][0], rounds_[0][0][0])
    fig.ratios = [
        (f"update --memory {SHRUNK_MIB}m, pyrunv / runc", ratio(med[f"pyrunv {SHRUNK_MIB}"], med[f"runc {SHRUNK_MIB}"]),
         f"{ms(med[f'pyrunv {SHRUNK_MIB}'] - med[f'runc {SHRUNK_MIB}'])} slower"),
        (f"update --memory {LIMIT_MIB}m, pyrunv / runc", ratio(med[f"pyrunv {LIMIT_MIB}"], med[f"runc {LIMIT_MIB}"]),
         f"{ms(med[f'pyrunv {LIMIT_MIB}'] - med[f'runc {LIMIT_MIB}'])} slower"),
        ("QEMU PSS after the shrink / before it, round 1", first, f"{mib(returned[0])} returned"),
    ]
    if len(rounds_) > 1:
        fig.ratios.append((f"QEMU PSS after the shrink / before it, rounds 2-{len(rounds_)} (median)",
                           median(ratio(sh[0], t[0]) for t, sh, _ in rounds_[1:]),
                           f"median {mib(median(returned[1:]))} returned"))
    fig.notes.append(balloon_note(upd["memory"], SHRUNK_MIB + guest - LIMIT_MIB))
    if upd["cgroups_left"] + left:
        fig.notes.append("Cgroup directories left after the runtimes' deletes, removed by the benchmark: "
                         + ", ".join(upd["cgroups_left"] + left))

    rows = []
    for key, result in saved.items():
        for verb in ("checkpoint", "restore"):
            rows.append(timed_row(f"{key.split(' ', 1)[0]} {verb}, {key.split(' ', 1)[1]}", result[verb])
                        + [mib(median(result["size"]) / 1024)])
    if rows:
        fig.tables.append(Table(TIME_HEADERS + ["image"], rows))
    if skipped:
        fig.tables.append(Table(["checkpoint and restore", "not measured"], [list(row) for row in skipped]))
    for load in LOADS:
        if f"pyrunv {load}" in saved and f"runc {load}" in saved:
            for verb in ("checkpoint", "restore"):
                p, r = median(saved[f"pyrunv {load}"][verb]), median(saved[f"runc {load}"][verb])
                fig.ratios.append((f"{verb}, {load}, pyrunv / runc", ratio(p, r), ""))
    fig.data = {"medians": med, "samples": upd["times"], "idle": upd["idle"], "memory": upd["memory"],
                "returned_kib": returned, "saved": saved, "skipped": skipped}
    saving = "; ".join(f"{key}: checkpoint {ms(median(r['checkpoint']))}, restore {ms(median(r['restore']))}, "
                       f"image {mib(median(r['size']) / 1024)}" for key, r in saved.items())
    fig.summary = (f"resizing: update --memory {SHRUNK_MIB}m pyrunv {ms(med[f'pyrunv {SHRUNK_MIB}'])} median, runc "
                   f"{ms(med[f'runc {SHRUNK_MIB}'])}; --memory {LIMIT_MIB}m pyrunv {ms(med[f'pyrunv {LIMIT_MIB}'])}, "
                   f"runc {ms(med[f'runc {LIMIT_MIB}'])}; QEMU PSS returned by the shrink {mib(returned[0])} in round 1"
                   + (f", {mib(median(returned[1:]))} median in rounds 2-{len(returned)}" if len(returned) > 1 else "")
                   + "; " + (saving or "checkpoint not measured")
                   + f" | ratio shrink pyrunv/runc {x(fig.ratios[0][1])} | ratio grow pyrunv/runc "
                   f"{x(fig.ratios[1][1])} | ratio PSS shrunk/touched round-1 {x(first)}")
    return fig
