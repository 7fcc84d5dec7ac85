"""The `pyrunv` command. Started with `python -S` by the installed launcher, it answers `state` and
`list` before click is even looked at. The launcher puts the venv's site-packages on sys.path
itself; without it (a plain `python -S`), site is set up here."""
import sys


def main() -> None:
    from . import query
    code = query.quick(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    try:
        from .cli import main as full_cli
    except ImportError:
        import site
        site.main()
        from .cli import main as full_cli
    full_cli()


if __name__ == "__main__":
    main()
