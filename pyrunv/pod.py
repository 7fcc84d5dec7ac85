"""Pods: which spec boots a VM (a sandbox) and which joins a sandbox's VM, as the engines mark them.

A spec with no type annotation is a sandbox of its own: one container, one VM."""
import re

from .errors import PyrunvError

# (container type annotation, sandbox ID annotation) of each engine.
MARKS = (
    ("io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id"),  # containerd's CRI
    ("io.kubernetes.cri-o.ContainerType", "io.kubernetes.cri-o.SandboxID"),  # CRI-O, and podman's pods
)
JOINABLE = ("pid", "ipc", "uts")  # the namespaces one container of a pod can share with another in the VM
_PROC_NS = re.compile(r"^/proc/(\d+)/ns/(\w+)$")


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


def joins(namespaces, idents_by_pid: dict) -> list:
    """(kind, ident) for each of the spec's namespace paths that points at another container of the pod.

    Engines name a pod's namespaces by the pid-file process of the container that holds them
    (/proc/PID/ns/KIND); in the VM that is the namespace of that container's init."""
    found = []
    for kind, path in namespaces:
        match = _PROC_NS.match(path)
        if kind in JOINABLE and match and int(match.group(1)) in idents_by_pid:
            found.append((kind, idents_by_pid[int(match.group(1))]))
    return found
