"""Large buffers and the process's allocator."""

from __future__ import annotations

import subprocess
import sys

# Threads read 16 MiB packs and free them, as uploads do; then the process's resident size.
MODEL = """
import os
from concurrent.futures import ThreadPoolExecutor
from p2pbackup.buffers import fix_mmap_threshold
fix_mmap_threshold()
with ThreadPoolExecutor(4) as pool:
    for _ in range(10):
        list(pool.map(lambda i: len(os.urandom(16 << 20)), range(4)))
print(int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20)
"""


def test_packs_read_and_freed_by_threads_leave_the_process():
    out = subprocess.run([sys.executable, "-c", MODEL], capture_output=True,
                         text=True, check=True).stdout
    # glibc's default kept 76 MiB here (freed packs held in the threads' heaps)
    assert int(out) < 48, f"{out.strip()} MiB resident after the packs were freed"
