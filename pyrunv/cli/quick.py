"""The verbs engines call on every container, without click: `state` and `list` (polled most, also free of
jsonschema and asyncio), `create`, `start` and `run`.

`quick` answers them straight from argv when the command line is plain; anything else (help, odd
flags) goes to the full click CLI, which renders through the same functions and reports errors
through the same `report`."""
import sys

from .. import jsonlite
from ..errors import PyrunvError, one_line
from ..state import store as state

_GLOBAL_VALUES = {"--root", "--log", "--log-format", "--criu", "--rootless"}
_GLOBAL_FLAGS = {"--debug", "--systemd-cgroup"}


def render_state(store: state.Store, container_id: str) -> str:
    record = store.load(container_id)
    return jsonlite.dumps(record.oci_state(store.status(record)), indent=2)


def render_list(store: state.Store, fmt: str, quiet: bool) -> str:
    rows = [record.oci_state(store.status(record)) for record in store.records()]
    if quiet:
        return "\n".join(row["id"] for row in rows)
    if fmt == "json":
        return jsonlite.dumps(rows)
    lines = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
    lines += [(r["id"], str(r["pid"]), r["status"], r["bundle"], r["created"], r["owner"]) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _value(words: list, i: int, eq: str, value: str):
    """The value of the option at words[i], after its `=` or as the next word: (value, the index of the last
    word it used), or None if there is none."""
    if eq:
        return value, i
    return (words[i + 1], i + 1) if i + 1 < len(words) else None


def _split(argv: list):
    """(global options, verb, rest), or None when the line is not plain enough for the quick path."""
    options, i = {}, 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].partition("=")
        if name in _GLOBAL_VALUES:
            taken = _value(argv, i, eq, value)
            if taken is None:
                return None
            options[name], i = taken
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


def _verb_flags(rest: list, switches: dict):
    """runc's create or run flags: ({"bundle", "pid_file", "console_socket", "detach", "keep"}, ID), or None if
    the line is not plain. `switches` are the verb's flags without a value."""
    found = {"bundle": ".", "pid_file": None, "console_socket": None, "detach": False, "keep": False}
    ids, i = [], 0
    while i < len(rest):
        name, eq, value = rest[i].partition("=")
        if name in _VALUES:
            taken = _value(rest, i, eq, value)
            if taken is None:
                return None
            value, i = taken
            if _VALUES[name]:
                found[_VALUES[name]] = value
        elif name in switches and not eq:
            if switches[name]:
                found[switches[name]] = True
        elif name.startswith("-"):
            return None
        else:
            ids.append(rest[i])
        i += 1
    return (found, ids[0]) if len(ids) == 1 else None


# runc's create and run flags with a value (None: accepted and not used), and those without one;
# cli.create and cli.run document them.
_VALUES = {"-b": "bundle", "--bundle": "bundle", "--pid-file": "pid_file", "--console-socket": "console_socket",
           "--preserve-fds": None}
_CREATE_SWITCHES = {"--no-pivot": None, "--no-new-keyring": None}
_RUN_SWITCHES = {**_CREATE_SWITCHES, "-d": "detach", "--detach": "detach", "--keep": "keep", "--no-subreaper": None}


def quick(argv: list) -> int | None:
    """Runs `state`, `list`, `start`, `create` or `run` and returns the exit code; None to let the full CLI decide."""
    split = _split(argv)
    if split is None:
        return None
    options, verb, rest = split
    store = state.Store(options.get("--root", state.DEFAULT_ROOT))
    plain_id = len(rest) == 1 and not rest[0].startswith("-")
    if verb == "start" and plain_id:
        return _run(options, lambda: _container(store, rest[0]).start())
    systemd_cgroup = bool(options.get("--systemd-cgroup"))
    if verb == "create" and (flags := _verb_flags(rest, _CREATE_SWITCHES)) is not None:
        from ..runtime import create
        found, container_id = flags
        return _run(options, lambda: create.create(store, container_id, found["bundle"], found["pid_file"],
                                                   found["console_socket"], systemd_cgroup))
    if verb == "run" and (flags := _verb_flags(rest, _RUN_SWITCHES)) is not None:
        from ..runtime import create
        found, container_id = flags
        return _run(options, lambda: create.run(store, container_id, found["bundle"], found["pid_file"],
                                                found["console_socket"], systemd_cgroup, found["detach"],
                                                found["keep"]))
    try:
        if verb == "state" and plain_id:
            text = render_state(store, rest[0])
        elif verb == "list" and (flags := _list_flags(rest)) is not None:
            text = render_list(store, *flags)
        else:
            return None
    except OSError:
        return None  # e.g. --root is not a directory: the full CLI reports it in one line
    except PyrunvError as e:
        _configure_logs(options)
        return report(e, debug=False)
    if text:
        sys.stdout.write(text + "\n")
    return 0


def _container(store: state.Store, container_id: str):
    from ..runtime.container import Container
    return Container.load(store, container_id)


def _configure_logs(options: dict) -> None:
    from .. import logs
    logs.configure(options.get("--log"), options.get("--log-format", "text"), bool(options.get("--debug")))


def _run(options: dict, action) -> int:
    """The exit code the action returns (0 if it returns none), or the user's error's."""
    _configure_logs(options)
    try:
        code = action()
        return code if isinstance(code, int) else 0
    except (PyrunvError, OSError) as e:
        return report(e, bool(options.get("--debug")))


def report(error: PyrunvError | OSError, debug: bool) -> int:
    """The user's one line on stderr (and the log's), and the exit code; with --debug, the traceback too."""
    if isinstance(error, PyrunvError):
        from ..logs import log
        log.error(error.message)
        message, code = error.message, error.exit_code
    else:
        message, code = error.strerror + (f": {error.filename}" if error.filename else ""), 1
    sys.stderr.write(f"pyrunv: {one_line(message)}\n")
    sys.stderr.flush()
    if debug:
        raise error
    return code
