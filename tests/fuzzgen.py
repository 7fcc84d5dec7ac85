"""Generators and checks for the fuzz tests (tests/test_fuzz.py) and the soak (tools/soak.py).

- config.json documents: from pyrunv/oci/schema.json (hypothesis-jsonschema where it works with the
  installed hypothesis, and always a small schema walker of our own), then mutated: wrong types,
  missing and extra fields, huge numbers, odd paths and strings (newlines, NULs, surrogates, unicode),
  and raw text that is not quite JSON.
- command lines: random verbs, flags, IDs, signals and durations, against a --root that is missing,
  empty, a regular file, or holds a stopped container.

A config case must end in a valid plan or a PyrunvError whose message is one line; a command line in
exit 0 with nothing on stderr, or a non-zero exit with one 'pyrunv: ' line on stderr. Anything else
(a traceback) fails."""
import contextlib
import copy
import io
import json
import os
import shutil
import sys

from hypothesis import strategies as st

from pyrunv import config as config_mod
from pyrunv.vm import plan as plan_mod
from pyrunv.oci import spec as spec_mod
from pyrunv.state import store as state
from pyrunv.errors import PyrunvError

SCHEMA_PATH = os.path.join(os.path.dirname(spec_mod.__file__), "schema.json")
with open(SCHEMA_PATH) as _f:
    SCHEMA = json.load(_f)

# --- config.json documents --------------------------------------------------------------------

ODD_STRINGS = ["", " ", "\n", "a\nb", "\r\n", "\x00", "a\x00b", "..", "../..", "/", "//", "/../../etc/shadow",
               "/proc/self/root", "/proc/1/root/..", "\t", "a\tb", "\u2028", "\ud800", "\udcff", "é", "\U0001d518",
               "\ufeff", "x" * 5000, "/" + "a/" * 3000, "%s%n", "${HOME}", "-", "--help", "rootfs/../..",
               "CAP_SYS_ADMIN", "RLIMIT_NOFILE", "network", "9" * 5000, "1", "-1", "0x10", "1e3", "true", "null"]
ODD_NUMBERS = [0, -1, 1, 2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64, -2 ** 63, 2 ** 64 + 1, 10 ** 30, 10 ** 400, -10 ** 400,
               0.5, float("nan"), float("inf"), -float("inf"), -0.0, 1e308, True, False]
HUGE = [2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 30, 10 ** 400, -10 ** 400, -2 ** 63]
PYRUNV_ANNOTATIONS = [config_mod.ANNOTATION_PREFIX + k for k in
                      ("memory_mib", "vcpus", "kernel_params", "machine", "accel", "kernel", "nope")]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


def _nested(depth: int):
    value = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


odd_values = st.one_of(
    st.sampled_from(ODD_STRINGS), st.sampled_from(ODD_NUMBERS), st.none(), st.just([]), st.just({}),
    st.integers(1, 400).map(_nested), st.text(max_size=30), st.integers(), json_values)


_chars = st.characters(exclude_characters="\x00")
_text = st.text(_chars, max_size=20) | st.text(  # and now and then lone surrogates, which JSON can carry
    st.characters(categories=["Cs", "Cc", "Lu", "Ll", "Nd", "Zs", "Zl", "So"], exclude_characters="\x00"),
    min_size=1, max_size=4)
# Fast stand-ins for the schema's patterns (st.from_regex is slow): each still satisfies its pattern,
# and a share of raw from_regex output is mixed in for the patterns where it finds different strings.
PATTERNS = {
    "^/": st.sampled_from(["/", "/tmp", "/data", "/a/../b", "/dev/null", "/proc/sys/x", "/etc/hostname"])
    | _text.map(lambda s: "/" + s),
    r"^1\.": st.sampled_from(["1.0.2", "1.0.0", "1.1.0", "1."]) | _text.map(lambda s: "1." + s),
    r"^[^\u0000]*$": st.sampled_from(["sh", "true", "", "-c", "echo hi"]) | _text,
    r"^[^=\u0000]+=[^\u0000]*$": st.builds(lambda k, v: f"{k}={v}", st.text(
        st.characters(exclude_characters="\x00="), min_size=1, max_size=10), _text),
    r"^[^\u0000/]*$": st.text(st.characters(exclude_characters="\x00/"), max_size=20),
    "^CAP_[A-Z_]+$": st.sampled_from(sorted(spec_mod.CAPABILITIES)) | st.from_regex("^CAP_[A-Z_]+$"),
    "^RLIMIT_[A-Z]+$": st.sampled_from(sorted(spec_mod.RLIMITS)) | st.from_regex("^RLIMIT_[A-Z]+$"),
}


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        node = SCHEMA
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def from_schema(schema: dict = SCHEMA):
    """Documents that satisfy `schema` (the subset of JSON Schema that oci/schema.json uses)."""
    schema = _resolve(schema)
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        required = {k: from_schema(props.get(k, {})) for k in schema.get("required", [])}
        optional = {k: from_schema(v) for k, v in props.items() if k not in required}
        base = st.fixed_dictionaries(required, optional=optional)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            pattern = schema.get("propertyNames", {}).get("pattern")
            keys = st.from_regex(pattern, fullmatch=True) if pattern else st.text(max_size=30)
            return st.tuples(base, st.dictionaries(keys, from_schema(extra), max_size=4)).map(
                lambda t: {**t[1], **t[0]})
        return base
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=max(schema.get("minItems", 0), min(schema.get("maxItems", 3), 3)))
    if kind == "string":
        pattern = schema.get("pattern")
        low, high = schema.get("minLength", 0), schema.get("maxLength", 1 << 30)
        if pattern in PATTERNS:
            strings = PATTERNS[pattern]
        else:
            strings = st.from_regex(pattern) if pattern else st.text(min_size=low, max_size=min(high, 40))
        return strings.filter(lambda s: low <= len(s) <= high)
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        if high is None:  # JSON integers have no bound: neither may the code that does sums with them
            return st.integers(low, high) | st.sampled_from([n for n in HUGE if low is None or n >= low])
        return st.integers(low, high)
    if kind == "boolean":
        return st.booleans()
    return json_values


def _jsonschema_strategy():
    """hypothesis-jsonschema's from_schema, if it installs and works with this hypothesis (0.23.1 does not
    with hypothesis 6.170: 'many' object has no attribute 'more'); else None."""
    try:
        from hypothesis import HealthCheck, given, settings
        from hypothesis_jsonschema import from_schema as hjs_from_schema
        strategy = hjs_from_schema(SCHEMA)

        @settings(max_examples=3, database=None, deadline=None, suppress_health_check=list(HealthCheck))
        @given(strategy)
        def probe(document):
            pass
        probe()
        return strategy
    except Exception:
        return None


HJS = _jsonschema_strategy()
schema_documents = from_schema() if HJS is None else st.one_of(from_schema(), HJS)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, prefix + (index,))


def _get(value, path):
    for part in path:
        value = value[part]
    return value


@st.composite
def mutated(draw, document):
    """One mutation: a value of the wrong kind, a field removed, an extra field, or an odd string."""
    document = copy.deepcopy(document)
    paths = list(_paths(document))
    path = draw(st.sampled_from(paths))
    kind = draw(st.sampled_from(["replace"] * 8 + ["delete"] * 4 + ["extra"] * 4 + ["top"]))
    if kind == "top":
        return draw(odd_values)
    if not path:
        return document
    parent, key = _get(document, path[:-1]), path[-1]
    if kind == "replace":
        parent[key] = draw(odd_values)
    elif kind == "delete":
        del parent[key]
    else:
        target = _get(document, path)
        if isinstance(target, dict):
            target[draw(st.sampled_from(ODD_STRINGS) | st.text(max_size=10))] = draw(odd_values)
        elif isinstance(target, list):
            target.append(draw(odd_values))
        else:
            parent[key] = draw(odd_values)
    return document


@st.composite
def config_documents(draw):
    """Schema documents, nudged towards loading (a real rootfs, args), with pyrunv annotations, mutated."""
    document = draw(schema_documents)
    if isinstance(document.get("root"), dict):  # mutations below still put odd paths here
        document["root"]["path"] = "rootfs"
    process = document.get("process")
    if isinstance(process, dict) and "args" not in process:
        process["args"] = ["sh"]
    for mount in document.get("mounts", []):
        if draw(st.integers(0, 2)) == 0:
            mount.update(type="bind", source=draw(st.sampled_from(["src", "", "rootfs", "missing", "/nonexistent"])))
    if draw(st.integers(0, 3)) == 0:
        document["annotations"] = dict(document.get("annotations", {}), **draw(st.dictionaries(
            st.sampled_from(PYRUNV_ANNOTATIONS),
            st.sampled_from(ODD_STRINGS) | st.integers(-5, 70000).map(str) | st.sampled_from(
                ["kvm", "tcg", "auto", "q35", "microvm", "2", "64", "256", "quiet"]), max_size=3)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        document = draw(mutated(document))
    return document


MINIMAL = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"args": ["sh"], "cwd": "/"}}


@st.composite
def raw_texts(draw):
    """config.json bytes that are not a plain document: broken, deep, odd encodings and literals."""
    text = json.dumps(draw(config_documents()))
    depth = draw(st.sampled_from([10, 500, 900, 990, 1000, 1100, 5000, 100000]))
    minimal = json.dumps(MINIMAL)[:-1]
    choices = [
        b"",
        text[:draw(st.integers(0, max(0, len(text) - 1)))].encode(),
        b"\xff\xfe" + text.encode(),
        ("\ufeff" + text).encode(),
        b"[" * depth + b"]" * depth,
        (minimal + ', "annotations": ' + '{"a": ' * depth + "1" + "}" * depth + "}").encode(),
        (minimal + ', "mounts": ' + "[" * depth + "]" * depth + "}").encode(),
        b'{"ociVersion": NaN, "root": Infinity, "process": -Infinity}',
        (minimal + ', "linux": {"resources": {"memory": {"limit": ' + "9" * draw(st.sampled_from([20, 400, 5000]))
         + "}}}}").encode(),
        (minimal + ', "linux": {"resources": {"cpu": {"quota": 1e999, "period": 1}}}}').encode(),
        (minimal + ', "process": {"args": ["a"], "cwd": "/"}, "process": 1}').encode(),
        draw(st.binary(max_size=64)),
        draw(st.sampled_from([b"null", b"[]", b"1", b'"x"', b"true", b"{}", b"{", b"}", b"\x00"])),
    ]
    return draw(st.sampled_from(choices))


@st.composite
def config_texts(draw):
    if draw(st.integers(0, 7)) == 0:
        return draw(raw_texts())
    return json.dumps(draw(config_documents())).encode()


def make_fuzz_bundle(path) -> str:
    """A bundle directory for in-process loading: an empty rootfs, and 'src' for relative bind sources."""
    os.makedirs(os.path.join(path, "rootfs"), exist_ok=True)
    os.makedirs(os.path.join(path, "src"), exist_ok=True)
    return str(path)


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "\r" not in message


def check_config(bundle: str, text: bytes):
    """Loads and plans one config.json: ('plan', VmPlan) or ('error', message); raises on anything else."""
    with open(os.path.join(bundle, "config.json"), "wb") as f:
        f.write(text)
    try:
        plan = plan_mod.make(spec_mod.load(bundle), config_mod.Config())
    except PyrunvError as e:
        assert one_line(e.message), f"error message is not one line: {e.message!r}"
        return "error", e.message
    assert isinstance(plan, plan_mod.VmPlan)
    return "plan", plan


def for_a_real_vm(document: dict) -> dict:
    """A valid generated config made safe to run on this host: no hooks (they run host programs), bind
    sources inside the bundle, VM-size and accelerator annotations dropped, a small memory limit, and a
    process whose success is visible. Everything else (env, cwd, user, rlimits, caps, mounts, masked and
    read-only paths, sysctls, hostname...) is kept as generated."""
    document = copy.deepcopy(document)
    document.pop("hooks", None)
    document["root"]["path"] = "rootfs"
    document["process"].update(args=["sh", "-c", "echo fuzz-ok"], terminal=False)
    for mount in document.get("mounts", []):
        if mount.get("type") == "bind" or {"bind", "rbind"} & set(mount.get("options", [])):
            mount["source"] = "src"
    document["annotations"] = {k: v for k, v in document.get("annotations", {}).items()
                               if not k.startswith(config_mod.ANNOTATION_PREFIX)}
    resources = document.get("linux", {}).get("resources", {})
    if resources.get("memory", {}).get("limit", 0) > 512 << 20:
        del resources["memory"]["limit"]
    cpu = resources.get("cpu", {})
    if cpu.get("quota", 0) > 0 and cpu.get("period", 0) > 0 and cpu["quota"] > 2 * cpu["period"]:
        del cpu["quota"]
    return document


# --- command lines ----------------------------------------------------------------------------

VERBS = ["create", "start", "state", "kill", "delete", "pause", "resume", "ps", "exec", "events", "list"]
ODD_IDS = ["fake", "ghost", "", ".", "..", "../x", "a/b", "x\ny", "-", "--", "-x", "x" * 1025, "\x00", "é", "\udcff",
           "a b", "*", "fake/", "./fake", "FAKE", "fake\n"]
ODD_SIGNALS = ["0", "-1", "65", "64", "1", "9", "99999999999999999999", "KILL", "SIGKILL", "sigterm", "SIG", "SIGSIG",
               "²", "\u0661", "NO\nPE", "", " 9", "9 ", "SIGRTMIN", "RTMIN+1", "\x00", "SIG_DFL", "Signals", "kIlL"]
DURATIONS = ["5s", "0s", "-1s", "1e309s", "nans", "infs", "1", "ms", "0.0001ms", "1\n", "h", "1h", "5 s", "s5"]
FORMATS = ["json", "table", "", "JSON", "x\ny"]
USERS = ["0", "0:0", "a:b", "1:", ":", "-1", "99999999999999999999", "\n"]
INTS = ["0", "1", "-1", "x", "99999999999999999999999", ""]
texts = st.text(max_size=12)


def verb_options(paths: dict) -> dict:
    path = st.sampled_from(sorted(paths.values()) + ["", "\n", "/", "/dev/null", "relative/missing"])
    return {
        "create": [("-b", path), ("--bundle", path), ("--pid-file", path), ("--console-socket", path),
                   ("--no-pivot",), ("--no-new-keyring",), ("--preserve-fds", st.sampled_from(INTS))],
        "kill": [("-a",), ("--all",)],
        "delete": [("-f",), ("--force",)],
        "ps": [("-f", st.sampled_from(FORMATS)), ("--format", st.sampled_from(FORMATS))],
        "exec": [("--console-socket", path), ("--cwd", path), ("-e", texts), ("--env", texts), ("-t",), ("--tty",),
                 ("-u", st.sampled_from(USERS) | texts), ("-g", st.sampled_from(INTS)), ("-p", path),
                 ("--process", path), ("-d",), ("--detach",), ("--pid-file", path), ("--no-new-privs",),
                 ("-c", texts), ("--cap", texts), ("--cgroup", texts), ("--ignore-paused",)],
        "events": [("--stats",), ("--interval", st.sampled_from(DURATIONS) | texts)],
        "list": [("-f", st.sampled_from(FORMATS)), ("--format", st.sampled_from(FORMATS)), ("-q",), ("--quiet",)],
    }


@st.composite
def command_lines(draw, root: str, paths: dict):
    """argv[1:] for pyrunv: --root first, then odd global options, a verb, its flags and arguments."""
    ids = st.sampled_from(ODD_IDS) | texts
    globals_ = draw(st.lists(st.sampled_from([
        ("--log-format", st.sampled_from(["json", "text", "xml"])), ("--systemd-cgroup",),
        ("--criu", texts), ("--rootless", texts), ("--log", st.just(paths["log"])), ("--nope",)]), max_size=2))
    verb = draw(st.sampled_from(VERBS * 4 + ["bogus", "", "help", "--help", "-v", "spec-not"]))
    options = draw(st.lists(st.sampled_from(verb_options(paths).get(verb, [("--bogus",)])), max_size=4))
    positional = {"list": []}.get(verb, [draw(ids)])
    if verb == "kill" and draw(st.integers(0, 3)):
        odd = st.sampled_from(ODD_SIGNALS)
        positional.append(draw(st.one_of(odd, odd, odd, st.integers(-5, 70).map(str), texts)))
    if verb in ("exec", "ps"):
        positional += draw(st.lists(texts, max_size=3))
    if draw(st.integers(0, 9)) == 0:
        positional = positional[:-1] if draw(st.booleans()) else positional + draw(st.lists(texts, max_size=2))
    words = [[name] + ([draw(value[0])] if value else []) for name, *value in options] + [[p] for p in positional]
    if verb not in ("exec", "ps"):  # these take their options before the container ID only
        words = draw(st.permutations(words))
    argv = ["--root", root]
    for name, *value in globals_:
        argv += [name] + ([draw(value[0])] if value else [])
    return argv + ([verb] if verb else []) + [w for word in words for w in word]


ROOT_KINDS = ("missing", "empty", "file", "stopped")


def prepare_root(root: str, kind: str) -> None:
    """A --root that is missing, an empty directory, a regular file, or holds a stopped container 'fake'."""
    if os.path.isdir(root) and not os.path.islink(root):
        shutil.rmtree(root)
    elif os.path.lexists(root):
        os.unlink(root)
    if kind == "empty":
        os.mkdir(root, 0o700)
    elif kind == "file":
        with open(root, "w") as f:
            f.write("not a directory\n")
    elif kind == "stopped":
        with state.Store(root).create(state.Record(
                id="fake", bundle="/nonexistent-bundle", rootfs="/nonexistent-bundle/rootfs", status="running",
                pid=2 ** 22 + 1, pid_start=1, created="2024-01-01T00:00:00Z", owner="root")):
            pass


def check_root_after(root: str, kind: str) -> None:
    """Nothing new in --root: a command line without a valid bundle creates and leaves nothing."""
    if kind == "missing":
        assert not os.path.lexists(root) or (os.path.isdir(root) and os.listdir(root) == []), os.listdir(root)
    elif kind == "empty":
        assert os.listdir(root) == []
    elif kind == "file":
        with open(root) as f:
            assert f.read() == "not a directory\n"
    else:
        left = os.listdir(root)
        assert left in ([], ["fake"]), left
        if left:
            assert sorted(os.listdir(os.path.join(root, "fake"))) == ["state.json"]


def run_cli(argv: list, entry) -> tuple:
    """Runs pyrunv in this process as `pyrunv ARGV...`: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["pyrunv"] + argv
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                entry()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


def check_cli_result(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    if code:
        assert err.startswith("pyrunv: ") and err.endswith("\n") and err.count("\n") == 1, \
            f"exit {code} without one 'pyrunv: ' line on stderr: {err!r}"
    else:
        assert err == "", f"exit 0 with stderr {err!r}"


def cli_paths(base: str) -> dict:
    """Paths that command lines may name: none of them is a bundle that could boot a VM."""
    paths = {"missing": os.path.join(base, "missing"), "log": os.path.join(base, "fuzz.log"),
             "invalid": os.path.join(base, "invalid-bundle"), "plainfile": os.path.join(base, "plain.txt"),
             "emptydir": os.path.join(base, "emptydir")}
    os.makedirs(os.path.join(paths["invalid"], "rootfs"), exist_ok=True)
    with open(os.path.join(paths["invalid"], "config.json"), "w") as f:
        json.dump({"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"cwd": "relative"}}, f)
    with open(paths["plainfile"], "w") as f:
        f.write("{}")
    os.makedirs(paths["emptydir"], exist_ok=True)
    return paths
