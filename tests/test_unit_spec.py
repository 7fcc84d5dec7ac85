"""config.json validation: what loads, and one-line errors that name the offending field."""
import copy
import json
import re

import pytest

from pyrunv.oci import spec
from pyrunv.errors import PyrunvError

MINIMAL = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"args": ["sh"], "cwd": "/"}}


def write_bundle(path, document, rootfs=True):
    path.mkdir(exist_ok=True)
    if rootfs:
        (path / "rootfs").mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


def edited(edit):
    document = copy.deepcopy(MINIMAL)
    edit(document)
    return document


def test_a_minimal_config_loads_with_defaults(tmp_path):
    loaded = spec.load(str(write_bundle(tmp_path, MINIMAL)))
    assert loaded.bundle == str(tmp_path) and loaded.rootfs == str(tmp_path / "rootfs")
    assert loaded.process.args == ("sh",) and loaded.process.cwd == "/"
    assert (loaded.process.uid, loaded.process.gid, loaded.process.capabilities) == (0, 0, None)
    assert (loaded.root_readonly, loaded.mounts, loaded.resources.memory_limit) == (False, (), 0)


def test_a_full_config_is_read_field_for_field(tmp_path):
    (tmp_path / "data").mkdir()
    document = edited(lambda d: (
        d["process"].update(env=["A=1"], user={"uid": 1000, "gid": 100, "additionalGids": [5], "umask": 0o22},
                            terminal=True, consoleSize={"height": 24, "width": 80}, noNewPrivileges=True,
                            capabilities={"bounding": ["CAP_KILL"], "effective": ["CAP_CHOWN"]},
                            rlimits=[{"type": "RLIMIT_NOFILE", "soft": 512, "hard": 1024}], oomScoreAdj=100),
        d["root"].update(readonly=True),
        d.update(hostname="box", annotations={"a": "b"},
                 mounts=[{"destination": "/data", "type": "bind", "source": "data", "options": ["rbind", "ro"]},
                         {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}],
                 linux={"resources": {"memory": {"limit": 1 << 28}, "cpu": {"quota": 150000, "period": 100000}},
                        "sysctl": {"net.ipv4.ip_forward": "1"}, "maskedPaths": ["/proc/kcore"]})))
    loaded = spec.load(str(write_bundle(tmp_path, document)))
    p = loaded.process
    assert (p.env, p.uid, p.gid, p.additional_gids, p.umask) == (("A=1",), 1000, 100, (5,), 0o22)
    assert (p.terminal, p.console_size, p.no_new_privileges, p.oom_score_adj) == (True, (24, 80), True, 100)
    assert p.capabilities == {"bounding": ("CAP_KILL",), "effective": ("CAP_CHOWN",), "permitted": (),
                              "inheritable": (), "ambient": ()}
    assert p.rlimits == (("RLIMIT_NOFILE", 512, 1024),)
    assert (loaded.root_readonly, loaded.hostname, loaded.annotations) == (True, "box", {"a": "b"})
    # A bind source is resolved against the bundle; other sources are kept as they are.
    assert [(m.destination, m.source) for m in loaded.mounts] == [("/data", str(tmp_path / "data")), ("/tmp", "tmpfs")]
    limits = loaded.resources
    assert (limits.memory_limit, limits.cpu_quota, limits.cpu_period) == (1 << 28, 150000, 100000)
    assert loaded.sysctl == (("net.ipv4.ip_forward", "1"),) and loaded.masked_paths == ("/proc/kcore",)


def test_a_memory_limit_of_minus_one_means_no_limit(tmp_path):
    document = edited(lambda d: d.update(linux={"resources": {"memory": {"limit": -1}}}))
    assert spec.load(str(write_bundle(tmp_path, document))).resources.memory_limit == 0


@pytest.mark.parametrize("resources, message", [
    ({"memory": {"limit": -5}}, "invalid linux.resources.memory.limit: -5 is not a limit"),
    ({"pids": {"limit": -2}}, "invalid linux.resources.pids.limit: -2 is not a limit"),
    ({"memory": {"limit": 1000}}, "invalid linux.resources.memory.limit: 1000 is below the 4 MiB a process needs"),
    ({"cpu": {"period": 10}}, "invalid linux.resources.cpu.period: 10 is not between 1000 and 1000000"),
])
def test_a_negative_or_absurd_limit_is_one_line(tmp_path, resources, message):
    document = edited(lambda d: d.update(linux={"resources": resources}))
    with pytest.raises(PyrunvError, match="^" + re.escape(message)):
        spec.load(str(write_bundle(tmp_path, document)))


# name -> (edit of MINIMAL, what the message must contain)
INVALID = {
    "args not a list": (lambda d: d["process"].update(args="sh"), "process.args"),
    "args empty": (lambda d: d["process"].update(args=[]), "process.args"),
    "args missing": (lambda d: d["process"].pop("args"), "process.args"),
    "negative uid": (lambda d: d["process"].update(user={"uid": -1}), "process.user.uid"),
    "cwd relative": (lambda d: d["process"].update(cwd="tmp"), "process.cwd"),
    "env without =": (lambda d: d["process"].update(env=["A=1", "NOVALUE"]), "process.env.1"),
    "no process": (lambda d: d.pop("process"), "'process' is a required property"),
    "unknown capability": (lambda d: d["process"].update(capabilities={"bounding": ["CAP_NOPE"]}), "CAP_NOPE"),
    "unknown rlimit": (lambda d: d["process"].update(rlimits=[{"type": "RLIMIT_NOPE", "soft": 1, "hard": 1}]),
                       "RLIMIT_NOPE"),
    "soft above hard": (lambda d: d["process"].update(rlimits=[{"type": "RLIMIT_NOFILE", "soft": 2, "hard": 1}]),
                        "soft limit is above the hard limit"),
    "missing bind source": (lambda d: d.update(mounts=[{"destination": "/x", "type": "bind", "source": "nope"}]),
                            "does not exist"),
    "mount without type": (lambda d: d.update(mounts=[{"destination": "/x", "source": "tmpfs"}]), "no type"),
    "relative mount destination": (lambda d: d.update(mounts=[{"destination": "x", "type": "tmpfs"}]),
                                   "mounts.0.destination"),
    "long hostname": (lambda d: d.update(hostname="h" * 65), "hostname"),
    "unknown rootfs propagation": (lambda d: d.update(linux={"rootfsPropagation": "sideways"}), "rootfsPropagation"),
    # Python's '$' matches before a final newline, so these get past the schema's patterns.
    "capability with a newline": (lambda d: d["process"].update(capabilities={"bounding": ["CAP_KILL\n"]}),
                                  "unknown capability"),
    "rlimit with a newline": (lambda d: d["process"].update(rlimits=[{"type": "RLIMIT_NOFILE\n", "soft": 1,
                                                                      "hard": 1}]), "unknown rlimit"),
    "destination with a newline": (lambda d: d.update(mounts=[{"destination": "/x\n", "type": "bind",
                                                               "source": "nope"}]), "does not exist"),
}


@pytest.mark.parametrize("name", INVALID)
def test_invalid_configs_give_one_line_errors_naming_the_field(tmp_path, name):
    edit, expected = INVALID[name]
    with pytest.raises(PyrunvError) as refused:
        spec.load(str(write_bundle(tmp_path, edited(edit))))
    message = str(refused.value)
    assert message.startswith("invalid config.json: ") and expected in message
    assert "\n" not in message


def test_a_missing_rootfs_is_named(tmp_path):
    with pytest.raises(PyrunvError, match=f"^rootfs '{re.escape(str(tmp_path))}/rootfs' does not exist$"):
        spec.load(str(write_bundle(tmp_path, MINIMAL, rootfs=False)))


def test_a_missing_rootfs_with_a_newline_in_its_name_is_named_on_one_line(tmp_path):
    with pytest.raises(PyrunvError, match=r"^rootfs '.*/root\\nfs' does not exist$"):
        spec.load(str(write_bundle(tmp_path, edited(lambda d: d["root"].update(path="root\nfs")))))


def test_a_missing_config_is_named(tmp_path):
    with pytest.raises(PyrunvError, match="^config.json .* does not exist$"):
        spec.load(str(tmp_path))


@pytest.mark.parametrize("content", ["{not json", "", '{"a": 1,}'])
def test_a_config_that_is_not_json_says_so(tmp_path, content):
    with pytest.raises(PyrunvError, match="^invalid config.json: not JSON: ") as refused:
        spec.load(str(write_bundle(tmp_path, content)))
    assert "\n" not in str(refused.value)


def test_a_config_that_is_not_an_object_says_so(tmp_path):
    with pytest.raises(PyrunvError, match=r"^invalid config.json: \(top level\): .*not of type 'object'$"):
        spec.load(str(write_bundle(tmp_path, "[1]")))
