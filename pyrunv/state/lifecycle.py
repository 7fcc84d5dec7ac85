"""The container lifecycle as an explicit state machine: every allowed transition is listed here."""
from ..errors import PyrunvError


class Status(str):
    """A container's state: one of the five constants below, which Status(text) looks up. Not an enum.Enum:
    `state` is the verb engines call most, and enum (with functools and collections) costs it ~5 ms."""
    __slots__ = ()
    CREATING: "Status"
    CREATED: "Status"
    RUNNING: "Status"
    PAUSED: "Status"
    STOPPED: "Status"

    def __new__(cls, value: str) -> "Status":
        for status in STATUSES:
            if status == value:
                return status
        raise ValueError(f"{value!r} is not a container state")

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Status.{self.upper()}"


STATUSES = tuple(str.__new__(Status, name) for name in ("creating", "created", "running", "paused", "stopped"))
Status.CREATING, Status.CREATED, Status.RUNNING, Status.PAUSED, Status.STOPPED = STATUSES
S = Status
# verb -> (states it may act on, state it leaves behind; None = unchanged or derived)
TRANSITIONS: dict[str, tuple[frozenset[Status], Status | None]] = {
    "start": (frozenset({S.CREATED}), S.RUNNING),
    "pause": (frozenset({S.RUNNING}), S.PAUSED),
    "resume": (frozenset({S.PAUSED}), S.RUNNING),
    "kill": (frozenset({S.CREATED, S.RUNNING, S.PAUSED}), None),
    # runc 1.1 signals whatever is left of the container: of a stopped one, nothing, and that is no error.
    "kill --all": (frozenset(STATUSES) - {S.CREATING}, None),
    "exec": (frozenset({S.CREATED, S.RUNNING}), None),
    "update": (frozenset({S.CREATED, S.RUNNING, S.PAUSED}), None),
    "checkpoint": (frozenset({S.RUNNING, S.PAUSED}), None),  # runc: CRIU dumps a frozen container too
    # A frozen VM cannot answer: ps and events need it running (or created).
    "ps": (frozenset({S.CREATED, S.RUNNING}), None),
    "events": (frozenset({S.CREATED, S.RUNNING}), None),
    "delete": (frozenset({S.CREATED, S.STOPPED}), None),
    "delete --force": (frozenset(STATUSES), None),
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
