"""The `pyrunv` command. Started with `python -S` by the installed launcher, it answers `state` and
`list` before site-packages (and click) are even looked at, then sets them up for everything else."""
import sys


def main() -> None:
    from . import query
    code = query.quick(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    if "site" not in sys.modules:
        import site
        site.main()
    from .cli import main as full_cli
    full_cli()


if __name__ == "__main__":
    main()
