"""The lifecycle table: every verb against every state, as runc allows or refuses it."""
import pytest

from pyrunv.state import lifecycle
from pyrunv.errors import PyrunvError
from pyrunv.state.lifecycle import STATUSES, Status

S = Status
# Written out independently of lifecycle.TRANSITIONS, from runc's behaviour: verb -> {allowed state: next state}
EXPECTED = {
    "start": {S.CREATED: S.RUNNING},
    "pause": {S.RUNNING: S.PAUSED},
    "resume": {S.PAUSED: S.RUNNING},
    "kill": {S.CREATED: None, S.RUNNING: None, S.PAUSED: None},
    "kill --all": {S.CREATED: None, S.RUNNING: None, S.PAUSED: None, S.STOPPED: None},  # runc 1.1: a stopped one too
    "exec": {S.CREATED: None, S.RUNNING: None},
    "update": {S.CREATED: None, S.RUNNING: None, S.PAUSED: None},
    "checkpoint": {S.RUNNING: None, S.PAUSED: None},  # runc: "container not running" when stopped
    "ps": {S.CREATED: None, S.RUNNING: None},  # a frozen VM cannot answer
    "events": {S.CREATED: None, S.RUNNING: None},
    "delete": {S.CREATED: None, S.STOPPED: None},
    "delete --force": {status: None for status in STATUSES},
}
CASES = [(verb, status) for verb in EXPECTED for status in STATUSES]


def test_the_table_has_exactly_the_expected_verbs():
    assert set(lifecycle.TRANSITIONS) == set(EXPECTED)


@pytest.mark.parametrize("verb,status", [c for c in CASES if c[1] in EXPECTED[c[0]]])
def test_allowed_verbs_return_the_next_status(verb, status):
    assert lifecycle.check(verb, "c1", status) is EXPECTED[verb][status]


@pytest.mark.parametrize("verb,status", [c for c in CASES if c[1] not in EXPECTED[c[0]]])
def test_refused_verbs_raise_a_one_line_error(verb, status):
    with pytest.raises(PyrunvError) as refused:
        lifecycle.check(verb, "c1", status)
    message = str(refused.value)
    assert "\n" not in message and refused.value.exit_code == 1
    if verb == "kill" and status is S.STOPPED:
        # runc's exact words: containerd's shim matches on them to treat the kill as already done.
        assert message == "container not running"
    else:
        assert "c1" in message and status.value in message


@pytest.mark.parametrize("status", [S.CREATING, S.RUNNING, S.PAUSED])
def test_delete_of_a_live_container_says_not_stopped(status):
    with pytest.raises(PyrunvError, match=f"^cannot delete container c1 that is not stopped: {status.value}$"):
        lifecycle.check("delete", "c1", status)


def test_a_refusal_names_the_states_the_verb_needs():
    with pytest.raises(PyrunvError, match="^cannot pause container c1 in state created; it must be running$"):
        lifecycle.check("pause", "c1", S.CREATED)


def test_a_status_is_its_text_and_looked_up_by_it():
    assert [Status(s.value) for s in STATUSES] == list(STATUSES)
    assert Status("running") is Status.RUNNING and Status.RUNNING == "running"
    assert Status.PAUSED.value == "paused" and f"{Status.PAUSED}" == "paused"
    with pytest.raises(ValueError):
        Status("sleeping")
