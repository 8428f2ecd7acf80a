"""RangeWindows: small ranged reads served from a few aligned window reads."""

from __future__ import annotations

import asyncio
import os

import pytest

from p2pbackup.blobs.windows import RangeWindows
from tests.eventually import eventually

DATA = os.urandom(1000)


class Fetches(list):
    def __init__(self, fail: int = 0, fail_at: int | None = None) -> None:
        super().__init__()
        self.fail, self.fail_at = fail, fail_at   # the first `fail`; or once, at `fail_at`

    async def __call__(self, name: str, start: int, length: int) -> bytes:
        self.append((name, start, length))
        await asyncio.sleep(0)
        if self.fail or start == self.fail_at:
            self.fail = max(0, self.fail - 1)
            self.fail_at = None
            raise OSError("reset")
        return DATA[start:start + length]


async def test_sequential_small_reads_cost_one_fetch_per_window() -> None:
    fetches = Fetches()
    windows = RangeWindows(fetches, window=100, keep=4)
    got = [await windows.read("packs/a", i, 10, len(DATA)) for i in range(0, 1000, 10)]
    assert b"".join(got) == DATA
    assert sorted(fetches) == [("packs/a", i, 100) for i in range(0, 1000, 100)]


async def test_a_read_across_two_windows_and_the_short_last_one() -> None:
    windows = RangeWindows(Fetches(), window=300)
    assert await windows.read("p", 290, 20, len(DATA)) == DATA[290:310]
    assert await windows.read("p", 950, 50, len(DATA)) == DATA[950:]


async def test_readers_of_one_window_share_its_fetch() -> None:
    fetches = Fetches()
    windows = RangeWindows(fetches, window=500)
    got = await asyncio.gather(*(windows.read("p", i, 5, len(DATA)) for i in range(0, 500, 5)))
    assert b"".join(got) == DATA[:500] and fetches.count(("p", 0, 500)) == 1


async def test_a_large_read_goes_straight_to_the_server() -> None:
    fetches = Fetches()
    windows = RangeWindows(fetches, window=100)
    assert await windows.read("p", 50, 400, len(DATA)) == DATA[50:450]
    assert fetches == [("p", 50, 400)]


async def test_a_failed_window_is_fetched_again_and_old_windows_leave() -> None:
    fetches = Fetches(fail=1)
    windows = RangeWindows(fetches, window=100, keep=2, ahead=0)
    with pytest.raises(OSError):
        await windows.read("p", 0, 10, len(DATA))
    assert await windows.read("p", 0, 10, len(DATA)) == DATA[:10]
    for start in (100, 200, 0):   # window 0 left when 1 and 2 came
        await windows.read("p", start, 10, len(DATA))
    assert [f[1] for f in fetches] == [0, 0, 100, 200, 0]
    windows.forget("p")
    await windows.read("p", 200, 10, len(DATA))
    assert len(fetches) == 6


async def test_the_next_window_is_fetched_before_a_sequential_reader_asks_for_it() -> None:
    fetches = Fetches()
    windows = RangeWindows(fetches, window=100)
    assert await windows.read("p", 0, 10, len(DATA)) == DATA[:10]
    assert fetches == [("p", 0, 100), ("p", 100, 100)]   # window 1 went out with it
    await asyncio.sleep(0.01)
    assert await windows.read("p", 150, 10, len(DATA)) == DATA[150:160]
    await asyncio.sleep(0.01)
    assert [f[1] for f in fetches] == [0, 100, 200]   # window 1 was there: 2 goes ahead
    assert await windows.read("p", 995, 5, len(DATA)) == DATA[995:]   # none past the end
    await asyncio.sleep(0.01)
    assert [f[1] for f in fetches] == [0, 100, 200, 900]


async def test_a_window_fetched_ahead_that_failed_is_fetched_again_by_its_reader(
        caplog: pytest.LogCaptureFixture) -> None:
    fetches = Fetches(fail_at=100)   # window 1, fetched ahead, fails
    windows = RangeWindows(fetches, window=100)
    assert await windows.read("p", 0, 10, len(DATA)) == DATA[:10]
    await asyncio.sleep(0.01)
    assert await windows.read("p", 100, 10, len(DATA)) == DATA[100:110]
    assert [f[1] for f in fetches] == [0, 100, 100, 200]
    assert "never retrieved" not in caplog.text


class Gated(Fetches):
    """Fetches that wait for `open` before answering: what is in flight at once shows."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()

    async def __call__(self, name: str, start: int, length: int) -> bytes:
        self.append((name, start, length))
        await self.open.wait()
        return DATA[start:start + length]


async def test_the_windows_of_one_read_are_fetched_at_once_not_one_after_another() -> None:
    fetches = Gated()
    windows = RangeWindows(fetches, window=100, ahead=0)
    read = asyncio.ensure_future(windows.read("p", 50, 100, len(DATA)))   # windows 0 and 1
    for _ in range(5):
        await asyncio.sleep(0)
    assert sorted(f[1] for f in fetches) == [0, 100]   # both out before either came back
    fetches.open.set()
    assert await read == DATA[50:150]


async def test_a_read_just_over_two_windows_uses_the_windows_already_held() -> None:
    """A restore reads up to 4 MiB of neighbouring chunks plus the chunk that crosses the
    limit: three 4 MiB windows, two of them usually fetched already."""
    fetches = Fetches()
    windows = RangeWindows(fetches, window=100, ahead=0)
    assert await windows.read("p", 100, 200, len(DATA)) == DATA[100:300]
    assert await windows.read("p", 150, 200, len(DATA)) == DATA[150:350]
    assert sorted(f[1] for f in fetches) == [100, 200, 300]   # only window 3 was new


async def test_six_packs_read_at_once_fetch_each_window_once() -> None:
    """A 1 GiB restore from weed read about four packs at once, up to seven (small files'
    bundles, large files' chunks, folder listings; two writers), each in reads of a window
    and a bit (4 MiB of chunks and the one over the limit) with one window ahead: the windows
    kept must hold them all, or they push out each other's before their readers come (it
    fetched 1.6 times its bytes)."""
    from p2pbackup.blobs.windows import KEEP

    fetches = Fetches()
    windows = RangeWindows(fetches, window=100, keep=KEEP)
    packs, size, read = 6, 1000, 110
    for start in range(0, size, read):
        for p in range(packs):
            length = min(read, size - start)
            assert await windows.read(f"p{p}", start, length, size) == \
                DATA[start:start + length]
    assert len(fetches) == len(set(fetches)) == packs * size // 100


class Kept(Fetches):
    """Fetches that keep what they returned (to tell a view of it from a copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.returned: list[bytes] = []

    async def __call__(self, name: str, start: int, length: int) -> bytes:
        data = await super().__call__(name, start, length)
        self.returned.append(data)
        return data


async def test_spans_within_a_window_are_views_of_it_not_copies() -> None:
    """A restore's run of neighbouring blobs: each is a view of the window that holds it
    (the event loop copied each read, a new 4 MiB bytes, holding the GIL); only a blob that
    crosses into the next window is put together."""
    fetches = Kept()
    windows = RangeWindows(fetches, window=100, ahead=0)
    spans = [(120, 30), (150, 40), (190, 20), (210, 50)]   # (190, 20) crosses into window 2
    got = await windows.spans("p", spans, len(DATA))
    assert [bytes(g) for g in got] == [DATA[o:o + n] for o, n in spans]
    window1, window2 = fetches.returned
    assert [isinstance(g, memoryview) and g.obj for g in got] == \
        [window1, window1, False, window2]


async def test_spans_past_the_end_are_cut_short() -> None:
    windows = RangeWindows(Fetches(), window=300)
    got = await windows.spans("p", [(950, 30), (980, 40), (1000, 10)], len(DATA))
    assert [bytes(g) for g in got] == [DATA[950:980], DATA[980:], b""]



async def test_a_window_still_to_be_read_outlives_windows_read_through() -> None:
    # A restore comes back to a pack's window after reading other packs: least recently
    # used alone dropped the window for them, and it was fetched a second time.
    fetches = Fetches()
    windows = RangeWindows(fetches, window=100, keep=2, ahead=0)
    windows.expect("packs/a", [(0, 50), (50, 50)])
    for name in ("packs/b", "packs/c", "packs/d"):
        windows.expect(name, [(0, 100)])
    assert await windows.read("packs/a", 0, 50, len(DATA)) == DATA[:50]
    for name in ("packs/b", "packs/c", "packs/d"):
        assert await windows.read(name, 0, 100, len(DATA)) == DATA[:100]
    assert await windows.read("packs/a", 50, 50, len(DATA)) == DATA[50:100]
    assert fetches.count(("packs/a", 0, 100)) == 1 and len(fetches) == 4


async def test_a_window_read_as_often_as_announced_leaves_first() -> None:
    fetches = Fetches()
    windows = RangeWindows(fetches, window=100, keep=2, ahead=0)
    windows.expect("packs/a", [(0, 10), (0, 10)])   # a chunk two files share
    windows.expect("packs/b", [(0, 10)])
    windows.expect("packs/c", [(0, 10)])
    for name in ("packs/a", "packs/b", "packs/c", "packs/a"):
        assert await windows.read(name, 0, 10, len(DATA)) == DATA[:10]
    assert len(fetches) == 3


async def test_no_window_ahead_that_no_read_to_come_needs() -> None:
    fetches = Fetches()
    windows = RangeWindows(fetches, window=100, ahead=1)
    windows.expect("packs/a", [(0, 100), (200, 10)])
    assert await windows.read("packs/a", 0, 100, len(DATA)) == DATA[:100]
    assert fetches == [("packs/a", 0, 100)]


async def test_reads_announced_and_forgotten_keep_no_window() -> None:
    fetches = Fetches()
    windows = RangeWindows(fetches, window=100, keep=2, ahead=0)
    windows.expect("packs/a", [(0, 10), (0, 10)])
    assert await windows.read("packs/a", 0, 10, len(DATA)) == DATA[:10]
    windows.forget_expected()   # the restore ended before its second read
    for name in ("packs/b", "packs/c", "packs/b"):
        assert await windows.read(name, 0, 10, len(DATA)) == DATA[:10]
    assert len(fetches) == 3


async def _held_from_a_thread(windows: RangeWindows, name: str, offset: int, length: int
                              ) -> bytes | None:
    """held_spans as a restore's writer calls it: from another thread."""
    got = await asyncio.to_thread(windows.held_spans, name, [(offset, length)], len(DATA))
    return None if got is None else bytes(got[0])


async def test_a_read_of_held_windows_is_served_on_the_callers_thread() -> None:
    fetches = Fetches()
    windows = RangeWindows(fetches, window=100, ahead=1)
    assert await _held_from_a_thread(windows, "p", 10, 20) is None   # not fetched yet
    assert await windows.read("p", 0, 10, len(DATA)) == DATA[:10]    # (and 100-199 ahead)
    await asyncio.sleep(0)
    assert await _held_from_a_thread(windows, "p", 10, 20) == DATA[10:30]
    assert await _held_from_a_thread(windows, "p", 150, 100) is None  # 200-299: not fetched
    assert fetches == [("p", 0, 100), ("p", 100, 100)]


async def test_a_held_read_leaves_the_window_ahead_to_the_loop() -> None:
    # a read that would fetch the window after it (a sequential reader) goes to the loop,
    # which fetches that window ahead, as it does for any read
    fetches = Fetches()
    windows = RangeWindows(fetches, window=100, ahead=1)
    await windows.read("p", 250, 10, len(DATA))     # 200-299, and 300-399 ahead
    await asyncio.sleep(0)
    assert await _held_from_a_thread(windows, "p", 350, 10) is None   # 400-499 is not held
    assert await _held_from_a_thread(windows, "p", 260, 10) == DATA[260:270]


async def test_a_held_read_counts_as_a_read_announced() -> None:
    fetches = Fetches()
    windows = RangeWindows(fetches, window=100, keep=2, ahead=0)
    windows.expect("packs/a", [(0, 10), (0, 10)])
    windows.expect("packs/b", [(0, 10)])
    assert await windows.read("packs/a", 0, 10, len(DATA)) == DATA[:10]
    assert await _held_from_a_thread(windows, "packs/a", 0, 10) == DATA[:10]   # its last
    await windows.read("packs/b", 0, 10, len(DATA))
    await windows.read("packs/c", 0, 10, len(DATA))   # packs/a leaves, not packs/b
    assert await _held_from_a_thread(windows, "packs/b", 0, 10) == DATA[:10]
    assert await _held_from_a_thread(windows, "packs/a", 0, 10) is None


async def test_a_window_that_failed_is_not_held() -> None:
    fetches = Fetches(fail_at=100)
    windows = RangeWindows(fetches, window=100, ahead=1)
    await windows.read("p", 0, 10, len(DATA))   # 100-199 fetched ahead, and failed
    await eventually(lambda: ("p", 100) not in windows._windows)   # (dropped on failing)
    assert await _held_from_a_thread(windows, "p", 150, 10) is None
    assert await windows.read("p", 150, 10, len(DATA)) == DATA[150:160]
