import ctypes
import json
import os
import subprocess
import sys

import pytest

from faultlib import fault_matrix_lines, holders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_BUNDLE = os.path.join(REPO, "tools", "make-busybox-bundle.sh")
PR_SET_CHILD_SUBREAPER = 36


def pyrunv_argv(root, *args):
    return [sys.executable, "-m", "pyrunv", "--root", str(root), *map(str, args)]


class Runtime:
    """Runs the pyrunv CLI with its own --root, as an engine would."""

    def __init__(self, root):
        self.root = root
        self._counter = iter(range(1 << 30))

    def argv(self, *args):
        return pyrunv_argv(self.root, *args)

    def __call__(self, *args, input=None, timeout=120, check=False):
        result = subprocess.run(self.argv(*args), input=input, capture_output=True, timeout=timeout)
        if check and result.returncode:
            raise AssertionError(f"pyrunv {' '.join(map(str, args))} failed ({result.returncode}): "
                                 f"{result.stderr.decode()}")
        return result

    def detached(self, *args, stdin=subprocess.DEVNULL, timeout=120, check=True):
        """For create and run --detach: the container keeps their stdout and stderr, so these go to
        files, as with conmon or the containerd shim, rather than to pipes we would wait on forever."""
        out = open(self.root.parent / f"out-{next(self._counter)}", "w+b")
        result = subprocess.run(self.argv(*args), stdin=stdin, stdout=out, stderr=out, timeout=timeout)
        out.seek(0)
        result.stderr = out.read()
        if check and result.returncode:
            raise AssertionError(f"pyrunv {' '.join(map(str, args))} failed ({result.returncode}): "
                                 f"{result.stderr.decode()}")
        return result

    def state(self, container_id):
        return json.loads(self("state", container_id, check=True).stdout)

    def leftovers(self):
        """Everything a deleted container must not leave behind."""
        procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
        stray = [p for p in procs if str(self.root) in p and ("qemu-system" in p or "virtiofsd" in p
                                                               or "pyrunv" in p)]
        with open("/proc/mounts") as f:
            mounts = [line for line in f if str(self.root) in line]
        entries = [e for e in os.listdir(self.root) if not e.startswith(".")] if os.path.isdir(self.root) else []
        return stray + mounts + entries + holders(self.root)


@pytest.fixture
def runtime(tmp_path):
    rt = Runtime(tmp_path / "root")
    yield rt
    for container_id in (os.listdir(rt.root) if os.path.isdir(rt.root) else []):
        if not container_id.startswith("."):
            rt("delete", "--force", container_id)


def make_bundle(path, *args, edit=None):
    subprocess.run([MAKE_BUNDLE, str(path), *args], check=True, capture_output=True)
    if edit:
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        edit(config)
        with open(config_path, "w") as f:
            json.dump(config, f)
    return path


@pytest.fixture
def bundle(tmp_path):
    """make(args..., edit=fn) -> a fresh busybox bundle directory."""
    counter = iter(range(1000))

    def make(*args, edit=None):
        return make_bundle(tmp_path / f"bundle{next(counter)}", *args, edit=edit)
    return make


@pytest.fixture
def subreaper():
    """Makes the test process adopt orphans, as conmon and the containerd shim do."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def pytest_terminal_summary(terminalreporter):
    """The fault matrix that test_faults.py filled, if it ran: a report belongs with the session's summary."""
    lines = fault_matrix_lines()
    if lines:
        terminalreporter.write_sep("-", "fault matrix (SIGKILL of one piece): waiter status, state after")
        for line in lines:
            terminalreporter.write_line(line)
