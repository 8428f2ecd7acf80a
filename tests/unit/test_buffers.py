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


# Blocks of a restore's size (decoded chunks up to 1 MiB, S3 windows of 4 MiB) allocated and
# freed one after another, as a restore's threads do; then the page faults that took.
REUSE = """
import resource
from p2pbackup.buffers import fix_mmap_threshold
fix_mmap_threshold()
for size in (1 << 20, 4 << 20):
    b"x" * size   # the first of each size may take new pages (written: calloc touches none)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    for size in (64 << 10, 1 << 20, 4 << 20):
        b"x" * size
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_restore_sized_blocks_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", REUSE], capture_output=True,
                         text=True, check=True).stdout
    # Each block freed at the top of the heap was given back to the kernel (glibc trims
    # beyond 128 KiB once the mmap threshold is fixed) and each 4 MiB one unmapped: 63,000
    # faults, each a zeroed page (a restore from S3 spent a sixth of its CPU in them).
    assert int(out) < 2000, f"{out.strip()} page faults re-allocating freed blocks"
