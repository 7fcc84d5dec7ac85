"""What a peer sends to `restore --listen` before QEMU's stream, fuzzed (hypothesis): the header and the
metadata become a plan of the bundle's shape, or one line, whatever the bytes; no VM."""
import json
import socket
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from pyrunv.errors import PyrunvError
from pyrunv.vm import plan as plan_mod
from pyrunv.vm import snapshot

FRESH = plan_mod.VmPlan(machine="microvm", accel="tcg", vcpus=1, memory_mib=160, kernel="/k", initrd="/i",
                        kernel_params="", shared=(plan_mod.SharedPath("/bundle/rootfs", "rootfs", False),),
                        init_records=b"root=rootfs\0", max_vcpus=2, max_memory_mib=4096)
VALID = snapshot.metadata("saved", plan_mod.to_json(FRESH))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
FUZZ = settings(max_examples=600, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@st.composite
def mutated(draw):
    """The valid metadata with one value somewhere in it replaced by any JSON value."""
    document = json.loads(json.dumps(VALID))
    node, key = document, "plan"
    while isinstance(node.get(key) if isinstance(node, dict) else None, dict) and draw(st.booleans()):
        node = node[key]
        key = draw(st.sampled_from(sorted(node)))
    node[key if isinstance(node, dict) else "plan"] = draw(JSON)
    return json.dumps(document).encode()


def framed(body: bytes, length: int | None = None) -> bytes:
    return snapshot.HEADER.pack(snapshot.STREAM_MAGIC, len(body) if length is None else length) + body


STREAMS = (st.binary(max_size=64)
           | mutated().map(framed)
           | st.builds(framed, st.binary(max_size=64), st.integers(0, 2 ** 32 - 1))
           | st.just(framed(json.dumps(VALID).encode())))


def received(data: bytes):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        try:
            return snapshot.from_stream(ours, "what 192.0.2.1 sent", "here", FRESH)
        except PyrunvError as e:
            return e


def test_any_stream_header_is_a_plan_of_the_bundles_shape_or_one_line():
    outcomes = {"plan": 0, "error": 0}

    @FUZZ
    @given(data=STREAMS)
    def case(data):
        result = received(data)
        if isinstance(result, PyrunvError):
            assert "\n" not in str(result) and str(result).startswith(("what 192.0.2.1 sent is not", "cannot restore"))
            outcomes["error"] += 1
        else:
            assert result.shared == FRESH.shared and type(result.memory_mib) is int
            outcomes["plan"] += 1
    case()
    assert outcomes["plan"] >= 1 and outcomes["error"] >= 300, outcomes


def test_a_length_beyond_the_metadatas_limit_is_refused_before_it_is_read():
    result = received(struct.pack("!8sI", snapshot.STREAM_MAGIC, snapshot.MAX_METADATA + 1) + b"{}")
    assert str(result) == "what 192.0.2.1 sent is not a pyrunv checkpoint"
