"""Fuzzing config.json and the command line (hypothesis). See tests/fuzzgen.py for what is generated.

Every config case ends in a valid plan or a one-line PyrunvError; every command line in exit 0 with an
empty stderr, or a non-zero exit with exactly one 'pyrunv: ' line; nothing is left in --root. The cases
run in-process (no VM); a deterministic sample of valid configs then runs through the real CLI."""
import hashlib
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fuzzgen
from faultlib import one_line_error
from pyrunv.cli import commands as cli
from pyrunv.cli import launch

CONFIG_CASES = 1500
CLI_CASES = 1000
SAMPLE_POOL = 300
SAMPLE_SIZE = 5

FUZZ = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck),
                print_blob=True)


def report(capsys, text):
    with capsys.disabled():
        print(f"\n{text}")


def test_config_fuzz(tmp_path, capsys):
    bundle = fuzzgen.make_fuzz_bundle(tmp_path / "bundle")
    outcomes = {"plan": 0, "error": 0}

    @settings(FUZZ, max_examples=CONFIG_CASES)
    @given(text=fuzzgen.config_texts())
    def case(text):
        outcome, _ = fuzzgen.check_config(bundle, text)
        outcomes[outcome] += 1
    case()
    total = sum(outcomes.values())
    report(capsys, f"fuzz cases: config.json {total} ({outcomes['plan']} valid plans, "
                   f"{outcomes['error']} one-line errors)")
    assert total >= CONFIG_CASES * 0.95
    assert outcomes["plan"] >= total * 0.1 and outcomes["error"] >= total * 0.1, outcomes


@pytest.mark.parametrize("entry", ["cli.main", "launch.main"])
def test_command_line_fuzz(tmp_path, capsys, entry):
    main = {"cli.main": cli.main, "launch.main": launch.main}[entry]
    paths = fuzzgen.cli_paths(str(tmp_path))
    root = str(tmp_path / "root")
    outcomes = {"ok": 0, "error": 0}

    @settings(FUZZ, max_examples=CLI_CASES // 2)
    @given(kind=st.sampled_from(fuzzgen.ROOT_KINDS), data=st.data())
    def case(kind, data):
        argv = data.draw(fuzzgen.command_lines(root, paths), label="argv")
        fuzzgen.prepare_root(root, kind)
        code, _, err = fuzzgen.run_cli(argv, main)
        fuzzgen.check_cli_result(code, err)
        fuzzgen.check_root_after(root, kind)
        outcomes["error" if code else "ok"] += 1
    case()
    total = sum(outcomes.values())
    report(capsys, f"fuzz cases: command lines through {entry} {total} ({outcomes['ok']} exit 0, "
                   f"{outcomes['error']} one-line errors)")
    assert total >= CLI_CASES // 2 * 0.95
    assert outcomes["error"] > total * 0.5 and outcomes["ok"] > 0, outcomes


ODD_BUNDLES = {
    "config.json is a directory": lambda b: (b / "config.json").mkdir(),
    "config.json is a symlink loop": lambda b: os.symlink("config.json", b / "config.json"),
    "config.json is empty": lambda b: (b / "config.json").write_text(""),
    "config.json dangles": lambda b: os.symlink("/nonexistent", b / "config.json"),
    "rootfs is a file": lambda b: ((b / "config.json").write_text(json.dumps(fuzzgen.MINIMAL)),
                                   (b / "rootfs").write_text("")),
    "rootfs dangles": lambda b: ((b / "config.json").write_text(json.dumps(fuzzgen.MINIMAL)),
                                 os.symlink("/nonexistent", b / "rootfs")),
    "rootfs is a symlink loop": lambda b: ((b / "config.json").write_text(json.dumps(fuzzgen.MINIMAL)),
                                           os.symlink("rootfs", b / "rootfs")),
}


@pytest.mark.parametrize("name", list(ODD_BUNDLES))
def test_odd_bundles_give_one_line_errors(tmp_path, name):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    ODD_BUNDLES[name](bundle)
    with pytest.raises(fuzzgen.PyrunvError) as error:
        fuzzgen.plan_mod.make(fuzzgen.spec_mod.load(str(bundle)), fuzzgen.config_mod.Config())
    assert fuzzgen.one_line(error.value.message), error.value.message


def valid_sample(tmp_path) -> list:
    """Valid generated configs, the same ones every run: the first SAMPLE_SIZE by hash of a fixed pool."""
    bundle = fuzzgen.make_fuzz_bundle(tmp_path / "pool")
    valid = {}

    @settings(FUZZ, max_examples=SAMPLE_POOL)
    @given(document=fuzzgen.config_documents())
    def collect(document):
        text = json.dumps(document).encode()
        if fuzzgen.check_config(bundle, text)[0] == "plan":
            valid[hashlib.sha256(text).hexdigest()] = document
    collect()
    return [valid[key] for key in sorted(valid)[:SAMPLE_SIZE]]


@pytest.mark.vm
@pytest.mark.slow
def test_a_sample_of_valid_fuzzed_configs_runs_through_the_real_cli(runtime, bundle, tmp_path, capsys):
    sample = valid_sample(tmp_path)
    assert len(sample) == SAMPLE_SIZE
    outcomes = []
    for n, document in enumerate(sample):
        path = bundle("true")
        (path / "src").mkdir()
        (path / "config.json").write_text(json.dumps(fuzzgen.for_a_real_vm(document)))
        result = runtime("run", "--bundle", path, f"fuzz{n}", timeout=240)
        err = result.stderr.decode(errors="replace")
        assert "Traceback" not in err, err
        if result.returncode == 0:
            assert result.stdout == b"fuzz-ok\n", (result.stdout, err)
            outcomes.append("ran")
        elif err.startswith("pyrunv: "):
            outcomes.append("error: " + one_line_error(result).removeprefix("pyrunv: ")[:100])
        else:  # the process itself failed (e.g. a generated rlimit): its own exit status and stderr
            outcomes.append(f"process exit {result.returncode}")
        assert runtime.leftovers() == [], runtime.leftovers()
        shutil.rmtree(path)
    report(capsys, "fuzz sample through `pyrunv run`: " + "; ".join(outcomes))


# What the fuzzing found, kept as plain regression cases (each was a traceback or a two-line error).
FOUND_ARGV = [
    ("missing", ["kill", "ghost", "²"]),            # str.isdigit() but not int(): ValueError
    ("missing", ["kill", "ghost", "NO\nPE"]),       # the signal text, unescaped, made two lines
    ("stopped", ["start", "fake\n"]),               # Python's $ matched before the newline: a valid ID
    ("stopped", ["delete", "fake\n"]),
    ("file", ["list"]),                             # the quick path did not catch OSError
    ("file", ["state", "fake"]),
    ("missing", ["create", "--bundle", "a\nb", "x"]),  # the bundle path, unescaped, made two lines
    ("missing", ["create", "", "x\ny"]),             # click's own message quotes the argument as it is
]


@pytest.mark.parametrize("entry", ["cli.main", "launch.main"])
@pytest.mark.parametrize("kind,argv", FOUND_ARGV, ids=[repr(a) for _, a in FOUND_ARGV])
def test_command_lines_the_fuzzing_found(tmp_path, entry, kind, argv):
    root = str(tmp_path / "root")
    fuzzgen.prepare_root(root, kind)
    code, _, err = fuzzgen.run_cli(["--root", root] + argv, {"cli.main": cli.main, "launch.main": launch.main}[entry])
    assert code == 1
    fuzzgen.check_cli_result(code, err)
    fuzzgen.check_root_after(root, kind)


FOUND_CONFIGS = {
    "surrogate in cwd": {"process": {"args": ["sh"], "cwd": "/\ud800"}},     # UnicodeEncodeError in plan
    "surrogate in hostname": {"hostname": "\udcff"},
    "surrogate in a sysctl": {"linux": {"sysctl": {"kernel.x": "\ud800"}}},
    "an unknown capability set": {"process": {"args": ["sh"], "cwd": "/", "capabilities": {"k": 1}}},  # TypeError
    "a newline in a key": {"annotations": {"\n": 0}},                      # the field path made two lines
    "huge cpu quota": {"linux": {"resources": {"cpu": {"quota": 10 ** 400, "period": 1}}}},  # OverflowError
    "huge memory limit": {"linux": {"resources": {"memory": {"limit": 10 ** 400}}}},
}


@pytest.mark.parametrize("name", list(FOUND_CONFIGS))
def test_configs_the_fuzzing_found(tmp_path, name):
    bundle = fuzzgen.make_fuzz_bundle(tmp_path / "bundle")
    document = dict(fuzzgen.MINIMAL, **FOUND_CONFIGS[name])
    outcome, result = fuzzgen.check_config(bundle, json.dumps(document).encode())
    if name == "an unknown capability set":
        assert outcome == "plan", result  # ignored, like every field pyrunv does not read
    else:
        assert outcome == "error" and len(str(result)) < 200, result  # a limit beyond int64 is absurd: one short line


def test_deeply_nested_json_is_a_one_line_error(tmp_path):
    bundle = fuzzgen.make_fuzz_bundle(tmp_path / "bundle")
    outcome, message = fuzzgen.check_config(bundle, b"[" * 100000 + b"]" * 100000)  # RecursionError
    assert outcome == "error" and "not JSON" in message


@pytest.mark.vm
def test_oom_score_adj_without_a_proc_mount(runtime, bundle):
    """Found by the sample above: oomScoreAdj was written through the container's own /proc, after
    pivot_root, so a config that mounts no /proc failed to create (runc writes it from outside)."""
    def edit(config):
        config["mounts"] = []
        config["process"]["oomScoreAdj"] = 500
        del config["process"]["capabilities"]  # to mount /proc and look
    script = "mkdir /proc && mount -t proc proc /proc && cat /proc/self/oom_score_adj"
    result = runtime("run", "--bundle", bundle("sh", "-c", script, edit=edit), "oom")
    assert (result.returncode, result.stdout) == (0, b"500\n"), result.stderr
    assert runtime.leftovers() == []
