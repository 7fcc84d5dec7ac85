"""jsonlite: the same text as the json package, without its import."""
import json

import pytest
from hypothesis import given, strategies as st

from pyrunv import jsonlite

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)


@given(values, st.sampled_from([None, 2, 4]))
def test_dumps_writes_what_json_writes_and_loads_reads_it_back(value, indent):
    text = jsonlite.dumps(value, indent=indent)
    assert text == json.dumps(value, indent=indent)
    assert jsonlite.loads(text) == value and jsonlite.loads(text.encode()) == value


@pytest.mark.parametrize("text", ["", " ", "{", "{} x", "[1,]", "nul", "'a'"])
def test_what_is_not_one_json_value_is_a_value_error(text):
    with pytest.raises(ValueError):
        jsonlite.loads(text)


def test_what_json_cannot_hold_is_a_type_error():
    with pytest.raises(TypeError, match="not JSON serializable"):
        jsonlite.dumps({"a": object()})
