"""Real engines driving pyrunv: podman, containerd (ctr, runc v2 shim) and docker, from Debian's packages.

Each engine gets its own state under a temporary directory; the daemons are started here and stopped
at the end of the session. The busybox image is built offline (make-image.sh) once per session."""
import json
import os
import re
import shlex
import subprocess

import psutil
import pytest

from enginelib import IMAGE, Engine, make_image, start_daemon, stop_daemon, wait_for  # noqa: F401 (for the tests)

RUNTIME = os.environ.get("PYRUNV_BIN", "/usr/local/bin/pyrunv")  # the -S launcher tools/setup writes


def vm_processes(under=None):
    """pyrunv's monitors, and the QEMU and virtiofsd processes they start.

    With `under` (a directory), only those of the engines whose state is there: a process counts if it or an
    ancestor up to conmon or the containerd shim names a path under it. Other sessions on the machine may run
    VMs of their own meanwhile. Each is a line "pid ppid comm args", as `ps -eo pid,ppid,comm,args` prints it."""
    procs = {}
    for p in psutil.process_iter(["ppid", "name", "cmdline"]):
        args = " ".join(p.info["cmdline"] or [])  # None for a zombie
        procs[p.pid] = (p.info["ppid"], f"{p.pid} {p.info['ppid']} {p.info['name']} {args}")
    found = [(pid, line) for pid, (_, line) in procs.items()
             if "pyrunv-monitor" in line or "pyrunv.agent" in line or ("virtiofsd" in line and "/share" in line)]
    if under is None:
        return [line for _, line in found]
    mark = os.path.join(str(under), "")

    def names_it(pid, depth):
        ppid, line = procs.get(pid, (None, ""))
        return mark in line or (depth > 0 and names_it(ppid, depth - 1))
    return [line for pid, line in found if names_it(pid, 3)]


def tty_run(argv, env=None, rows=33, cols=111, timeout=180):
    """Runs argv on a fresh pty of the given size (util-linux script); returns (output without CRs, exit code).

    script's stdin stays open until it is done: at EOF script would type an EOF character into the pty."""
    command = f"stty rows {rows} cols {cols}; {shlex.join(argv)}"
    stdin, keep_open = os.pipe()
    try:
        result = subprocess.run(["script", "-qec", command, "/dev/null"], stdin=stdin, capture_output=True,
                                text=True, timeout=timeout, env=env)
    finally:
        os.close(stdin)
        os.close(keep_open)
    return result.stdout.replace("\r", ""), result.returncode


# Containers that report "ready" once their trap is set, so that a signal sent after it meets the trap.
TRAP_TERM = "trap 'exit 0' TERM; echo ready; while true; do sleep 0.1; done"
TRAP_USR1 = "trap 'echo got USR1' USR1; echo ready; while true; do sleep 0.1; done"

# podman 4.3, docker 20.10 and ctr put no consoleSize into the spec: they size the pty while or after the container
# starts, so the guest's tty is 0x0 until that resize reaches it (pyrunv polls the host pty every 0.25 s; measured,
# it arrives within some tens of ms of the process starting). A `stty size` at once races it: it loses under runc
# too with docker, wins under runc with ctr, and with pyrunv loses sometimes with podman and mostly with ctr.
# So the command waits (up to 10 s) for the size, then prints it.
TTY_AND_SIZE = ("tty; i=0; until [ \"$(stty size 2>/dev/null)\" = '33 111' ] || [ $i = 100 ]; do "
                "sleep 0.1; i=$((i+1)); done; stty size")


# podman and docker share these verbs and their Go templates.
def run_detached(engine, name, *command):
    engine("run", "-d", "--name", name, IMAGE, *command, check=True)


def inspect(engine, name, field):
    return engine("inspect", "--format", "{{" + field + "}}", name, check=True).stdout.strip()


def listed(engine, name):
    """Whether `ps -a` shows the container."""
    return name in engine("ps", "-a", "--format", "{{.Names}}", check=True).stdout.split()


def logs(engine, name):
    return engine("logs", name).stdout


@pytest.fixture
def name(request):
    """A container name unique to the test."""
    return "pyrunv-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")


@pytest.fixture(scope="session")
def image_archive(tmp_path_factory):
    return make_image(tmp_path_factory.mktemp("image") / "busybox.tar")


@pytest.fixture(scope="session")
def podman(tmp_path_factory, image_archive):
    top = tmp_path_factory.mktemp("podman")
    conf = top / "containers.conf"
    conf.write_text(f'[engine]\nruntime = "pyrunv"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
                    f'[engine.runtimes]\npyrunv = ["{RUNTIME}"]\n')
    storage = top / "storage.conf"
    storage.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{top}/graph"\nrunroot = "{top}/run"\n')
    env = dict(os.environ, CONTAINERS_CONF=str(conf), CONTAINERS_STORAGE_CONF=str(storage))
    engine = Engine(["podman"], env)
    engine("load", "-i", image_archive, check=True)
    yield engine
    engine("rm", "--all", "--force")
    engine("system", "reset", "--force")


@pytest.fixture(scope="session")
def containerd(tmp_path_factory, image_archive):
    top = tmp_path_factory.mktemp("containerd")
    sock = top / "containerd.sock"
    config = top / "config.toml"
    # The runtime entry Kubernetes uses (the CRI plugin's runc v2 runtime with BinaryName); ctr runs use
    # --runc-binary, which sets the same BinaryName option of the same shim.
    config.write_text(f'''version = 2
root = "{top}/root"
state = "{top}/state"
[grpc]
  address = "{sock}"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyrunv]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyrunv.options]
    BinaryName = "{RUNTIME}"
''')
    with open(top / "containerd.log", "wb") as log:
        proc = start_daemon(["containerd", "--config", str(config)], log, sock.exists)
    engine = Engine(["ctr", "--address", str(sock)])
    engine("images", "import", image_archive, check=True)
    engine.runtime_flags = ["--runc-binary", RUNTIME]
    try:
        yield engine
    finally:
        stop_daemon(proc)


@pytest.fixture(scope="session")
def docker(tmp_path_factory, image_archive):
    top = tmp_path_factory.mktemp("docker")
    sock = top / "docker.sock"
    config = top / "daemon.json"
    config.write_text(json.dumps({
        "runtimes": {"pyrunv": {"path": RUNTIME}}, "default-runtime": "pyrunv",
        "storage-driver": "overlay2", "exec-opts": ["native.cgroupdriver=cgroupfs"],
        "data-root": str(top / "data"), "exec-root": str(top / "exec"), "pidfile": str(top / "docker.pid"),
        "hosts": [f"unix://{sock}"]}))
    with open(top / "dockerd.log", "wb") as log:
        proc = start_daemon(["dockerd", "--config-file", str(config)], log, sock.exists)
    engine = Engine(["/usr/bin/docker", "--host", f"unix://{sock}"])
    assert wait_for(lambda: engine("info").returncode == 0)
    engine("load", "-i", image_archive, check=True)
    try:
        yield engine
        engine("rm", "--force", *engine("ps", "-aq").stdout.split())
    finally:
        stop_daemon(proc)


@pytest.fixture(autouse=True)
def no_vm_left_behind(tmp_path_factory):
    yield
    mine = tmp_path_factory.getbasetemp()
    assert wait_for(lambda: not vm_processes(mine), timeout=30), vm_processes(mine)


# containerd's CRI plugin, the kubelet's side of a pod: see cri.py and test_cri.py.
CRI_BRIDGE = "pyrunvcri0"
CRI_SUBNET = "10.213.99.0/24"


@pytest.fixture(scope="session")
def cri(tmp_path_factory, image_archive):
    """A containerd of its own with the CRI plugin (cri.serve), serving pods on a CNI bridge of their own
    (CRI_BRIDGE, CRI_SUBNET) with the runtime handlers "runc" and "pyrunv"; the busybox and pause images imported.
    Yields a cri.CRI whose .handler comes from $PYRUNV_CRI_HANDLER (by default pyrunv), with .top (the temporary
    directory; containerd's state is .top/state), .runtime_root (the --root the shim gives the runtime: each
    handler has its own under .top) and .ctr (ctr in namespace k8s.io)."""
    from cri import serve
    handler = os.environ.get("PYRUNV_CRI_HANDLER", "pyrunv")
    assert handler in ("pyrunv", "runc"), f"PYRUNV_CRI_HANDLER={handler}: pyrunv or runc"
    with serve(tmp_path_factory.mktemp("cri"), image_archive, RUNTIME, CRI_BRIDGE, CRI_SUBNET, handler) as client:
        yield client
