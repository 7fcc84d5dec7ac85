"""The OCI spec model: config.json is read, validated against the fields pyrunv honours, and turned into a Spec."""
import dataclasses
import json
import os

from ..errors import PyrunvError
from . import resources as resources_mod
from .resources import Resources

CAPABILITIES = {name: number for number, name in enumerate((
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"))}
RLIMITS = {name: number for number, name in enumerate((
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS",
    "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS", "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_RTTIME"))}
HOOK_KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
CAP_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")


@dataclasses.dataclass(frozen=True)
class Process:
    args: tuple
    env: tuple = ()
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: tuple = ()
    umask: int | None = None
    terminal: bool = False
    console_size: tuple | None = None
    capabilities: dict | None = None  # set name -> tuple of CAP_ names
    rlimits: tuple = ()              # (RLIMIT_ name, soft, hard)
    no_new_privileges: bool = False
    oom_score_adj: int | None = None


@dataclasses.dataclass(frozen=True)
class Mount:
    destination: str
    type: str
    source: str
    options: tuple

    @property
    def is_bind(self) -> bool:
        return self.type == "bind" or "bind" in self.options or "rbind" in self.options


@dataclasses.dataclass(frozen=True)
class Device:
    path: str        # in the container
    type: str        # c, b, u or p
    major: int = 0
    minor: int = 0
    mode: int = 0o666
    uid: int = 0
    gid: int = 0


@dataclasses.dataclass(frozen=True)
class Spec:
    bundle: str
    rootfs: str
    root_readonly: bool
    process: Process
    hostname: str = ""
    mounts: tuple = ()
    masked_paths: tuple = ()
    readonly_paths: tuple = ()
    rootfs_propagation: str = ""  # linux.rootfsPropagation: private, shared, slave or unbindable (the schema's)
    sysctl: tuple = ()               # (key, value)
    hooks: dict = dataclasses.field(default_factory=dict)
    annotations: dict = dataclasses.field(default_factory=dict)
    resources: Resources = Resources()
    cgroups_path: str = ""
    network_namespace: str | None = None  # None: the host's; "": a new one; else the path to join
    namespaces: tuple = ()           # (type, path) as the spec lists them; path "" for a new one
    devices: tuple = ()              # Device
    uid_mappings: tuple = ()         # (containerID, hostID, size) of a new user namespace
    gid_mappings: tuple = ()
    seccomp: object = None           # seccomp.Filter, if the spec has linux.seccomp
    # Every device allowed in the container's cgroup, as engines write a privileged container's spec: it is
    # privileged in its VM (docs/architecture.md#privileged-containers).
    privileged: bool = False


_validator = None
NS_GET_NSTYPE = 0xB703
NAMESPACE_FLAGS = {"mount": 0x00020000, "cgroup": 0x02000000, "uts": 0x04000000, "ipc": 0x08000000,
                   "user": 0x10000000, "pid": 0x20000000, "network": 0x40000000, "time": 0x00000080}


def check_namespace_paths(spec: "Spec") -> None:
    """The runtime spec: a path whose namespace is not of the entry's type MUST be refused."""
    for kind, path in spec.namespaces:
        if path:
            _check_namespace_path(kind, path)


def _check_namespace_path(kind: str, path: str) -> None:
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise PyrunvError(f"invalid config.json: {kind} namespace path {shown(path)}: {e.strerror}") from None
    try:
        found = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        raise PyrunvError(f"invalid config.json: {kind} namespace path {shown(path)} is not a namespace") from None
    finally:
        os.close(fd)
    if found != NAMESPACE_FLAGS.get(kind, found):
        other = next((k for k, v in NAMESPACE_FLAGS.items() if v == found), "another")
        raise PyrunvError(f"invalid config.json: {kind} namespace path {shown(path)} is a {other} namespace")


def schema_validator():
    """The OCI schema's validator, made once per process: jsonschema alone takes ~50 ms to import."""
    global _validator
    if _validator is None:
        import jsonschema
        with open(os.path.join(os.path.dirname(__file__), "schema.json")) as f:
            _validator = jsonschema.Draft202012Validator(json.load(f))
    return _validator


def validate(document, what: str = "config.json") -> None:
    """Raises a one-line error naming the field path and the problem."""
    import jsonschema
    error = jsonschema.exceptions.best_match(schema_validator().iter_errors(document))
    if error is not None:
        where = shown(".".join(str(p) for p in error.absolute_path)) or "(top level)"  # keys may hold newlines
        message = " ".join(error.message.split())
        if len(message) > 200:
            message = message[:200] + "..."
        raise PyrunvError(f"invalid {what}: {where}: {message}")


def parse_process(p: dict) -> Process:
    user = p.get("user", {})
    caps = p.get("capabilities")
    for names in ((caps or {}).get(k, ()) for k in CAP_SETS):  # other keys are not read: the schema allows them
        for name in names:
            if name not in CAPABILITIES:
                raise PyrunvError(f"invalid config.json: process.capabilities: unknown capability {name!r}")
    rlimits = []
    for r in p.get("rlimits", []):
        if r["type"] not in RLIMITS:
            raise PyrunvError(f"invalid config.json: process.rlimits: unknown rlimit type {r['type']!r}")
        if r["soft"] > r["hard"]:
            raise PyrunvError(f"invalid config.json: process.rlimits: {r['type']} soft limit is above the hard limit")
        rlimits.append((r["type"], r["soft"], r["hard"]))
    size = p.get("consoleSize")
    return Process(
        args=tuple(p["args"]), env=tuple(p.get("env", ())), cwd=p["cwd"],
        uid=user.get("uid", 0), gid=user.get("gid", 0),
        additional_gids=tuple(user.get("additionalGids", ())), umask=user.get("umask"),
        terminal=p.get("terminal", False),
        console_size=(size.get("height", 0), size.get("width", 0)) if size else None,
        capabilities={k: tuple(caps.get(k, ())) for k in CAP_SETS} if caps is not None else None,
        rlimits=tuple(rlimits), no_new_privileges=p.get("noNewPrivileges", False),
        oom_score_adj=p.get("oomScoreAdj"))


def read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise PyrunvError(f"{what} ({shown(path)}) does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PyrunvError(f"cannot read {what} ({shown(path)}): {getattr(e, 'strerror', None) or e}") from None
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the parser goes
        raise PyrunvError(f"invalid {what}: not JSON: {e}") from None


def shown(text: str) -> str:
    """User input in an error message, kept to one line."""
    return text if text.isprintable() else repr(text)


def load(bundle: str) -> Spec:
    """The bundle's spec, validated against the schema."""
    document = read_document(bundle)
    validate(document)
    return parse(bundle, document)


def read_document(bundle: str):
    return read_json(os.path.join(os.path.abspath(bundle), "config.json"), "config.json")


def parse(bundle: str, document) -> Spec:
    """The spec of a document the schema accepts (a document it refuses may fail here in any way)."""
    bundle = os.path.abspath(bundle)
    if "args" not in document["process"]:
        raise PyrunvError("invalid config.json: process.args: args must not be empty")
    rootfs = os.path.join(bundle, document["root"]["path"])
    if not os.path.isdir(rootfs):
        raise PyrunvError(f"rootfs {rootfs!r} does not exist")
    mounts = []
    for m in document.get("mounts", []):
        mount = Mount(m["destination"], m.get("type", ""), m.get("source", ""), tuple(m.get("options", ())))
        if mount.is_bind:
            source = os.path.join(bundle, mount.source)
            if not os.path.exists(source):
                raise PyrunvError(f"invalid config.json: mount {mount.destination!r}: source {source!r} does not exist")
            mount = dataclasses.replace(mount, source=source)
        elif not mount.type:
            raise PyrunvError(f"invalid config.json: mount {mount.destination!r}: no type")
        mounts.append(mount)
    linux = document.get("linux", {})
    resources = linux.get("resources", {})
    hooks = document.get("hooks", {})
    namespaces = tuple((ns["type"], ns.get("path", "")) for ns in linux.get("namespaces", ()))
    network = [path for kind, path in namespaces if kind == "network"]
    mappings = {key: tuple((m["containerID"], m["hostID"], m["size"]) for m in linux.get(key, ()))
                for key in ("uidMappings", "gidMappings")}
    if ("user", "") in namespaces and not all(mappings.values()):
        raise PyrunvError("invalid config.json: a new user namespace needs linux.uidMappings and linux.gidMappings")
    if any(mappings.values()) and ("user", "") not in namespaces:
        raise PyrunvError("invalid config.json: linux.uidMappings and gidMappings need a new user namespace")
    privileged = any(rule.get("allow") and rule.get("type", "a") == "a" and "major" not in rule and "minor" not in rule
                     and set("rwm") <= set(rule.get("access", "")) for rule in resources.get("devices", ()))
    seccomp = None
    if "seccomp" in linux:
        from . import seccomp as seccomp_mod
        seccomp = seccomp_mod.parse(linux["seccomp"])
    return Spec(
        bundle=bundle, rootfs=os.path.realpath(rootfs), root_readonly=document["root"].get("readonly", False),
        process=parse_process(document["process"]), hostname=document.get("hostname", ""),
        mounts=tuple(mounts), masked_paths=tuple(linux.get("maskedPaths", ())),
        readonly_paths=tuple(linux.get("readonlyPaths", ())), rootfs_propagation=linux.get("rootfsPropagation", ""),
        sysctl=tuple(sorted(linux.get("sysctl", {}).items())),
        hooks={k: tuple(hooks.get(k, ())) for k in HOOK_KINDS},
        annotations=dict(document.get("annotations", {})),
        resources=resources_mod.parse(resources), cgroups_path=linux.get("cgroupsPath", ""),
        network_namespace=network[0] if network else None, namespaces=namespaces,
        uid_mappings=mappings["uidMappings"], gid_mappings=mappings["gidMappings"], seccomp=seccomp,
        privileged=bool(privileged),
        # podman's fileMode carries the type bits too (0o60600 for a block device): the type is the entry's.
        devices=tuple(Device(d["path"], d["type"], d.get("major", 0), d.get("minor", 0),
                             d.get("fileMode", 0o666) & 0o7777, d.get("uid", 0), d.get("gid", 0))
                      for d in linux.get("devices", ())))
