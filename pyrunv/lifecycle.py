"""The container lifecycle as an explicit state machine: every allowed transition is listed here."""
import enum

from .errors import PyrunvError


class Status(str, enum.Enum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


S = Status
# verb -> (states it may act on, state it leaves behind; None = unchanged or derived)
TRANSITIONS: dict[str, tuple[frozenset[Status], Status | None]] = {
    "start": (frozenset({S.CREATED}), S.RUNNING),
    "pause": (frozenset({S.RUNNING}), S.PAUSED),
    "resume": (frozenset({S.PAUSED}), S.RUNNING),
    "kill": (frozenset({S.CREATED, S.RUNNING, S.PAUSED}), None),
    "exec": (frozenset({S.CREATED, S.RUNNING}), None),
    "update": (frozenset({S.CREATED, S.RUNNING, S.PAUSED}), None),
    "checkpoint": (frozenset({S.RUNNING, S.PAUSED}), None),  # runc: CRIU dumps a frozen container too
    # A frozen VM cannot answer: ps and events need it running (or created).
    "ps": (frozenset({S.CREATED, S.RUNNING}), None),
    "events": (frozenset({S.CREATED, S.RUNNING}), None),
    "delete": (frozenset({S.CREATED, S.STOPPED}), None),
    "delete --force": (frozenset(Status), None),
}


def check(verb: str, container_id: str, status: Status) -> Status | None:
    """Raises the user's error if `verb` may not act on a container in `status`; returns the next status."""
    allowed, after = TRANSITIONS[verb]
    if status not in allowed:
        if verb == "kill" and status is S.STOPPED:
            raise PyrunvError("container not running")
        if verb == "delete":
            raise PyrunvError(f"cannot delete container {container_id} that is not stopped: {status.value}")
        raise PyrunvError(f"cannot {verb} container {container_id} in state {status.value}; "
                          f"it must be {' or '.join(sorted(s.value for s in allowed))}")
    return after
