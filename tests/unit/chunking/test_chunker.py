import os

from hypothesis import given, settings, strategies as st

from p2pbackup.chunking import Chunker


def test_chunks_cover_input_and_respect_bounds():
    data = os.urandom(3 * 1024 * 1024)
    c = Chunker(64 * 1024, seed=7)
    cuts = list(c.cut(data))
    assert cuts[0][0] == 0
    assert sum(n for _, n in cuts) == len(data)
    for (off, n), (nxt, _) in zip(cuts, cuts[1:]):
        assert off + n == nxt
    assert all(n <= c.max_size for _, n in cuts)
    assert all(n >= 16 * 1024 for _, n in cuts[:-1])


def test_boundaries_are_content_defined():
    """An insertion near the start moves only nearby boundaries: later chunks are identical."""
    data = os.urandom(2 * 1024 * 1024)
    c = Chunker(64 * 1024, seed=1)
    before = {bytes(data[o:o + n]) for o, n in c.cut(data)}
    edited = data[:1000] + b"INSERTED" + data[1000:]
    after = {bytes(edited[o:o + n]) for o, n in c.cut(edited)}
    assert len(before & after) >= len(before) - 2


def test_secret_seed_moves_boundaries():
    data = os.urandom(1024 * 1024)
    assert list(Chunker(64 * 1024, seed=1).cut(data)) != list(Chunker(64 * 1024, seed=2).cut(data))


@settings(max_examples=50)
@given(st.binary(max_size=300_000))
def test_any_input_is_cut_exactly(data):
    cuts = list(Chunker(4096, seed=3).cut(data))
    assert b"".join(data[o:o + n] for o, n in cuts) == data


def test_inputs_up_to_min_size_are_one_chunk():
    """The snapshot engine relies on this to skip cutting small files."""
    c = Chunker(64 * 1024, seed=9)
    for n in (1, 100, c.min_size):
        assert list(c.cut(os.urandom(n))) == [(0, n)]
