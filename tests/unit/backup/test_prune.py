"""prune's figures: what it says it drops is what goes, and a second prune has nothing to do."""

from __future__ import annotations

import os
import random
from pathlib import Path

from p2pbackup.backup.maintenance import forget_and_prune
from p2pbackup.backup.retention import Policy
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.config import Source
from p2pbackup.repo.repository import Repository


async def test_second_prune_drops_nothing_when_unused_blobs_stay_in_used_packs(
        repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(20):  # one data pack: a changed file leaves it mostly in use
        (src / "sub" / f"f{i:02d}.bin").write_bytes(random.Random(i).randbytes(20_000))
    sources = (Source("src", str(src)),)
    stored = (await take_snapshot(repo, sources, temp_dir=str(tmp_path / "t"))).stored
    # The chunker is keyed per repository, so 20,000 bytes are one chunk or two depending on
    # the key: the old f00's chunks are what stays unused, counted rather than assumed.
    root = repo.load_tree_blocking(stored.snapshot.sources[0].tree)
    (sub,) = [e for e in root.entries if e.name == b"sub"]
    (old_f00,) = [e for e in repo.load_tree_blocking(sub.subtree).entries
                  if e.name == b"f00.bin"]
    unused = len(set(old_f00.chunks))
    (src / "sub" / "f00.bin").write_bytes(random.Random(100).randbytes(20_000))
    await take_snapshot(repo, sources, temp_dir=str(tmp_path / "t"))
    blobs_before = len(repo.index.blobs)

    dry = (await forget_and_prune(repo, repo.identity, Policy(last=1), prune_after=True,
                                  dry_run=True))["prune"]
    first = (await forget_and_prune(repo, repo.identity, Policy(last=1),
                                    prune_after=True))["prune"]
    # What it says it drops is what left the index; the old f00 chunk stays in its pack.
    assert first["blobs_dropped"] == blobs_before - len(repo.index.blobs)
    assert first["blobs_unused_kept"] == unused
    assert {k: dry[k] for k in ("blobs_dropped", "packs_deleted", "packs_repacked")} == \
        {k: first[k] for k in ("blobs_dropped", "packs_deleted", "packs_repacked")}

    second = (await forget_and_prune(repo, repo.identity, None, prune_after=True))["prune"]
    assert (second["blobs_dropped"], second["packs_deleted"], second["packs_repacked"],
            second["bytes_freed"], second["segments_folded"]) == (0, 0, 0, 0, 0)
    assert second["blobs_unused_kept"] == unused


async def test_prune_leaves_a_damaged_pack_to_repair_even_when_its_readable_blobs_are_unused(
        repo: Repository, tmp_path: Path):
    """A damaged pack's bad blobs are not in the index's blob map, so they looked unused: prune
    deleted the pack (and its removal record told every peer to delete their intact copy too),
    losing for good a blob a snapshot still uses and a peer could have healed."""
    from p2pbackup.crypto.identity import verify_signature
    from p2pbackup.format.removal import read_removal

    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i:02d}.bin").write_bytes(os.urandom(20_000))
    sources = (Source("src", str(src)),)
    await take_snapshot(repo, sources, temp_dir=str(tmp_path / "t"))
    for i in range(1, 20):  # all but f00 change: the first data pack is mostly unused
        (src / f"f{i:02d}.bin").write_bytes(os.urandom(20_000))
    latest = (await take_snapshot(repo, sources, temp_dir=str(tmp_path / "t"))).stored
    tree = repo.load_tree_blocking(latest.snapshot.sources[0].tree)
    (f00,) = [e for e in tree.entries if e.name == b"f00.bin"]
    loc = repo.locate(f00.chunks[0])
    path = Path(repo.store.path_of(f"packs/{loc.pack}"))
    data = bytearray(path.read_bytes())
    data[loc.offset + 100] ^= 0xFF   # inside f00's chunk, which the latest snapshot uses
    path.write_bytes(bytes(data))
    assert await repo.recheck_pack(loc.pack) is not None

    result = await forget_and_prune(repo, repo.identity, Policy(last=1), prune_after=True)
    assert loc.pack in repo.index.packs and path.exists()
    assert result["prune"]["packs_damaged_kept"] == 1
    if result.get("removal"):
        rec = read_removal(await repo.store.get(result["removal"]),
                           {repo.identity.device_id: repo.identity.public_key}.get,
                           verify_signature)
        assert f"packs/{loc.pack}" not in rec.names
