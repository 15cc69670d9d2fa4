"""Property: whatever lines a journal holds (ASCII or not, unparseable, not objects) and however
its writes and reads interleave (partial lines, chunks smaller than a line, read limits), every
complete line that is a JSON object is handed out exactly once, in order, and the offset stops at
the end of the last complete line read."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.evidence.journal.follower import JournalFollower

_VALUE = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)
_RECORD = st.builds(
    lambda v, ascii_only: json.dumps({"v": v}, ensure_ascii=ascii_only).encode(),
    _VALUE,
    st.booleans(),
)
_GARBAGE = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\n\x00"), max_size=30
).map(str.encode)
_LINE = st.one_of(_RECORD, _RECORD, _GARBAGE, st.sampled_from([b"[1]", b"3", b"null", b"{"]))


def _expected(line: bytes) -> object:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(_LINE, max_size=12),
    cuts=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    chunk=st.sampled_from([1, 2, 7, 64, 256 * 1024]),
    limit=st.integers(1, 5),
)
def test_every_object_line_once_in_order(
    lines: list[bytes], cuts: list[int], chunk: int, limit: int
) -> None:
    data = b"".join(line + b"\n" for line in lines)
    expected = [obj for obj in map(_expected, lines) if obj is not None]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.jsonl"
        path.write_bytes(b"")
        follower = JournalFollower(path)
        follower.CHUNK = chunk
        got: list[dict[str, object]] = []
        written, i = 0, 0
        try:
            while True:
                if written < len(data):  # append the next piece, possibly mid-line
                    piece = data[written : written + cuts[i % len(cuts)]]
                    with path.open("ab") as f:
                        f.write(piece)
                    written += len(piece)
                    i += 1
                assert follower._pos is not None
                before = follower._pos.offset
                got.extend(follower.read(limit))
                if written == len(data) and follower._pos.offset == before:
                    break  # (an empty read may still have passed lines that are not objects)
            assert follower._pos is not None
            assert follower._pos.offset == len(data)
        finally:
            follower.close()
    assert got == expected
