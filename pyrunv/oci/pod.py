"""Pods: which spec boots a VM (a sandbox) and which joins a sandbox's VM, as the engines mark them.

A spec with no type annotation is a sandbox of its own: one container, one VM."""
from ..errors import PyrunvError

# (container type annotation, sandbox ID annotation) of each engine.
MARKS = (
    ("io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id"),  # containerd's CRI
    ("io.kubernetes.cri-o.ContainerType", "io.kubernetes.cri-o.SandboxID"),  # CRI-O, and podman's pods
)
JOINABLE = ("pid", "ipc", "uts")  # the namespaces one container of a pod can share with another in the VM
PLACED_IN_THE_VM = ("ipc", "mount", "pid", "uts")  # a path of these kinds names a namespace of the guest's
# A pod asks for the host's namespace of a kind by leaving it out of its sandbox's spec. A VM cannot share these
# with the host: the pod's field that asks, by namespace kind.
HOST_ONLY = {"network": "hostNetwork", "ipc": "hostIPC"}


def sandbox_of(container_id: str, annotations: dict) -> str | None:
    """The ID of the sandbox whose VM the container joins; None if it boots a VM of its own."""
    for type_key, sandbox_key in MARKS:
        if annotations.get(type_key) != "container":
            continue
        sandbox = annotations.get(sandbox_key)
        if not sandbox:
            raise PyrunvError(f"annotation {sandbox_key} is missing: a container of a pod must name its sandbox")
        return None if sandbox == container_id else sandbox
    return None


def is_sandbox(annotations: dict) -> bool:
    """Whether the engine marks the spec as a pod's sandbox, whose VM other containers will join."""
    return any(annotations.get(type_key) == "sandbox" for type_key, _ in MARKS)


def refuse_host_namespaces(container_id: str, annotations: dict, namespaces) -> None:
    """A pod that would share the host's network or IPC is refused at its sandbox's create, in one line naming
    the pod's field, rather than run half-working in a VM of its own."""
    if not is_sandbox(annotations):
        return
    listed = {kind for kind, _ in namespaces}
    for kind, field in HOST_ONLY.items():
        if kind not in listed:
            raise PyrunvError(f"pod sandbox {container_id}: {field} cannot be honoured: a VM cannot share the host's "
                              f"{kind} namespace (linux.namespaces has no {kind} entry)")


def joins(namespaces, idents_by_pid: dict) -> list:
    """(kind, ident) for each of the spec's namespace paths that points at another container of the pod.

    Engines name a pod's namespaces by the pid-file process of the container that holds them
    (/proc/PID/ns/KIND); in the VM that is the namespace of that container's init."""
    found = []
    for kind, path in namespaces:
        pid = _proc_ns_pid(path)
        if kind in JOINABLE and pid in idents_by_pid:
            found.append((kind, idents_by_pid[pid]))
    return found


def refuse_unjoinable_paths(container_id: str, namespaces, idents_by_pid: dict) -> None:
    """The runtime spec: a process MUST be placed in the namespace a path names, or create MUST fail. In a
    VM the only such namespaces are the pid, IPC and UTS ones of another container of the pod (idents_by_pid:
    their pid-file processes; none for a container that boots its VM). The network namespace's path is the
    host's, where the VM's monitor lives."""
    for kind, path in namespaces:
        if path and kind in PLACED_IN_THE_VM and not (kind in JOINABLE and _proc_ns_pid(path) in idents_by_pid):
            raise PyrunvError(f"container {container_id}: linux.namespaces {kind} path {path!r} cannot be honoured: "
                              f"in a VM only the {', '.join(JOINABLE)} namespaces of another container of the pod "
                              "can be joined")


def _proc_ns_pid(path: str) -> int | None:
    """PID of a /proc/PID/ns/NAME path, else None."""
    parts = path.split("/")
    if len(parts) == 5 and parts[:2] == ["", "proc"] and parts[2].isascii() and parts[2].isdigit() \
            and parts[3] == "ns" and parts[4]:
        return int(parts[2])
    return None
