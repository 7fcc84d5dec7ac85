"""The host side of one container: what each verb does to it, whatever VM it runs in.

A container either owns a VM (a single container, or a pod's sandbox: its pid-file process is the VM's
monitor, see sandbox.py; create.py brings it to exist) or runs in its sandbox's VM (a member of a pod: its
pid-file process is a waiter connected to that monitor, see join_vm and host/waiter.py). Either way the
verbs reach the guest through the monitor's control socket, naming the container."""
import os

from .. import logs
from ..errors import PyrunvError
from ..monitor import control
from ..oci import pod
from ..state import lifecycle
from ..state import store as state
from ..state.lifecycle import Status

log = logs.log


class Container:
    def __init__(self, store: state.Store, record: state.Record):
        self.store, self.record = store, record

    @classmethod
    def load(cls, store: state.Store, container_id: str) -> "Container":
        return cls(store, store.load(container_id))

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def status(self) -> Status:
        return self.store.status(self.record)

    @property
    def vm_dir(self) -> str:
        """The state directory of the monitor that runs this container's VM."""
        return self.store.path(self.record.sandbox or self.record.id)

    def _control(self, op: str, **args) -> dict:
        return control.call(self.vm_dir, op, container=self.id, **args)

    def _check(self, verb: str) -> Status | None:
        return lifecycle.check(verb, self.id, self.status)

    def wait_in_foreground(self, keep: bool) -> int:
        """Forwards our signals to the container's pid-file process, our child, until it exits; returns its code
        (128+N for a signal), and deletes the container unless keep."""
        import signal
        pid = self.record.pid
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, lambda number, frame: os.kill(pid, number))
        _, status = os.waitpid(pid, 0)
        log.debug("%s: the monitor exited", self.id)
        if not keep:
            self.remove(self.store, self.id, force=True)
        return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)

    @classmethod
    def remove(cls, store: state.Store, container_id: str, force: bool) -> None:
        """`delete`: also of what a create that died left before its first state.json."""
        if force and not os.path.isdir(store.path(container_id)):
            return  # runc: forcing the delete of a container that is not there is no error
        if not store.exists(container_id):
            with store.lock(container_id):
                if not store.exists(container_id):
                    store.remove(container_id)
                    if force:
                        return
                    raise PyrunvError(f"container {container_id} does not exist")
        cls.load(store, container_id).delete(force)

    def boot_vm(self, spec, console_socket, cgroup, config, restore_from, while_booting) -> None:
        """A VM of its own: the monitor boots it and prepares the container's init in it (or resumes a saved
        one, whose init runs already). while_booting() runs meanwhile; its error ends the VM."""
        from ..vm import plan as plan_mod
        from . import sandbox
        plan = plan_mod.make(spec, config)
        incoming, stream = None, None
        if restore_from:
            plan, incoming, stream = restore_from.open(self.id, plan, config)  # its size is the saved VM's
        elif cgroup:
            plan = plan_mod.fit(plan, cgroup.memory_room(), config)
        log.debug("create %s: VM planned", self.id)
        self.record.ident, self.record.memory_mib = state.VM_INIT, plan.memory_mib
        self.record.vcpus, self.record.max_vcpus = plan.vcpus, plan_mod.present_cpus(plan)
        self.record.max_memory_mib = plan_mod.ram_mib(plan)
        try:
            if cgroup:
                cgroup.set(self._host_limits(spec.resources, config, plan.memory_mib))
            self.record.pid, self.record.accel = sandbox.launch(
                self.store, self.record, plan, config, terminal=spec.process.terminal,
                console_socket=console_socket, console_size=spec.process.console_size, cgroup=cgroup,
                restore_from=incoming, while_booting=while_booting)
        finally:
            if stream:
                stream.close()  # the monitor has it now
        if restore_from:
            self._count_cpu_time()  # a restored VM runs already

    def _count_cpu_time(self) -> None:
        """The VM joins the host cgroup's CPU hierarchies once it runs: the boot's CPU time is not the
        container's, and engines divide the cgroup's CPU time by the time since start (podman saw 12 cores'
        worth on 2)."""
        if self.record.cgroup and not self.record.sandbox:
            from ..host.cgroups import HostCgroup
            HostCgroup(**self.record.cgroup).add_tree(self.record.pid, cpu_time=True)

    @staticmethod
    def _host_limits(limits, config, memory_mib: int) -> list:
        """The host cgroup's values; memory_mib is the guest's RAM where the container owns its VM, else 0."""
        from ..host import cgroups
        from ..oci import resources
        return resources.host_files(limits, cgroups.version(), memory_mib, config.host_overhead_mib,
                                    config.host_pids_limit)

    def join_vm(self, sandbox: "Container", spec, console_socket, cgroup, config) -> None:
        """Into the sandbox's running VM: the monitor shares the container's files and prepares its init. The
        waiter that stands for that init on the host must be adopted by our parent, the engine's subreaper
        (containerd's shim: one per pod; conmon and CRI-O's: one per container). Where that is the monitor's
        parent too, the pod's zygote forks it, which costs the host far less; otherwise we start it."""
        from . import execution
        from ..host import mounts
        from ..vm import plan as plan_mod
        idents = {sandbox.record.pid: sandbox.record.ident}
        for other in pod_members(self.store, sandbox.id):
            idents[other.record.pid] = other.record.ident
        pod.refuse_unjoinable_paths(self.id, spec.namespaces, idents)
        plan = plan_mod.container(spec, share_prefix=f"{self.id}/", joins=pod.joins(spec.namespaces, idents))
        if plan.disks:
            raise PyrunvError(f"container {self.id}: a block device of the host reaches a VM at its boot only; "
                              f"the VM of pod {sandbox.id} runs already")
        # The VM's monitor lives in a mount namespace copied before the engine mounted this container's rootfs:
        # copies of the mount trees carry them there.
        exit_file = self.store.path(self.id, state.EXIT_FILE)
        fork_waiter = _same_parent(sandbox.record.pid)
        trees = []
        try:
            for entry in plan.shared:
                trees.append(mounts.detached_copy(entry.source, entry.readonly))
            stdio = execution.stdio(spec.process.terminal, console_socket, spec.process.console_size, detach=True,
                                    what="process.terminal")
            try:
                conn = control.Connection(sandbox.vm_dir, timeout=60)
                conn.send({"op": "create", "container": self.id, "records": plan.records.hex(),
                           "shared": [entry.name for entry in plan.shared], "terminal": spec.process.terminal,
                           "exit_file": exit_file, "fork_waiter": fork_waiter}, stdio + trees)
            finally:
                if spec.process.terminal:
                    os.close(stdio[0])
        finally:
            for tree in trees:
                os.close(tree)
        try:
            reply = conn.receive()
        except BaseException:
            conn.close()
            raise
        self.record.ident = reply["ident"]
        if fork_waiter:
            conn.close()
            self.record.pid = reply["pid"]
        else:
            self.record.pid = execution.start_waiter(conn, exit_file)
        if cgroup:
            cgroup.set(self._host_limits(spec.resources, config, 0))
            cgroup.add(self.record.pid)

    # the verbs ---------------------------------------------------------------------------------------

    def start(self) -> None:
        from . import hooks
        with self.store.lock(self.id):
            self.record = self.store.load(self.id)
            after = self._check("start")
            hooks.run("startContainer", self.record.hooks.get("startContainer", ()), self.record.oci_state(Status.CREATED))
            self._control("start")
            self._count_cpu_time()
            self.record.status = after.value
            self.store.save(self.record)
        hooks.run("poststart", self.record.hooks.get("poststart", ()), self.record.oci_state(after))

    def kill(self, signal: int, everyone: bool) -> None:
        status = self.status
        lifecycle.check("kill --all" if everyone else "kill", self.id, status)
        if status is not Status.STOPPED:  # kill --all of a stopped container: nothing is left to signal
            self._control("signal", signal=signal, all=everyone)

    def set_paused(self, verb: str) -> None:
        """pause or resume: a VM of its own freezes whole; a member of a pod, its cgroup in the guest."""
        with self.store.lock(self.id):
            self.record = self.store.load(self.id)
            after = self._check(verb)
            self._control(verb)
            self.record.status = after.value
            self.store.save(self.record)

    def update(self, limits) -> None:
        """New limits (a resources.Resources of what changes) for the guest's cgroup, the VM's memory and
        online vCPUs (up to the maxima it booted with), and the host cgroup."""
        import dataclasses
        from ..host import cgroups
        from .. import config as config_mod
        from ..vm import plan as plan_mod
        from ..oci import resources
        with self.store.lock(self.id):
            self.record = self.store.load(self.id)
            self._check("update")
            config = config_mod.load()
            merged = resources.merge(resources.Resources(**self.record.resources), limits)
            memory = self._vm_memory(merged, config) if limits.memory_limit else {}
            pairs = resources.guest_records(limits)
            if self.record.max_vcpus and (limits.cpu_quota or limits.cpu_period):
                pairs.append(("vcpus", self._vcpus_for(merged)))
            self._control("update", records=plan_mod.records(pairs).hex(), **memory)
            if self.record.cgroup:  # after the guest: a smaller VM has given its memory back by now
                cgroups.HostCgroup(**self.record.cgroup).set(
                    self._host_limits(limits, config, memory.get("memory_mib", 0)))
            self.record.resources = dataclasses.asdict(merged)
            self.store.save(self.record)

    def _vm_memory(self, limits, config) -> dict:
        """The VM's memory for these limits, as the monitor's update takes it: for a VM of its own, exactly what
        the memory limit needs (without one, its boot size); for a pod's, at least what its members' limits
        need together. Either within the most its VM can grow to."""
        from ..vm import plan as plan_mod
        from ..oci import resources

        def limit(r) -> int:
            return r.memory_limit if r.memory_limit != resources.UNLIMITED else 0
        owner = self._vm_owner()
        most = owner.record.max_memory_mib or owner.record.memory_mib
        if self.record.sandbox:
            others = [resources.Resources(**m.record.resources) for m in pod_members(self.store, owner.id)
                      if m.id != self.id]
            total = limit(limits) + sum(map(limit, others))
            wanted, request = plan_mod.vm_memory_mib(total, config), "grow_mib"
        elif self.record.memory_mib:
            wanted = plan_mod.vm_memory_mib(limit(limits), config) if limit(limits) else self.record.memory_mib
            request = "memory_mib"
        else:
            return {}
        if wanted > most:
            raise PyrunvError(
                f"cannot update {self.id}: a memory limit of {limits.memory_limit >> 20} MiB needs a VM of "
                f"{wanted} MiB, beyond the {most} MiB its VM can grow to (max_memory_mib)")
        return {request: wanted}

    def _vcpus_for(self, limits) -> int:
        """The vCPUs its VM needs online for these limits' CPU quota: without one, those it booted with."""
        from ..vm import plan as plan_mod
        wanted = plan_mod.vcpus_for(limits.cpu_quota, limits.cpu_period) or self.record.vcpus
        if wanted > self.record.max_vcpus:
            raise PyrunvError(
                f"cannot update {self.id}: a CPU quota of {limits.cpu_quota} per {limits.cpu_period or 100000} us "
                f"needs {wanted} vCPUs, beyond the {self.record.max_vcpus} its VM has (max_vcpus)")
        return wanted

    def exit_status(self) -> dict:
        """How the container's init ended: {"exit", "signal", "oom_kills"}; empty if that is not known."""
        import json
        try:
            with open(self.store.path(self.id, state.EXIT_FILE)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _vm_owner(self) -> "Container":
        """The container whose VM this one runs in: itself, or its pod's sandbox."""
        return Container.load(self.store, self.record.sandbox) if self.record.sandbox else self

    def _vm_running(self) -> "Container":
        """The container that owns this container's VM, if that VM runs (or is paused)."""
        owner = self._vm_owner()
        if owner.status not in (Status.CREATED, Status.RUNNING, Status.PAUSED):
            raise PyrunvError(f"container {self.id} is stopped: its VM is gone")
        return owner

    def qmp(self, command: str | None, arguments: str | None) -> None:
        from . import vm_access
        vm_access.qmp(self._vm_running().vm_dir, command, arguments)

    def console(self, follow: bool) -> None:
        """The VM's serial console from the VM's start, with the guest kernel's log in it."""
        from . import vm_access
        owner = self._vm_owner()
        if owner.status is not Status.STOPPED:
            try:
                control.call(owner.vm_dir, "kmsg", timeout=15)
            except PyrunvError as e:
                log.debug("kmsg of %s: %s", owner.id, e)  # what the console has so far is still worth showing
        vm_access.console(owner.vm_dir, follow, lambda: owner.status is not Status.STOPPED)

    def display(self, listen: str | None, password_file: str | None) -> None:
        """The VM's display: its VNC socket's path, or with listen a TCP port whose clients go to it while the VM
        runs."""
        from . import vm_access
        owner = self._vm_running()
        vm_access.display(owner.vm_dir, listen, password_file, lambda: owner.status is not Status.STOPPED)

    def checkpoint(self, image_path: str | None, leave_running: bool, page_server: str | None = None) -> None:
        """The VM saved to image_path, or streamed to a `restore --listen` at page_server (checkpoint.py);
        without leave_running the container then ends as if SIGKILLed. Refused, the container untouched,
        where QEMU and virtiofsd cannot save a VM."""
        from .. import config as config_mod
        from . import checkpoint
        with self.store.lock(self.id):
            self.record = self.store.load(self.id)
            self._check("checkpoint")
            if self.record.sandbox:
                raise PyrunvError(f"cannot checkpoint {self.id}: it runs in the VM of pod {self.record.sandbox}")
            if pod_members(self.store, self.id):  # restore would bring the VM back without their host side
                raise PyrunvError(f"cannot checkpoint {self.id}: other containers of its pod run in its VM")
            checkpoint.save(self, image_path, leave_running, config_mod.load(), page_server)

    def processes(self) -> list:
        self._check("ps")
        return self._control("ps")["processes"]

    def stats(self) -> dict:
        self._check("events")
        return self._control("stats")["stats"]

    def exec(self, process: dict, console_socket, detach: bool, pid_file) -> int:
        from . import execution
        self._check("exec")
        return execution.run(self.vm_dir, self.id, process, console_socket, detach, pid_file)

    def delete(self, force: bool) -> None:
        from . import hooks
        with self.store.lock(self.id):
            self.record = self.store.load(self.id)
            lifecycle.check("delete --force" if force else "delete", self.id, self.status)
            self.tear_down()
            hooks.run("poststop", self.record.hooks.get("poststop", ()), self.record.oci_state(Status.STOPPED))
            self.store.remove(self.id)

    def tear_down(self) -> None:
        """Nothing of the container is left running: its VM, or its part of the pod's VM and its waiter; then
        the host cgroup directories it made go."""
        from ..host import cgroups
        from . import sandbox
        if not self.record.sandbox:
            sandbox.stop(self.store, self.record)
        else:
            if self.record.ident:  # the VM took it: it has a share and an init there
                try:
                    self._control("remove")
                except PyrunvError as e:
                    log.debug("remove %s from its pod's VM: %s", self.id, e)  # a VM that is gone took it along
            sandbox.stop_process(self.record.pid, self.record.pid_start or state.process_start_time(self.record.pid))
        if self.record.cgroup:
            cgroups.HostCgroup(**self.record.cgroup).remove()


def _same_parent(pid: int) -> bool:
    """Whether process pid (a monitor, which its engine's subreaper adopted) has our parent for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == os.getppid()
    except (OSError, ValueError, IndexError):
        return False


def pod_members(store: state.Store, sandbox_id: str) -> list:
    return [Container(store, record) for record in store.records() if record.sandbox == sandbox_id]
