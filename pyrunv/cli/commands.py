"""The command line: runc's global flags, then a verb (verbs.py, vm_verbs.py); errors as runc prints them."""
import sys

import click

from .. import __version__, logs
from ..errors import PyrunvError, one_line
from ..state import store as state
from . import quick, verbs, vm_verbs
from .context import Context


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", default=state.DEFAULT_ROOT, show_default=True, help="root directory for container state")
@click.option("--log", "log_path", default=None, help="log file (default: stderr)")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", help="log format")
@click.option("--debug", is_flag=True, help="enable debug logging and tracebacks")
@click.option("--systemd-cgroup", is_flag=True, help="cgroupsPath is slice:prefix:name (mapped onto cgroupfs)")
@click.option("--criu", default="criu", hidden=True)
@click.option("--rootless", default="auto", hidden=True)
@click.version_option(__version__, "-v", "--version", prog_name="pyrunv",
                      message="%(prog)s version %(version)s\nspec: 1.0.2")
@click.pass_context
def cli(ctx, root, log_path, log_format, debug, systemd_cgroup, criu, rootless):
    """pyrunv: an OCI runtime that runs each container in its own QEMU virtual machine."""
    logs.configure(log_path, log_format, debug)
    ctx.obj = Context(root, systemd_cgroup)


for verb in verbs.VERBS + vm_verbs.VERBS:
    cli.add_command(verb)


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(prog_name="pyrunv", standalone_mode=False)
    except (PyrunvError, OSError) as e:
        sys.exit(quick.report(e, debug))
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"pyrunv: {one_line(e.format_message())}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        sys.exit(1)
