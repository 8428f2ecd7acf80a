"""Runs that decode millions of tree entries collect garbage less often, and overlapping ones
(a verify beside a snapshot in the daemon) leave the thresholds as they found them."""

from __future__ import annotations

import gc
import threading

from p2pbackup.backup.gcwindow import GC_THRESHOLD, fewer_collections


def test_overlapping_windows_put_the_threshold_back_only_when_the_last_one_ends():
    before = gc.get_threshold()
    first, second = fewer_collections(), fewer_collections()
    first.__enter__()
    assert gc.get_threshold() == (max(before[0], GC_THRESHOLD), *before[1:])
    second.__enter__()
    first.__exit__(None, None, None)  # not nested: the first to start ends first
    assert gc.get_threshold()[0] == max(before[0], GC_THRESHOLD)
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before


def test_a_window_ends_with_the_threshold_back_when_its_run_fails():
    before = gc.get_threshold()
    try:
        with fewer_collections():
            raise ValueError("the run failed")
    except ValueError:
        pass
    assert gc.get_threshold() == before


def test_windows_in_threads_end_with_the_threshold_back():
    before = gc.get_threshold()
    inside = threading.Barrier(4)

    def run() -> None:
        with fewer_collections():
            inside.wait(timeout=30)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert gc.get_threshold() == before
