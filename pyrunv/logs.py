"""runc-style logging: --log FILE with --log-format text|json; JSON lines are {"level","msg","time"}."""
import contextlib
import json
import datetime
import logging
import sys

log = logging.getLogger("pyrunv")
_settings: dict = {}
# A log file that cannot be written (a full disk) must not print a traceback on a container's stderr.
logging.raiseExceptions = False


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelname.lower().replace("warning", "warn"),
                           "msg": record.getMessage(),
                           # RFC 3339, which containerd parses
                           "time": datetime.datetime.fromtimestamp(record.created).astimezone()
                           .isoformat(timespec="seconds")})


def settings() -> dict:
    """What configure() was given, for the monitor's own interpreter."""
    return dict(_settings)


def configure(path: str | None = None, fmt: str = "text", debug: bool = False) -> None:
    _settings.update(path=path, fmt=fmt, debug=debug)
    reopen()


def reopen(fallback_path: str | None = None) -> None:
    """Sets the handler up again, e.g. in the monitor after it has closed every inherited fd.

    The monitor's stderr is the container's, so it logs to `fallback_path` when there is no --log."""
    for logger in (log, logging.getLogger()):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            with contextlib.suppress(OSError):  # its fd may be closed already
                handler.close()
    path = _settings.get("path") or fallback_path
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    if _settings.get("fmt") == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("time=%(asctime)s level=%(levelname)s msg=%(message)r"))
    if not path and not _settings.get("debug"):
        handler.setLevel(logging.CRITICAL + 1)  # errors reach stderr once, through the CLI's own line
    # The root logger gets it too, so asyncio's own messages never reach a container's stderr.
    for logger in (log, logging.getLogger()):
        logger.addHandler(handler)
    log.setLevel(logging.DEBUG if _settings.get("debug") else logging.INFO)
    log.propagate = False
