"""`create`, `run` and `restore`: a container comes to exist, in a VM of its own or in its pod's.

The schema's check of config.json (jsonschema alone takes some 80 ms to load) runs while the VM boots: the
VM is planned from the document as parsed, and the container exists only once the check has passed."""
import dataclasses
import os
import time

from .. import config as config_mod, logs
from ..errors import PyrunvError
from ..host import cgroups
from ..monitor import control
from ..oci import spec as spec_mod, pod
from ..state import store as state
from ..state.lifecycle import Status
from . import hooks
from .container import Container
from .execution import write_pid_file

log = logs.log


def create(store: state.Store, container_id: str, bundle: str, pid_file, console_socket,
           systemd_cgroup: bool = False, restore_from=None) -> Container:
    """create, or with restore_from (a snapshot.Source) restore: the VM resumes where it was saved, and
    the container is running. Any error on the way yields to the schema's, so a document the schema refuses
    gets the same one line as if it had been checked first."""
    state.validate_id(container_id)
    document = spec_mod.read_document(bundle)
    check_schema = _Once(lambda: _validate(store, container_id, document))
    try:
        return _create(store, container_id, bundle, document, check_schema, pid_file, console_socket,
                       systemd_cgroup, restore_from)
    except BaseException:
        check_schema()
        raise


def _create(store: state.Store, container_id: str, bundle: str, document, check_schema, pid_file,
            console_socket, systemd_cgroup: bool, restore_from) -> Container:
    spec = spec_mod.parse(bundle, document)
    if spec.process.terminal and not console_socket and not os.isatty(0):
        raise PyrunvError("cannot allocate tty if runc will detach without setting console socket")
    sandbox_id = pod.sandbox_of(container_id, spec.annotations)
    pod.refuse_host_namespaces(container_id, spec.annotations, spec.namespaces)
    if sandbox_id and restore_from:
        raise PyrunvError(f"cannot restore {container_id}: a container of a pod has no VM of its own")
    if sandbox_id:
        check_schema()  # it boots nothing to overlap with
    sandbox = _running_sandbox(store, sandbox_id) if sandbox_id else None
    spec_mod.check_namespace_paths(spec)
    if not sandbox:
        pod.refuse_unjoinable_paths(container_id, spec.namespaces, {})
    record = state.Record(id=container_id, bundle=spec.bundle, rootfs=spec.rootfs, status=Status.CREATING.value,
                          created=time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime()),
                          owner="root" if os.getuid() == 0 else str(os.getuid()), annotations=spec.annotations,
                          hooks={kind: list(spec.hooks[kind]) for kind in hooks.AFTER_CREATE if spec.hooks[kind]},
                          sandbox=sandbox_id or "", resources=dataclasses.asdict(spec.resources))
    config = config_mod.load()
    container = Container(store, record)
    with store.create(record):
        try:
            cgroup = None
            if spec.cgroups_path:
                cgroup = cgroups.HostCgroup.create(spec.cgroups_path, systemd_cgroup)
                record.cgroup = {"directories": cgroup.directories, "created": cgroup.created}
            if sandbox:
                container.join_vm(sandbox, spec, console_socket, cgroup, config)
            else:
                container.boot_vm(spec, console_socket, cgroup, config, restore_from, check_schema)
            record.pid_start = state.process_start_time(record.pid)
            record.status = (Status.RUNNING if restore_from else Status.CREATED).value
            store.save(record)
            for kind in ("prestart", "createRuntime", "createContainer"):
                hooks.run(kind, spec.hooks[kind], record.oci_state(Status.CREATED))
            write_pid_file(pid_file, record.pid)
        except BaseException:
            container.tear_down()
            store.remove(container_id)
            raise
    log.info("created %s (pid %d%s)", container_id, record.pid,
             f", in the VM of {sandbox_id}" if sandbox_id else f", accel {record.accel}")
    return container


def run(store: state.Store, container_id: str, bundle: str, pid_file, console_socket, systemd_cgroup: bool,
        detach: bool, keep: bool) -> int:
    """create, start and, unless detached, wait: the exit code `run` gives (128+N for a signal)."""
    terminal_state = None
    if not detach and not console_socket and os.isatty(0):
        import termios
        terminal_state = termios.tcgetattr(0)
    container = create(store, container_id, bundle, pid_file, console_socket, systemd_cgroup)
    try:
        container.start()
    except BaseException:
        Container.remove(store, container_id, force=True)
        raise
    if detach:
        return 0
    code = container.wait_in_foreground(keep)
    if terminal_state is not None:  # the monitor sets it raw and may not have lived to restore it
        import termios
        termios.tcsetattr(0, termios.TCSADRAIN, terminal_state)
    return code


def _validate(store: state.Store, container_id: str, document) -> None:
    """The spec against the schema: by the pod's monitor for a container of a pod (jsonschema is loaded
    there already, and takes ~50 ms to load here), else here. A pod whose monitor cannot be reached is
    create's error to name once the spec is known valid."""
    annotations = document.get("annotations") if isinstance(document, dict) else None
    try:
        sandbox_id = pod.sandbox_of(container_id, annotations) if isinstance(annotations, dict) else None
        conn = control.Connection(store.path(state.validate_id(sandbox_id)), timeout=60) if sandbox_id else None
    except (PyrunvError, TypeError):  # TypeError: annotations the schema will refuse
        conn = None
    if conn is None:
        spec_mod.validate(document)
        return
    with conn:
        conn.send({"op": "validate", "document": document})
        conn.receive()


def _running_sandbox(store: state.Store, sandbox_id: str) -> Container:
    try:
        sandbox = Container.load(store, state.validate_id(sandbox_id))
    except PyrunvError as e:
        raise PyrunvError(f"pod sandbox {sandbox_id!r}: {e}") from None
    if sandbox.record.sandbox:
        raise PyrunvError(f"pod sandbox {sandbox_id}: it is a container of pod {sandbox.record.sandbox}, not a sandbox")
    status = sandbox.status
    if status is Status.PAUSED:
        raise PyrunvError(f"pod sandbox {sandbox_id} is paused: its VM cannot take a container")
    if status not in (Status.CREATED, Status.RUNNING):
        raise PyrunvError(f"pod sandbox {sandbox_id} is {status.value}: its VM is not running")
    return sandbox


class _Once:
    """Runs check() on the first call; later calls repeat its outcome: nothing, or the same user's error."""

    def __init__(self, check):
        self.check, self.done, self.error = check, False, None

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            try:
                self.check()
            except PyrunvError as e:
                self.error = e
        if self.error:
            raise self.error
