"""The quick path's reading of a command line: what it takes itself, and what it leaves to click."""
import pytest

from pyrunv.cli import quick


@pytest.mark.parametrize("argv, expected", [
    (["--root", "/r", "--log=/l", "--debug", "state", "c1"], ({"--root": "/r", "--log": "/l", "--debug": True},
                                                              "state", ["c1"])),
    (["--root"], None),                 # a value that is missing
    (["--help"], None),                 # not one of runc's global options
    (["--debug=yes", "state", "c1"], None),
])
def test_global_options_with_their_values(argv, expected):
    assert quick._split(argv) == expected


def test_run_flags_in_both_forms_and_the_id():
    found, container_id = quick._verb_flags(["-b", "/b", "--pid-file=/p", "-d", "--keep", "--no-pivot", "c1"],
                                            quick._RUN_SWITCHES)
    assert container_id == "c1"
    assert found == {"bundle": "/b", "pid_file": "/p", "console_socket": None, "detach": True, "keep": True}


@pytest.mark.parametrize("rest", [
    ["-d", "c1"],                       # run's flag, not create's
    ["--bundle"],                       # no value
    ["--weird", "c1"],
    ["c1", "c2"],                       # one ID only
    [],
])
def test_what_create_does_not_take_goes_to_click(rest):
    assert quick._verb_flags(rest, quick._CREATE_SWITCHES) is None
