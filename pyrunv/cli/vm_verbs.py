"""The verbs on the VM as a whole: checkpoint and restore (the whole VM saved and loaded), and pyrunv's own
check, qmp, console and display."""
import json
import sys

import click

from ..errors import PyrunvError
from .context import pass_ctx
from .verbs import create_container


@click.command()
@click.option("--image-path", help="directory for the saved VM")
@click.option("--page-server", metavar="ADDRESS:PORT", help="stream the VM to a `restore --listen` there instead")
@click.option("--work-path", help="accepted: a VM's state needs no work directory")
@click.option("--leave-running", is_flag=True, help="keep the container running afterwards")
@click.option("--parent-path", hidden=True)
@click.option("--tcp-established", is_flag=True, hidden=True)
@click.option("--ext-unix-sk", is_flag=True, hidden=True)
@click.option("--shell-job", is_flag=True, hidden=True)
@click.option("--file-locks", is_flag=True, hidden=True)
@click.option("--manage-cgroups-mode", hidden=True)
@click.argument("container_id")
@pass_ctx
def checkpoint(obj, image_path, page_server, work_path, leave_running, parent_path, tcp_established, ext_unix_sk,
               shell_job, file_locks, manage_cgroups_mode, container_id):
    """Checkpoint the container: save its whole VM (needs QEMU >= 8.2 and the Rust virtiofsd >= 1.11)."""
    _one_of("checkpoint", image_path=image_path, page_server=page_server)
    obj.container(container_id).checkpoint(image_path, leave_running, page_server)


@click.command()
@click.option("--image-path", help="directory of a saved VM")
@click.option("--listen", metavar="HOST:PORT", help="receive the VM from a `checkpoint --page-server` instead")
@click.option("-b", "--bundle", default=".", help="path to the bundle directory")
@click.option("--work-path", help="accepted: a VM's state needs no work directory")
@click.option("-d", "--detach", is_flag=True, help="detach from the container's process")
@click.option("--pid-file", help="file to write the container's pid-file process's pid to")
@click.option("--console-socket", help="AF_UNIX socket that receives the pty master")
@click.option("--tcp-established", is_flag=True, hidden=True)
@click.option("--ext-unix-sk", is_flag=True, hidden=True)
@click.option("--shell-job", is_flag=True, hidden=True)
@click.option("--file-locks", is_flag=True, hidden=True)
@click.option("--manage-cgroups-mode", hidden=True)
@click.option("--no-subreaper", is_flag=True, hidden=True)
@click.option("--no-pivot", is_flag=True, hidden=True)
@click.argument("container_id")
@pass_ctx
def restore(obj, image_path, listen, bundle, work_path, detach, pid_file, console_socket, tcp_established,
            ext_unix_sk, shell_job, file_locks, manage_cgroups_mode, no_subreaper, no_pivot, container_id):
    """Restore a container from a checkpoint: its VM resumes where it was saved."""
    from ..vm.snapshot import Source
    _one_of("restore", image_path=image_path, listen=listen)
    container = create_container(obj, container_id, bundle, pid_file, console_socket,
                                 restore_from=Source(image_path, listen))
    if not detach:
        sys.exit(container.wait_in_foreground(keep=False))


def _one_of(verb: str, **options) -> None:
    if sum(1 for value in options.values() if value) != 1:
        names = [f"--{name.replace('_', '-')}" for name in options]
        raise PyrunvError(f"{verb} needs exactly one of {' and '.join(names)}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="the lines as a JSON list")
def check(as_json):
    """Check whether this host can run pyrunv's containers, and how well; exit 1 if it cannot."""
    import dataclasses
    from ..runtime import host_check as check_mod
    lines = check_mod.run()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(line) for line in lines], indent=2))
    else:
        click.echo("\n".join(line.text() for line in lines))
    if any(line.level == "fail" for line in lines):
        sys.exit(1)


@click.command()
@click.argument("container_id")
@click.argument("command", required=False)
@click.argument("arguments", required=False)
@pass_ctx
def qmp(obj, container_id, command, arguments):
    """QMP on the container's VM: COMMAND with ARGUMENTS (a JSON object), or without one qemu.qmp's shell."""
    obj.container(container_id).qmp(command, arguments)


@click.command()
@click.option("-f", "--follow", is_flag=True, help="keep printing while the VM runs")
@click.argument("container_id")
@pass_ctx
def console(obj, follow, container_id):
    """Print the VM's serial console, with the guest kernel's log, from the VM's start."""
    obj.container(container_id).console(follow)


@click.command()
@click.option("--listen", metavar="HOST:PORT", help="hand this TCP port's clients to the display while the VM runs")
@click.option("--password-file", metavar="FILE",
              help="ask --listen's clients for the password on the file's first line (needed but on loopback)")
@click.argument("container_id")
@pass_ctx
def display(obj, listen, password_file, container_id):
    """Print the path of the VM's VNC socket (annotation io.pyrunv.vm.display=vnc), or serve it on a TCP port."""
    obj.container(container_id).display(listen, password_file)


VERBS = (checkpoint, restore, check, qmp, console, display)
