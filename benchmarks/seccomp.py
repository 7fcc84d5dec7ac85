"""Figure 11: the start of a container with docker's default seccomp profile against without, beside runc."""
import json
import os

from .figures import TIME_HEADERS, Figure, Settings, Table, ms, ratio, rounds, timed_row, x
from .harness import Workspace, median

# containers-common's copy of docker's default profile (moby's profiles/seccomp/default.json), in docker's
# own format: its rules name the capabilities and architectures they are for.
PROFILE = "/usr/share/containers/seccomp.json"
CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]  # the bundle's, as `spec` writes it
ARCH, GO_ARCH = "SCMP_ARCH_X86_64", "amd64"  # a rule's includes and excludes name architectures Go's way


def oci_profile(profile: dict, caps: list) -> dict:
    """The profile as an engine writes it into config.json: the rules for this architecture and these
    capabilities, each with its names, action, errnoRet and arguments."""
    arches = [ARCH] + next((a["subArchitectures"] for a in profile.get("archMap", []) if a["architecture"] == ARCH),
                           [])

    def applies(rule: dict) -> bool:
        includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
        return (set(includes.get("caps") or []) <= set(caps) and
                (not includes.get("arches") or GO_ARCH in includes["arches"]) and
                not set(excludes.get("caps") or []) & set(caps) and GO_ARCH not in (excludes.get("arches") or []))
    syscalls = [{k: rule[k] for k in ("names", "action", "errnoRet", "args") if rule.get(k) is not None}
                for rule in profile["syscalls"] if applies(rule)]
    return {"defaultAction": profile["defaultAction"], "defaultErrnoRet": profile.get("defaultErrnoRet", 1),
            "architectures": arches, "syscalls": syscalls}


def seccomp(ws: Workspace, s: Settings, kvm: dict) -> Figure:
    fig = Figure(11, "Starting with a seccomp profile")
    fig.method = (
        f"`run` of `/bin/true` on a busybox bundle, timed from exec to exit, without a seccomp filter and with "
        f"docker's default profile (containers-common's copy, `{PROFILE}`, resolved for x86_64 and the "
        "bundle's capabilities as engines resolve it into `config.json`), for pyrunv and for runc, in turn, "
        f"{rounds(s.iterations)}, after one untimed run of each. pyrunv compiles the filter on the host; the "
        "agent installs it in the guest before execve.")
    if not os.path.exists(PROFILE):
        fig.tables.append(Table(["", "not measured"], [["docker's default profile", f"{PROFILE} is missing"]]))
        fig.summary = f"seccomp: not measured here: {PROFILE} is missing (apt-get install golang-github-containers-common)"
        return fig
    with open(PROFILE) as f:
        profile = oci_profile(json.load(f), CAPS)
    bundles = {"without": ws.bundle_pair("plain", "/bin/true"),
               "with": ws.bundle_pair("filtered", "/bin/true",
                                      edit=lambda c: c["linux"].update(seccomp=profile))}
    roots = {kind: ws.root(kind, "seccomp") for kind in ("pyrunv", "runc")}
    times = {(kind, side): [] for kind in roots for side in bundles}
    for kind, root in roots.items():
        for side, pair in bundles.items():
            ws.run(kind, root, pair[0 if kind == "pyrunv" else 1], ws.unique("sc"))
    for _ in range(s.iterations):
        for (kind, side), samples in times.items():
            samples.append(ws.run(kind, roots[kind], bundles[side][0 if kind == "pyrunv" else 1], ws.unique("sc"))[0])
    med = {key: median(samples) for key, samples in times.items()}
    fig.tables.append(Table(TIME_HEADERS, [
        timed_row(f"{kind} run /bin/true, {'with the profile' if side == 'with' else 'without a filter'}",
                  times[(kind, side)]) for kind in roots for side in bundles]))
    named = sum(len(rule["names"]) for rule in profile["syscalls"])
    fig.notes.append(f"The profile: {len(profile['syscalls'])} rules naming {named} syscalls for x86_64, default "
                     f"{profile['defaultAction']} ({profile['defaultErrnoRet']}).")
    fig.ratios = [(f"{kind}: with / without", ratio(med[(kind, 'with')], med[(kind, 'without')]),
                   f"{ms(med[(kind, 'with')] - med[(kind, 'without')])} more") for kind in roots]
    fig.data = {"medians": {f"{k} {s}": v for (k, s), v in med.items()}}
    fig.summary = (f"seccomp: pyrunv run {ms(med[('pyrunv', 'with')])} with docker's default profile, "
                   f"{ms(med[('pyrunv', 'without')])} without | ratio pyrunv with/without {x(fig.ratios[0][1])} | "
                   f"ratio runc with/without {x(fig.ratios[1][1])}")
    return fig
