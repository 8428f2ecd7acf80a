"""Healing damaged packs from other copies: what a hostile store or peer offers is checked
like anything else, and a peer cannot get intact packs set aside by claiming they are bad."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pbackup.backup.repair import repair_packs
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.backup.verify import verify
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.config import Source
from p2pbackup.errors import IntegrityError, NameMismatch
from p2pbackup.format.header import Kind
from p2pbackup.format.pack import PackBuilder
from p2pbackup.repo import replica
from p2pbackup.repo.repository import Repository

from tests.eventually import eventually
from tests.index_view import stored_blobs
from tests.unit.backup.conftest import repo  # noqa: F401  (the fixture)
from tests.unit.replication.test_member import running, two_repositories


async def _with_one_damaged_blob(repo: Repository, tmp_path: Path
                                 ) -> tuple[str, bytes, bytes, list]:
    """A snapshot of a few files, then one chunk of its pack flipped. Returns (pack, intact
    bytes, the damaged blob's id, the pack's blobs)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(20_000 + i))  # (not bundled: a chunk each)
    await take_snapshot(repo, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))
    name = next(loc.pack for loc in stored_blobs(repo.index).values() if loc.kind == Kind.CHUNK)
    blobs = await repo.index.pack_blobs(name)
    victim, loc = next((b, l) for b, l in blobs if l.kind == Kind.CHUNK)
    path = Path(repo.store.path_of(f"packs/{name}"))
    intact = path.read_bytes()
    damaged = bytearray(intact)
    damaged[loc.offset + loc.length // 2] ^= 1
    path.write_bytes(damaged)
    return name, intact, victim, blobs


async def test_a_forged_pack_under_the_damaged_packs_name_is_not_taken(repo, tmp_path: Path):
    name, intact, victim, blobs = await _with_one_damaged_blob(repo, tmp_path)
    hostile = LocalDirStore(tmp_path / "hostile")
    forged = bytearray(intact)
    forged[-100] ^= 1          # anything but the bytes that hash to the name
    await hostile.put(f"packs/{name}", forged)
    report = await repair_packs(repo, sources=[hostile])
    assert [(r.healed_from, r.lost) for r in report.repaired] == [(None, 1)]
    assert [bytes.fromhex(d.blob) for d in report.lost] == [victim]
    assert not await repo.store.has(f"packs/{name}")    # set aside, not replaced by a forgery


async def test_a_blob_offered_under_another_blobs_id_is_refused(repo, tmp_path: Path):
    """A member who holds the keys (or a removed one, for old data) builds a pack whose
    trailer names the lost blob, with another blob's sealed bytes: its content is not that id."""
    name, intact, victim, blobs = await _with_one_damaged_blob(repo, tmp_path)
    scope, epoch, _ = repo.index.packs[name]
    other, oloc = next((b, l) for b, l in blobs if b != victim and l.kind == Kind.CHUNK)
    builder = PackBuilder(scope, epoch)
    builder.add(Kind.CHUNK, victim, intact[oloc.offset:oloc.offset + oloc.length],
                oloc.raw_length)
    forged_name, forged, _ = builder.finish(repo.keys.meta_key)
    hostile = LocalDirStore(tmp_path / "hostile")
    await hostile.put(f"packs/{forged_name}", forged)
    report = await repair_packs(repo, sources=[hostile])
    assert not report.copied and [bytes.fromhex(d.blob) for d in report.lost] == [victim]
    assert victim not in repo.index.blobs


async def test_a_peer_cannot_overwrite_a_damaged_pack_with_a_forged_copy(repo, tmp_path: Path):
    name, intact, victim, blobs = await _with_one_damaged_blob(repo, tmp_path)
    await repo.rebuild_index()
    assert name in repo.damaged_packs
    before = Path(repo.store.path_of(f"packs/{name}")).read_bytes()
    forged = bytearray(intact)
    forged[20] ^= 1
    with pytest.raises(IntegrityError, match="does not match its name"):
        await replica.accept(repo, f"packs/{name}", bytes(forged))
    assert Path(repo.store.path_of(f"packs/{name}")).read_bytes() == before
    assert name in repo.damaged_packs
    # The genuine copy is taken.
    assert await replica.accept(repo, f"packs/{name}", intact)
    assert not repo.damaged_packs and (await verify(repo, read_data=True)).ok


async def test_a_peer_refusing_intact_packs_cannot_get_them_set_aside(tmp_path: Path,
                                                                     monkeypatch):
    """A peer that refuses every pack we send saying it does not match its name (hostile):
    each pack is checked once, found intact, and stays in use and offered. (A refusal for any
    other reason makes it check none: tests/adversary/test_partner_roster.py.)"""
    src, a_id, b_id, ra, rb = await two_repositories(tmp_path)
    real = replica.accept
    refused: list[str] = []

    async def refuse_packs(repo, name, data, **kw):
        if repo is rb and name.startswith("packs/"):
            refused.append(name)
            raise NameMismatch(f"{name[:60]} from a peer: its content does not match its name")
        return await real(repo, name, data, **kw)

    monkeypatch.setattr(replica, "accept", refuse_packs)
    packs = set(ra.index.packs)
    async with running(ra, rb, a_id, b_id, keep_open=True) as (pa, _sb, _pb):
        await eventually(lambda: pa._refused_ok == packs)
        assert not ra.damaged_packs
    assert set(ra.index.packs) == packs and (await verify(ra, read_data=True)).ok
    await ra.close()
    await rb.close()
