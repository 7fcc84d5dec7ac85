"""runc-style logging: --log FILE with --log-format text|json; JSON lines are {"level","msg","time"}.

Not the logging package: importing it costs every command some 15 ms, and containerd passes --log to
each. The monitor routes the logging package's records (asyncio's, qemu.qmp's) here too (`reopen`)."""
import sys
import time

_settings = {"path": None, "fmt": "text", "debug": False, "fallback": None}


class _Log:
    """The five calls the code makes, with logging's %-style arguments."""

    def debug(self, message, *args) -> None:
        _emit("debug", message, args)

    def info(self, message, *args) -> None:
        _emit("info", message, args)

    def warning(self, message, *args) -> None:
        _emit("warning", message, args)

    def error(self, message, *args) -> None:
        _emit("error", message, args)

    def exception(self, message, *args) -> None:
        import traceback
        _emit("error", message, args, traceback.format_exc().rstrip())


log = _Log()


def settings() -> dict:
    """What configure() was given, for the monitor's own interpreter."""
    return {key: _settings[key] for key in ("path", "fmt", "debug")}


def configure(path: str | None = None, fmt: str | None = "text", debug: bool | None = False) -> None:
    _settings.update(path=path, fmt=fmt, debug=bool(debug))


def set_fallback(path: str | None) -> None:
    """The monitor's: its stderr is the container's, so it logs to `path` when there is no --log."""
    _settings["fallback"] = path


def reopen(fallback_path: str | None = None) -> None:
    """set_fallback, and what other libraries log through the logging package comes here rather than to
    the monitor's stderr."""
    import logging
    set_fallback(fallback_path)

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            level = "error" if record.levelno >= 40 else "warning" if record.levelno >= 30 else \
                "info" if record.levelno >= 20 else "debug"
            trace = self.formatter.formatException(record.exc_info) if record.exc_info else None
            _emit(level, record.getMessage(), (), trace)

    handler = Forward()
    handler.setFormatter(logging.Formatter())
    logging.raiseExceptions = False  # a log file that cannot be written must not print a traceback on stderr
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if _settings["debug"] else logging.INFO)


def _emit(level: str, message, args: tuple, trace: str | None = None) -> None:
    if level == "debug" and not _settings["debug"]:
        return
    path = _settings["path"] or _settings["fallback"]
    if not path and not _settings["debug"]:
        return  # errors reach stderr once, through the CLI's own line
    text = str(message) % args if args else str(message)
    if trace:
        text += "\n" + trace
    now = time.time()
    if _settings["fmt"] == "json":
        from . import jsonlite
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))
        # RFC 3339, which containerd parses: +00:00, not +0000
        line = jsonlite.dumps({"level": level.replace("warning", "warn"), "msg": text,
                               "time": f"{stamp[:-2]}:{stamp[-2:]}"})
    else:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
        line = f"time={stamp} level={level.upper()} msg={text!r}"
    try:
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")
        else:
            sys.stderr.write(line + "\n")
    except (OSError, ValueError):  # a full disk, a closed stderr: the command's outcome must not change
        pass
