#!/usr/bin/env python3
"""A soak of pyrunv, longer than CI runs: many fuzz cases and many real container lifecycles.

    /opt/pyrunv/venv/bin/python tools/soak.py --cases 20000 --containers 100

1. Fuzz cases (tests/fuzzgen.py) with a random seed, not CI's fixed one: config.json documents
   loaded and planned in-process, and command lines run in-process through both entry points.
2. Container lifecycles through the real CLI, several at a time: random valid generated configs (made
   safe for the host, see fuzzgen.for_a_real_vm) or plain busybox ones, in random scenarios: run to
   the end, kill (created, running, paused) after a random time, SIGKILL of QEMU, virtiofsd or the
   monitor, delete --force at a random time, even while create is still booting.

Every command must succeed or fail with one 'pyrunv: ' line; after each lifecycle, and at the end, no
process, mount or directory may be left. Prints the totals and exits non-zero on any failure or leftover.
Needs root, QEMU and the guest build (tools/setup), and hypothesis (the test extra)."""
import argparse
import collections
import concurrent.futures
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import fuzzgen  # noqa: E402  (tests/fuzzgen.py)
import psutil  # noqa: E402
from faultlib import fd_targets  # noqa: E402  (tests/faultlib.py)
from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings, strategies as st  # noqa: E402
from pyrunv.cli import commands as cli  # noqa: E402
from pyrunv.cli import launch

MAKE_BUNDLE = os.path.join(REPO, "tools", "make-busybox-bundle.sh")
DEADLINE = 60.0
lock = threading.Lock()


def say(text: str) -> None:
    with lock:
        print(f"soak: {text}", flush=True)


# --- fuzz cases --------------------------------------------------------------------------------

def fuzz_settings(count: int, seed: int):
    def wrap(test):
        return hypothesis_seed(seed)(settings(max_examples=count, deadline=None, database=None,
                                              suppress_health_check=list(HealthCheck))(test))
    return wrap


def fuzz_configs(count: int, seed: int, work: str, valid_pool: list) -> int:
    bundle = fuzzgen.make_fuzz_bundle(os.path.join(work, "config-bundle"))
    done = [0]

    @fuzz_settings(count, seed)
    @given(text=fuzzgen.config_texts())
    def case(text):
        outcome, _ = fuzzgen.check_config(bundle, text)
        done[0] += 1
        if outcome == "plan" and len(valid_pool) < 500 and text.startswith(b"{"):
            valid_pool.append(json.loads(text))
    case()
    return done[0]


def fuzz_command_lines(count: int, seed: int, work: str) -> int:
    paths = fuzzgen.cli_paths(work)
    root = os.path.join(work, "cli-root")
    done = [0]

    @fuzz_settings(count, seed)
    @given(kind=st.sampled_from(fuzzgen.ROOT_KINDS), entry=st.sampled_from([cli.main, launch.main]), data=st.data())
    def case(kind, entry, data):
        argv = data.draw(fuzzgen.command_lines(root, paths), label="argv")
        fuzzgen.prepare_root(root, kind)
        code, _, err = fuzzgen.run_cli(argv, entry)
        fuzzgen.check_cli_result(code, err)
        fuzzgen.check_root_after(root, kind)
        done[0] += 1
    case()
    return done[0]


# --- real containers ---------------------------------------------------------------------------

class Failure(Exception):
    pass


class Soak:
    def __init__(self, root: str, work: str, rng: random.Random, valid_pool: list):
        self.root, self.work, self.rng, self.valid_pool = root, work, rng, valid_pool
        self.outcomes = collections.Counter()

    def argv(self, *args):
        return [sys.executable, "-m", "pyrunv", "--root", self.root, *map(str, args)]

    def cmd(self, *args, timeout=DEADLINE * 2):
        """A short command: it succeeds or fails with one clean line."""
        result = subprocess.run(self.argv(*args), capture_output=True, timeout=timeout)
        self.clean(args, result.returncode, result.stderr)
        return result

    def clean(self, args, code, stderr: bytes):
        err = stderr.decode(errors="replace")
        if "Traceback" in err or (code and not (err.startswith("pyrunv: ") and err.count("\n") == 1)):
            raise Failure(f"pyrunv {' '.join(map(str, args))}: exit {code}, stderr {err!r}")

    def detached(self, cid, *args):
        """create (or run --detach): the container keeps stdout and stderr, so they go to a file."""
        out_path = os.path.join(self.work, f"{cid}.out")
        with open(out_path, "w+b") as out:
            code = subprocess.run(self.argv(*args), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                  timeout=DEADLINE * 3).returncode
            out.seek(0)
            text = out.read()
        self.clean(args, code, text)
        if code:
            say(f"{cid}: clean error from {args[0]}: {text.decode(errors='replace').strip()}")
        return code

    def bundle(self, cid: str, args: list) -> str:
        path = os.path.join(self.work, f"bundle-{cid}")
        subprocess.run([MAKE_BUNDLE, path, *args], check=True, capture_output=True)
        os.makedirs(os.path.join(path, "src"), exist_ok=True)
        if self.valid_pool and self.rng.random() < 0.5:
            document = fuzzgen.for_a_real_vm(self.rng.choice(self.valid_pool))
            document["process"]["args"] = args
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(document, f)
        return path

    def status(self, cid):
        result = subprocess.run(self.argv("state", cid), capture_output=True, timeout=DEADLINE)
        return json.loads(result.stdout)["status"] if result.returncode == 0 else None

    def wait_stopped(self, cid, timeout=DEADLINE) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status(cid) in ("stopped", None):
                return True
            time.sleep(0.1)
        return False

    def pause(self, low=0.0, high=1.5):
        time.sleep(self.rng.uniform(low, high))

    def finish(self, cid):
        """Deletes what is left of the container, plainly when it stopped, else with --force."""
        if self.wait_stopped(cid):
            result = self.cmd("delete", cid)
            if result.returncode and b"does not exist" not in result.stderr:
                raise Failure(f"delete of stopped {cid}: {result.stderr!r}")
        else:
            self.cmd("delete", "--force", cid)

    # Scenarios: each takes an ID and leaves nothing behind.
    def run_to_the_end(self, cid):
        path = self.bundle(cid, ["sh", "-c", "echo fuzz-ok"])
        result = subprocess.run(self.argv("run", "--bundle", path, cid), stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=DEADLINE * 3)
        err = result.stderr.decode(errors="replace")
        if "Traceback" in err or (result.returncode == 0 and result.stdout != b"fuzz-ok\n"):
            raise Failure(f"run {cid}: exit {result.returncode}, out {result.stdout!r}, err {err!r}")
        if result.returncode:
            say(f"{cid}: run ended {result.returncode}: {err.strip()[:200]}")
        return "ran" if result.returncode == 0 else "clean error"

    def kill_after_a_while(self, cid):
        path = self.bundle(cid, ["sleep", "600"])
        if self.detached(cid, "create", "--bundle", path, cid):
            return "clean error"
        where = self.rng.choice(["created", "running", "running", "paused"])
        if where != "created":
            self.cmd("start", cid)
        if where == "paused":
            self.cmd("pause", cid)
        self.pause()
        sig = self.rng.choice(["KILL", "TERM", "9", "SIGINT"])
        self.cmd("kill", cid, sig)
        if sig not in ("KILL", "9") and not self.wait_stopped(cid, timeout=3):
            self.cmd("kill", cid, "KILL")  # sleep, as PID 1, ignores TERM and INT
        if not self.wait_stopped(cid):
            raise Failure(f"{cid}: not stopped {DEADLINE:g}s after SIGKILL")
        self.finish(cid)
        return f"killed when {where}"

    def kill_a_piece(self, cid):
        path = self.bundle(cid, ["sleep", "600"])
        if self.detached(cid, "create", "--bundle", path, cid):
            return "clean error"
        if self.rng.random() < 0.7:
            self.cmd("start", cid)
        piece = self.rng.choice(["qemu", "virtiofsd", "monitor"])
        try:
            with open(os.path.join(self.root, cid, "helpers.json")) as f:
                helpers = json.load(f)
            with open(os.path.join(self.root, cid, "state.json")) as f:
                monitor = json.load(f)["pid"]
        except (OSError, ValueError) as e:
            raise Failure(f"{cid}: no helpers.json or state.json after create: {e}")
        pid = {"qemu": helpers[0][0], "virtiofsd": helpers[1][0], "monitor": monitor}[piece]
        self.pause(0, 1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not self.wait_stopped(cid):
            raise Failure(f"{cid}: not stopped {DEADLINE:g}s after SIGKILL of its {piece}")
        self.finish(cid)
        return f"SIGKILL {piece}"

    def force_delete_at_any_time(self, cid):
        path = self.bundle(cid, ["sleep", "600"])
        out = open(os.path.join(self.work, f"{cid}.out"), "w+b")
        create = subprocess.Popen(self.argv("create", "--bundle", path, cid), stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=out)
        self.pause(0, 2.5)  # before, during or after the boot
        first = self.cmd("delete", "--force", cid)
        code = create.wait(DEADLINE * 3)
        out.seek(0)
        self.clean(("create", cid), code, out.read())
        out.close()
        self.cmd("delete", "--force", cid)  # if the create finished after the first delete looked
        return "deleted while creating" if first.returncode == 0 and code else "force-deleted"

    SCENARIOS = ("run_to_the_end", "kill_after_a_while", "kill_after_a_while", "kill_a_piece",
                 "force_delete_at_any_time")

    def lifecycle(self, n: int) -> str:
        cid = f"soak-{n}"
        with lock:
            scenario = self.rng.choice(self.SCENARIOS)
        try:
            outcome = getattr(self, scenario)(cid)
        except Failure as e:
            outcome = f"FAILED: {e}"
        except Exception:
            outcome = "FAILED: " + traceback.format_exc().strip().splitlines()[-1]
        finally:
            shutil.rmtree(os.path.join(self.work, f"bundle-{cid}"), ignore_errors=True)
        left = leftovers(self.root, cid)
        if left:
            outcome = f"LEFTOVER: {left}"
            subprocess.run(self.argv("delete", "--force", cid), capture_output=True, timeout=DEADLINE * 2)
        with lock:
            self.outcomes[f"{scenario}: {outcome}" if outcome.startswith(("FAILED", "LEFTOVER")) else outcome] += 1
        if outcome.startswith(("FAILED", "LEFTOVER")):
            say(f"{cid} ({scenario}): {outcome}")
        return outcome


def leftovers(root: str, cid: str | None = None) -> list:
    """Processes, mounts and state directories of container `cid` (or of every container) under root."""
    def mine(text: str) -> bool:
        if cid is None:
            return root in text
        return f"{root}/{cid}/" in text or text.endswith(f"{root}/{cid}") or (
            f"--root {root} " in text and text.endswith(f" {cid}"))  # its monitor, forked from create or run
    def holds(link: str) -> bool:  # a monitor names no --root, but keeps files open in its state directory
        if cid is None:
            return link.startswith(root + "/")
        return link.startswith((f"{root}/{cid}/", f"{root}/.deleted:{cid}:"))
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            args = " ".join(proc.cmdline())
            links = fd_targets(proc.pid)
        except (OSError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # gone meanwhile
        if mine(args) and any(name in args for name in ("qemu-system", "virtiofsd", "pyrunv")):
            found.append(f"process {proc.pid}: {args[:200]}")
        elif any(holds(link) for link in links):
            found.append(f"process {proc.pid} holds {[link for link in links if holds(link)][0]}: {args[:100]}")
    # By hand: the raw lines are what is reported, and psutil.disk_partitions() rewrites their devices.
    with open("/proc/mounts") as f:
        found += [f"mount: {line.strip()}" for line in f if mine(line.split()[1])]
    if cid is not None:
        found += [f"directory {root}/{cid}"] if os.path.lexists(os.path.join(root, cid)) else []
    elif os.path.isdir(root):
        found += [f"directory {root}/{e}" for e in os.listdir(root)]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20000, help="fuzz cases in all (60%% configs, 40%% command lines)")
    parser.add_argument("--containers", type=int, default=100, help="real container lifecycles")
    parser.add_argument("--parallel", type=int, default=4, help="lifecycles at a time")
    parser.add_argument("--seed", type=int, default=None, help="seed for the fuzzing and the scenarios")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    work = tempfile.mkdtemp(prefix="pyrunv-soak-")
    root = os.path.join(work, "root")
    say(f"seed {seed}, work directory {work}")
    started = time.monotonic()
    failures = []
    valid_pool: list = []
    config_cases = cli_cases = 0

    config_target, cli_target = args.cases * 3 // 5, args.cases - args.cases * 3 // 5
    for name, run in (("config.json", lambda: fuzz_configs(config_target, seed, work, valid_pool)),
                      ("command line", lambda: fuzz_command_lines(cli_target, seed, work))):
        if not (config_target if name == "config.json" else cli_target):
            continue
        try:
            count = run()
        except Exception as e:  # hypothesis has shrunk it and says how to reproduce it
            count = 0
            failures.append(f"{name} fuzzing: {type(e).__name__}: {e}")
            say(f"{name} fuzzing FAILED:\n{traceback.format_exc()}")
        if name == "config.json":
            config_cases = count
        else:
            cli_cases = count
        say(f"{name} cases: {count} ({time.monotonic() - started:.0f}s)")

    soak = Soak(root, work, random.Random(seed), valid_pool)
    if args.containers:
        say(f"{args.containers} container lifecycles, {args.parallel} at a time "
            f"({len(valid_pool)} valid generated configs to draw from)")
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(soak.lifecycle, range(args.containers)))
    left = leftovers(root)
    failures += [k for k in soak.outcomes if k.startswith(("FAILED", "LEFTOVER")) or ": FAILED" in k
                 or ": LEFTOVER" in k]
    containers = sum(soak.outcomes.values())
    say(f"outcomes: {dict(sorted(soak.outcomes.items()))}")
    print(f"cases run: {config_cases + cli_cases} (config.json {config_cases}, command lines {cli_cases})")
    print(f"containers run: {containers}")
    print(f"leftovers found: {len(left)}" + "".join(f"\n  {x}" for x in left))
    print(f"failures: {len(failures)}" + "".join(f"\n  {x}" for x in failures))
    print(f"time: {time.monotonic() - started:.0f}s, seed {seed}")
    if not left and not failures:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if left or failures else 0


if __name__ == "__main__":
    sys.exit(main())
