"""JSON through the interpreter's C accelerator alone. The `json` package imports `re` and compiles its
patterns, some 10 ms of every `pyrunv state`; the verbs engines call most read and write JSON with this."""
import _json


class _Decoding:
    """What the C scanner reads from its context: plain JSON, Python's own numbers, no hooks."""
    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return float(name)  # NaN, Infinity and -Infinity, as the json package reads them


_scan = _json.make_scanner(_Decoding())
_string = _json.encode_basestring_ascii


def _unencodable(value):
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_encode = _json.make_encoder(None, _unencodable, _string, None, ": ", ", ", False, False, True)


def loads(text: str | bytes):
    """As json.loads: ValueError for what is not one JSON value (surrounded by whitespace only)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode()
    start = len(text) - len(text.lstrip())
    try:
        value, end = _scan(text, start)
    except StopIteration:
        raise ValueError(f"not JSON at character {start}") from None
    if text[end:].strip():
        raise ValueError(f"extra data at character {end}")
    return value


def dumps(value, indent: int | None = None) -> str:
    """As json.dumps, with the same text for the same indent."""
    if indent is None:
        return "".join(_encode(value, 0))
    return _indented(value, indent, 0)


def _indented(value, indent: int, level: int) -> str:
    if isinstance(value, dict) and value:
        items = [f"{_string(str(k))}: {_indented(v, indent, level + 1)}" for k, v in value.items()]
    elif isinstance(value, (list, tuple)) and value:
        items = [_indented(v, indent, level + 1) for v in value]
    else:
        return dumps(value)
    inner, outer = "\n" + " " * (indent * (level + 1)), "\n" + " " * (indent * level)
    brackets = "{}" if isinstance(value, dict) else "[]"
    return brackets[0] + inner + ("," + inner).join(items) + outer + brackets[1]
