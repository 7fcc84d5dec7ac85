"""`state` and `list`: what the engines poll most, kept free of click, jsonschema and asyncio.

`quick` answers them straight from argv when the command line is plain; anything else (help, odd
flags) goes to the full click CLI, which renders through the same two functions."""
import json
import sys

from . import state
from .errors import PyrunvError, one_line

_GLOBAL_VALUES = {"--root", "--log", "--log-format", "--criu", "--rootless"}
_GLOBAL_FLAGS = {"--debug", "--systemd-cgroup"}


def render_state(store: state.Store, container_id: str) -> str:
    record = store.load(container_id)
    return json.dumps(record.oci_state(store.status(record)), indent=2)


def render_list(store: state.Store, fmt: str, quiet: bool) -> str:
    rows = [record.oci_state(store.status(record)) for record in store.records()]
    if quiet:
        return "\n".join(row["id"] for row in rows)
    if fmt == "json":
        return json.dumps(rows)
    lines = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
    lines += [(r["id"], str(r["pid"]), r["status"], r["bundle"], r["created"], r["owner"]) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _split(argv: list):
    """(global options, verb, rest), or None when the line is not plain enough for the quick path."""
    options, i = {}, 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].partition("=")
        if name in _GLOBAL_VALUES:
            if not eq:
                i += 1
                if i == len(argv):
                    return None
                value = argv[i]
            options[name] = value
        elif name in _GLOBAL_FLAGS and not eq:
            options[name] = True
        else:
            return None
        i += 1
    return (options, argv[i], argv[i + 1:]) if i < len(argv) else None


def _list_flags(rest: list):
    fmt, quiet, i = "table", False, 0
    while i < len(rest):
        if rest[i] in ("-q", "--quiet"):
            quiet = True
        elif rest[i] in ("-f", "--format") and i + 1 < len(rest) and rest[i + 1] in ("table", "json"):
            fmt = rest[i + 1]
            i += 1
        else:
            return None
        i += 1
    return fmt, quiet


def quick(argv: list) -> int | None:
    """Runs `state ID` or `list [...]` and returns the exit code; None to let the full CLI decide."""
    split = _split(argv)
    if split is None:
        return None
    options, verb, rest = split
    store = state.Store(options.get("--root", state.DEFAULT_ROOT))
    try:
        if verb == "state" and len(rest) == 1 and not rest[0].startswith("-"):
            text = render_state(store, rest[0])
        elif verb == "list" and (flags := _list_flags(rest)) is not None:
            text = render_list(store, *flags)
        else:
            return None
    except OSError:
        return None  # e.g. --root is not a directory: the full CLI reports it in one line
    except PyrunvError as e:
        from . import logs
        logs.configure(options.get("--log"), options.get("--log-format", "text"), bool(options.get("--debug")))
        logs.log.error(e.message)
        sys.stderr.write(f"pyrunv: {one_line(e.message)}\n")
        return e.exit_code
    if text:
        sys.stdout.write(text + "\n")
    return 0
