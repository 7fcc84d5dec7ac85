"""The `pyrunv` command. Started with `python -S` by the installed launcher, it answers `state`, `list`,
`create` and `start` without click (quick.py). The launcher puts the venv's site-packages on sys.path
itself; without it (a plain `python -S`), site is set up here."""
import os
import sys


def main() -> None:
    _ensure_stdio()
    if not any(path.endswith("-packages") for path in sys.path):  # a bare `python -S`: no dependencies yet
        import site
        site.main()
    from . import quick
    code = quick.quick(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from .commands import main as full_cli
    full_cli()


def run() -> None:
    """The installed command: main(), then an exit without the interpreter's teardown. After a create or a
    run, unloading jsonschema and the rest costs about 30 ms, and nothing is left to do (the logs are
    written line by line)."""
    try:
        main()
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            raise  # a message to print: the interpreter does that
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:  # e.g. a reader that has gone: what could not be written is lost either way
                pass
        os._exit(e.code or 0)


def _ensure_stdio() -> None:
    # With a closed fd 0-2, the next pipe or socket would take its number and be mistaken for stdio.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)


if __name__ == "__main__":
    main()
