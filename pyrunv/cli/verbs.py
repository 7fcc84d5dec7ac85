"""runc's verbs, flag for flag: each parses its flags and calls one method of the runtime."""
import json
import os
import signal as signals
import sys
import time

import click

from ..errors import PyrunvError
from ..state.lifecycle import Status
from . import quick
from .context import Context, pass_ctx


def parse_signal(text: str) -> int:
    if text.isascii() and text.isdigit():  # int() refuses some of str.isdigit()'s digits, such as '²'
        number = int(text)
        if 0 < number < signals.NSIG:
            return number
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if isinstance(getattr(signals, name, None), signals.Signals):
            return int(getattr(signals, name))
    raise PyrunvError(f"invalid signal: {text if text.isprintable() else repr(text)}")  # one line, always


def create_container(obj: Context, container_id: str, bundle: str, pid_file, console_socket, restore_from=None):
    from ..runtime import create
    return create.create(obj.store, container_id, bundle, pid_file, console_socket, obj.systemd_cgroup,
                         restore_from)


@click.command()
@click.option("-b", "--bundle", default=".", help="path to the bundle directory")
@click.option("--pid-file", help="file to write the container's pid-file process's pid to")
@click.option("--console-socket", help="AF_UNIX socket that receives the pty master")
@click.option("--no-pivot", is_flag=True, help="accepted; the guest always pivots")
@click.option("--no-new-keyring", is_flag=True, help="accepted; the guest has its own keyrings")
@click.option("--preserve-fds", type=int, default=0, help="accepted; fds cannot cross into a VM")
@click.argument("container_id")
@pass_ctx
def create(obj, bundle, pid_file, console_socket, no_pivot, no_new_keyring, preserve_fds, container_id):
    """Create a container: boot its VM (or join its pod's) and prepare its process."""
    create_container(obj, container_id, bundle, pid_file, console_socket)


@click.command()
@click.argument("container_id")
@pass_ctx
def start(obj, container_id):
    """Start the created container's process."""
    obj.container(container_id).start()


@click.command("state")
@click.argument("container_id")
@pass_ctx
def state_(obj, container_id):
    """Output the state of a container."""
    click.echo(quick.render_state(obj.store, container_id))


@click.command()
@click.option("-a", "--all", "everyone", is_flag=True, help="signal every process of the container")
@click.argument("container_id")
@click.argument("signal", default="SIGTERM")
@pass_ctx
def kill(obj, everyone, container_id, signal):
    """Send a signal to the container's init process (default SIGTERM)."""
    number = parse_signal(signal)
    obj.container(container_id).kill(number, everyone)


@click.command()
@click.option("-f", "--force", is_flag=True, help="delete even a running container (SIGKILL)")
@click.argument("container_id")
@pass_ctx
def delete(obj, force, container_id):
    """Delete a container: power its VM off (or leave its pod's) and remove its state."""
    from ..runtime.container import Container
    Container.remove(obj.store, container_id, force)


@click.command()
@click.option("-b", "--bundle", default=".", help="path to the bundle directory")
@click.option("--console-socket", help="AF_UNIX socket that receives the pty master")
@click.option("-d", "--detach", is_flag=True, help="detach from the container's process")
@click.option("--keep", is_flag=True, help="do not delete the container after it exits")
@click.option("--pid-file", help="file to write the container's pid-file process's pid to")
@click.option("--no-subreaper", is_flag=True, help="accepted for compatibility")
@click.option("--no-pivot", is_flag=True, help="accepted; the guest always pivots")
@click.option("--no-new-keyring", is_flag=True, help="accepted; the guest has its own keyrings")
@click.option("--preserve-fds", type=int, default=0, help="accepted; fds cannot cross into a VM")
@click.argument("container_id")
@pass_ctx
def run(obj, bundle, console_socket, detach, keep, pid_file, no_subreaper, no_pivot, no_new_keyring,
        preserve_fds, container_id):
    """Create and start a container, and wait for it unless detached."""
    from ..runtime import create
    sys.exit(create.run(obj.store, container_id, bundle, pid_file, console_socket, obj.systemd_cgroup, detach,
                        keep))


@click.command()
@click.option("-r", "--resources", "resources_file", help="a file of linux.resources JSON, or - for stdin")
@click.option("--memory", help="memory limit (bytes, or with a k, m, g suffix; -1 for none)")
@click.option("--memory-reservation", help="memory soft limit")
@click.option("--memory-swap", help="memory plus swap limit (the guest has no swap)")
@click.option("--cpu-period", type=int, help="CPU CFS period in microseconds")
@click.option("--cpu-quota", type=int, help="CPU CFS quota in microseconds per period")
@click.option("--cpu-share", type=int, help="CPU shares (relative weight)")
@click.option("--cpuset-cpus", help="host CPUs the VM's processes may use, e.g. 0-1")
@click.option("--cpuset-mems", help="host memory nodes the VM's processes may use")
@click.option("--pids-limit", type=int, help="maximum number of processes in the container")
@click.argument("container_id")
@pass_ctx
def update(obj, resources_file, memory, memory_reservation, memory_swap, cpu_period, cpu_quota, cpu_share,
           cpuset_cpus, cpuset_mems, pids_limit, container_id):
    """Update a container's resource limits: in the guest, the VM's memory and the host cgroup."""
    from ..oci import resources
    from ..oci import spec as spec_mod
    document = None
    if resources_file == "-":
        try:
            document = json.load(sys.stdin)
        except ValueError as e:
            raise PyrunvError(f"invalid --resources: not JSON: {e}") from None
    elif resources_file:
        document = spec_mod.read_json(resources_file, "--resources")
    size = resources.ram_in_bytes
    limits = resources.from_update(document, {
        ("memory", "limit"): memory and size(memory, "--memory"),
        ("memory", "reservation"): memory_reservation and size(memory_reservation, "--memory-reservation"),
        ("memory", "swap"): memory_swap and size(memory_swap, "--memory-swap"),
        ("cpu", "period"): cpu_period, ("cpu", "quota"): cpu_quota, ("cpu", "shares"): cpu_share,
        ("cpu", "cpus"): cpuset_cpus, ("cpu", "mems"): cpuset_mems, ("pids", "limit"): pids_limit})
    obj.container(container_id).update(limits)


@click.command("list")
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("-q", "--quiet", is_flag=True, help="display only container IDs")
@pass_ctx
def list_(obj, fmt, quiet):
    """List the containers under --root."""
    text = quick.render_list(obj.store, fmt, quiet)
    if text:
        click.echo(text)


@click.command()
@click.argument("container_id")
@pass_ctx
def pause(obj, container_id):
    """Pause the container: freeze its whole VM (a container of a pod: its processes)."""
    obj.container(container_id).set_paused("pause")


@click.command()
@click.argument("container_id")
@pass_ctx
def resume(obj, container_id):
    """Resume the paused container."""
    obj.container(container_id).set_paused("resume")


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.argument("container_id")
@click.argument("ps_args", nargs=-1)
@pass_ctx
def ps(obj, fmt, container_id, ps_args):
    """List the processes of a container (their PIDs inside the VM)."""
    processes = obj.container(container_id).processes()
    if fmt == "json":
        click.echo(json.dumps([p["pid"] for p in processes]))
        return
    click.echo(f"{'UID':<8} {'PID':>7} {'PPID':>7} CMD")
    for p in processes:
        click.echo(f"{p['uid']:<8} {p['pid']:>7} {p['ppid']:>7} {p['cmd']}")


def parse_duration(text: str) -> float:
    """Go-style durations as runc takes them: 500ms, 5s, 1m, 1h."""
    for suffix, scale in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)):
        if text.endswith(suffix):
            try:
                value = float(text[:-len(suffix)]) * scale
            except ValueError:
                break
            if value > 0:
                return value
            break
    raise PyrunvError(f"invalid duration: {text!r}")


def stats_event(container_id: str, stats: dict) -> dict:
    """runc's stats event: the container's CPU, memory and processes from its cgroup in the guest; without a
    memory limit of its own, the limit is the VM's memory."""
    return {"type": "stats", "id": container_id, "data": {
        "cpu": {"usage": {"total": stats["cpu_user_ns"] + stats["cpu_system_ns"],
                          "user": stats["cpu_user_ns"], "kernel": stats["cpu_system_ns"]}},
        "memory": {"usage": {"usage": stats["cgroup_memory"],
                             "limit": stats["cgroup_memory_limit"] or stats["memory_total"],
                             "failcnt": stats["memory_max_events"]}},
        "pids": {"current": stats["pids"], **({"limit": stats["pids_limit"]} if stats["pids_limit"] else {})}}}


@click.command()
@click.option("--stats", "once", is_flag=True, help="print the container's stats once and exit")
@click.option("--interval", default="5s", help="stats interval, e.g. 5s or 500ms")
@click.argument("container_id")
@pass_ctx
def events(obj, once, interval, container_id):
    """Print the container's stats (from the guest) as JSON events, and an oom event when its cgroup's OOM
    killer acts; without --stats, until the container stops."""
    seconds = parse_duration(interval)
    oom_kills = 0
    while True:
        container = obj.container(container_id)
        ended = not once and container.status is Status.STOPPED  # its last count is in its exit status
        stats = None if ended else container.stats()
        counted = container.exit_status().get("oom_kills", 0) if ended else stats["oom_kills"]
        if not once and counted > oom_kills:
            oom_kills = counted
            click.echo(json.dumps({"type": "oom", "id": container_id}))
        if ended:
            return
        click.echo(json.dumps(stats_event(container_id, stats)))
        if once:
            return
        time.sleep(seconds)


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("--console-socket", help="AF_UNIX socket that receives the pty master")
@click.option("--cwd", help="working directory in the container")
@click.option("-e", "--env", multiple=True, help="set an environment variable")
@click.option("-t", "--tty", is_flag=True, help="allocate a pseudo-TTY")
@click.option("-u", "--user", help="UID[:GID]")
@click.option("-g", "--additional-gids", multiple=True, type=int, help="additional gids")
@click.option("-p", "--process", "process_file", help="path to a process.json")
@click.option("-d", "--detach", is_flag=True, help="detach from the process")
@click.option("--pid-file", help="file to write the waiter's pid to")
@click.option("--process-label", hidden=True)
@click.option("--apparmor", hidden=True)
@click.option("--no-new-privs", is_flag=True, help="set no_new_privileges for the process")
@click.option("-c", "--cap", multiple=True, help="add a capability")
@click.option("--preserve-fds", type=int, default=0, help="accepted; fds cannot cross into a VM")
@click.option("--cgroup", hidden=True)
@click.option("--ignore-paused", is_flag=True, help="accepted for compatibility")
@click.argument("container_id")
@click.argument("command", nargs=-1)
@pass_ctx
def exec_(obj, console_socket, cwd, env, tty, user, additional_gids, process_file, detach, pid_file,
          process_label, apparmor, no_new_privs, cap, preserve_fds, cgroup, ignore_paused, container_id, command):
    """Run another process in the container's VM."""
    from ..runtime import execution
    container = obj.container(container_id)
    process = execution.build_process(container.record, process_file, command, cwd=cwd, env=env, tty=tty, user=user,
                                      additional_gids=additional_gids, no_new_privs=no_new_privs, caps=cap)
    sys.exit(container.exec(process, console_socket, detach, pid_file))


@click.command()
@click.option("-b", "--bundle", default=".", help="where to write config.json")
@click.option("--rootless", is_flag=True, help="a configuration for a rootless container")
def spec(bundle, rootless):
    """Write a default config.json into the bundle."""
    from ..oci import defaults
    path = os.path.join(bundle, "config.json")
    if os.path.exists(path):
        raise PyrunvError("File config.json exists. Remove it first")
    try:
        with open(path, "w") as f:
            json.dump(defaults.spec(rootless), f, indent="\t")
    except OSError as e:
        raise PyrunvError(f"cannot write {path}: {e.strerror}") from None


@click.command()
def features():
    """Print the runtime-spec features document, with pyrunv's annotations."""
    from .. import config as config_mod
    from ..oci import defaults
    from ..vm import versions
    try:
        refusal = versions.checkpoint_refusal(config_mod.load())
    except PyrunvError as e:
        refusal = e.message
    click.echo(json.dumps(defaults.features(refusal), indent=4))


VERBS = (create, start, state_, kill, delete, run, update, list_, pause, resume, ps, events, exec_, spec, features)
