"""Incremental detokenization and stop-sequence matching of the HF backend."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lmi_hf.text import IncrementalDetokenizer, StopMatcher


# A byte-level "tokenizer": token i is byte i, so multi-byte characters span several tokens.
def decode_bytes(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


@given(st.text(max_size=30))
def test_deltas_join_to_the_full_text(text: str) -> None:
    detok = IncrementalDetokenizer(decode_bytes)
    data = text.encode()
    out = "".join(detok.add(b) for b in data) + detok.flush()
    assert out == text


def test_dangling_multibyte_character_is_held_back() -> None:
    detok = IncrementalDetokenizer(decode_bytes)
    euro = "€".encode()
    assert detok.add(euro[0]) == ""
    assert detok.add(euro[1]) == ""
    assert detok.add(euro[2]) == "€"


@given(st.lists(st.text(max_size=5), max_size=10), st.text(min_size=1, max_size=4))
def test_stop_matcher_emits_exactly_the_text_before_the_stop(pieces: list[str], stop: str) -> None:
    matcher = StopMatcher([stop])
    emitted, hit = "", False
    for piece in pieces:
        out, hit = matcher.feed(piece)
        emitted += out
        if hit:
            break
    full = "".join(pieces)
    if hit:
        assert emitted == full[: full.find(stop)]
    else:
        emitted += matcher.flush()
        assert emitted == full and stop not in full


def test_no_stop_sequences_pass_text_through() -> None:
    assert StopMatcher([]).feed("abc") == ("abc", False)
