"""Bad input and faults: each gives one clear line, and afterwards the repository verifies and
the next snapshot and restore succeed; no snapshot refers to missing data."""

from __future__ import annotations

import json
import re
import os
import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest

from tests.conftest import Cli, tree_state
from tests.eventually import eventually_sync
from tests.diskfull import fill, small_tmpfs


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) >= 1
    assert "Traceback" not in stderr
    return lines[-1]


def packs(cli: Cli) -> list[Path]:
    return sorted((cli.home / "store" / "packs").rglob("*"), key=lambda p: p.stat().st_size
                  if p.is_file() else -1)


def largest_pack(cli: Cli) -> Path:
    return [p for p in packs(cli) if p.is_file()][-1]


def heal_and_check(cli: Cli, src: Path, out: Path) -> None:
    """The next snapshot stores lost data again; then everything verifies and restores."""
    cli("snapshot")
    assert "no problems found" in cli("verify", "--read-data").stdout
    for snap in json.loads(cli("snapshots", "--json").stdout):
        cli("restore", snap["id"], "--to", str(out / snap["short_id"]))
    cli("restore", "latest", "--to", str(out / "latest"))
    assert tree_state(out / "latest" / "src") == tree_state(src)


@pytest.fixture
def backed_up(cli: Cli, sample_tree: Path) -> tuple[Cli, Path, dict]:
    cli("init", "--source", str(sample_tree))
    snap = json.loads(cli("snapshot", "--json").stdout)
    return cli, sample_tree, snap


def test_tampered_byte_is_named_with_what_it_affects(backed_up, tmp_path: Path):
    cli, src, snap = backed_up
    pack = largest_pack(cli)
    data = bytearray(pack.read_bytes())
    data[len(data) // 3] ^= 0x40
    pack.write_bytes(bytes(data))

    proc = cli("verify", "--read-data", check=False)
    assert proc.returncode == 13
    # One blob is damaged, not the pack: that blob is named, in its pack.
    assert f"in pack {pack.name[:12]}: failed authentication" in proc.stdout
    assert f"snapshot {snap['short_id']}: src/" in proc.stdout  # names the affected file

    restored = cli("restore", "latest", "--to", str(tmp_path / "bad"), check=False)
    assert restored.returncode == 13
    assert "failed authentication" in restored.stderr and "1 not restored" in restored.stdout
    assert "could not be restored" in one_line(restored.stderr)

    fixed = cli("repair").stdout
    assert "moved to quarantine/" in fixed and "lost 1" in fixed
    assert (cli.home / "store" / "quarantine" / pack.name).exists()
    heal_and_check(cli, src, tmp_path / "ok")


def _damage_a_chunk_of(cli: Cli, name: bytes, at: int | None = None) -> tuple[int, int]:
    """Flip a byte in the middle chunk of src/`name` (or chunk number `at`); return the
    chunk's byte range in it."""
    import asyncio

    from p2pbackup.device import open_device

    async def locate() -> tuple[str, int, int, int]:
        async with open_device(cli.home) as dev:
            snap = await dev.repo.find_snapshot("latest")
            tree = await dev.repo.load_tree(snap.snapshot.sources[0].tree)
            entry = next(e for e in tree.entries if e.name == name)
            i = len(entry.chunks) // 2 if at is None else range(len(entry.chunks))[at]
            start = sum(dev.repo.locate(c).raw_length for c in entry.chunks[:i])
            loc = dev.repo.locate(entry.chunks[i])
            return loc.pack, loc.offset + loc.length // 2, start, start + loc.raw_length

    pack, offset, start, end = asyncio.run(locate())
    with open(cli.home / "store" / "packs" / pack[:2] / pack, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    return start, end


def test_a_damaged_file_is_named_and_every_other_file_is_restored(backed_up, tmp_path: Path):
    cli, src, snap = backed_up
    start, end = _damage_a_chunk_of(cli, b"big.bin")
    out = tmp_path / "out"
    proc = cli("restore", "latest", "--to", str(out), check=False)
    assert proc.returncode == 13
    assert f"{out / 'src' / 'big.bin'}: not restored: blob " in proc.stderr
    assert "failed authentication" in proc.stderr and "1 not restored" in proc.stdout
    want = {k: v for k, v in tree_state(src).items() if k != b"big.bin"}
    assert tree_state(out / "src") == want  # nothing half-written, no temporary file left

    proc = cli("restore", "latest", "--to", str(tmp_path / "kept"), "--keep-damaged",
               check=False)
    assert proc.returncode == 13
    assert f"{tmp_path / 'kept' / 'src' / 'big.bin'}: restored with bytes {start}-{end - 1} " \
           "zeroed: blob " in proc.stderr
    data = (src / "big.bin").read_bytes()
    got = (tmp_path / "kept" / "src" / "big.bin").read_bytes()
    assert got == data[:start] + bytes(end - start) + data[end:]


def _files(root: Path, count: int, size: int) -> Path:
    """`count` random files of `size` bytes and more, each a little longer than the last."""
    root.mkdir(parents=True)
    for i in range(count):
        (root / f"f{i:03d}.bin").write_bytes(os.urandom(size + 37 * i))
    return root


def _trailer(cli: Cli, pack: Path):
    from p2pbackup.config import load_config, load_keys
    from p2pbackup.format.pack import parse_trailer

    keys, _ = load_keys(load_config(cli.home))
    data = pack.read_bytes()
    return parse_trailer(data, len(data), keys.meta_key, "pack")


def _flip_one_chunk(cli: Cli, src: Path) -> tuple[Path, object, list[str], int]:
    """Flip one byte inside one chunk of the largest pack; return (pack, the chunk's BlobRef,
    the files using it, the number of blobs of the pack)."""
    from p2pbackup.config import load_config, load_keys
    from p2pbackup.format.header import Kind
    from p2pbackup.format.objects import open_object

    pack = largest_pack(cli)
    refs = _trailer(cli, pack).blobs
    chunks = sorted((r for r in refs if r.kind == Kind.CHUNK), key=lambda r: r.offset)
    ref = chunks[len(chunks) // 2]
    keys, _ = load_keys(load_config(cli.home))
    with open(pack, "rb") as f:
        f.seek(ref.offset)
        _, plain = open_object(f.read(ref.length), keys.scope("src", 0).data_key)
    # A file cut into chunks holds this one; small files stored together are held by it.
    victims = sorted(p.name for p in src.iterdir()
                     if bytes(plain) in (data := p.read_bytes()) or data in plain)
    with open(pack, "r+b") as f:
        f.seek(ref.offset + ref.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    return pack, ref, victims, len(refs)


def _indexed_blobs(out: str) -> int:
    m = re.search(r"index rebuilt: \d+ packs, (\d+) blobs", out)
    assert m, out
    return int(m.group(1))


def test_one_flipped_byte_damages_one_blob_not_its_pack(cli: Cli, tmp_path: Path):
    src = _files(tmp_path / "src", 150, 17_000)  # each too big to share a chunk
    cli("init", "--source", str(src))
    sid = json.loads(cli("snapshot", "--json").stdout)["short_id"]
    before_blobs = _indexed_blobs(cli("index", "rebuild").stdout)
    pack, ref, (victim,), nblobs = _flip_one_chunk(cli, src)
    blob = ref.id.hex()
    # Without --read-data a flipped byte cannot be seen: the output says data was not read.
    plain = cli("verify")
    assert "no problems found" in plain.stdout and "data not read" in plain.stdout

    # verify --read-data names that blob and the one file using it, and nothing else.
    proc = cli("verify", "--read-data", "--json", check=False)
    assert proc.returncode == 13, proc.stdout + proc.stderr
    damage = json.loads(proc.stdout)["damage"]
    assert [(d.get("blob"), d.get("pack")) for d in damage] == [(blob, pack.name)], damage
    assert damage[0]["affects"] == [f"snapshot {sid}: src/{victim}"]
    text = cli("verify", "--read-data", check=False).stdout
    assert f"blob {blob[:12]} in pack {pack.name[:12]}" in text and f"src/{victim}" in text
    # ... and records it in the index: a plain verify (repair, p2pbackupd) knows it now.
    plain = cli("verify", check=False)
    assert plain.returncode == 13 and f"blob {blob[:12]}" in plain.stdout, plain.stdout

    # A rebuilt index (or a deleted cache) still finds every other blob of that pack, and
    # knows the damaged one without reading the data again.
    rebuilt = cli("index", "rebuild")
    assert f"pack {pack.name[:12]}" in rebuilt.stderr and "1 of" in rebuilt.stderr
    assert _indexed_blobs(rebuilt.stdout) == before_blobs - 1  # all but the damaged one
    proc = cli("verify", "--json", check=False)
    assert proc.returncode == 13
    damage = json.loads(proc.stdout)["damage"]
    assert [(d["blob"], d["affects"]) for d in damage] == \
        [(blob, [f"snapshot {sid}: src/{victim}"])], damage
    # --read-data reads the pack noted damaged again (a faulty read clears): real damage stays
    proc = cli("verify", "--read-data", "--json", check=False)
    assert proc.returncode == 13
    assert [d.get("blob") for d in json.loads(proc.stdout)["damage"]] == [blob]
    assert cli("verify", check=False).returncode == 13
    other = next(p.name for p in src.iterdir() if p.name != victim)
    cli("restore", "latest", "--to", str(tmp_path / "one"), "--path", f"src/{other}")
    assert (tmp_path / "one" / "src" / other).read_bytes() == (src / other).read_bytes()

    # repair keeps every other blob and says exactly what it lost, and which file.
    out = cli("repair").stdout
    assert f"pack {pack.name[:12]}" in out and f"kept {nblobs - 1} blobs, lost 1" in out, out
    assert f"blob {blob[:12]}" in out and f"snapshot {sid}: src/{victim}" in out, out
    assert (cli.home / "store" / "quarantine" / pack.name).exists()
    proc = cli("verify", "--json", check=False)
    assert proc.returncode == 13
    assert [d["affects"] for d in json.loads(proc.stdout)["damage"]] == \
        [[f"snapshot {sid}: src/{victim}"]]
    heal_and_check(cli, src, tmp_path / "ok")


def test_one_flipped_byte_in_small_files_stored_together_names_each_of_them(cli: Cli,
                                                                            tmp_path: Path):
    src = _files(tmp_path / "src", 150, 2000)  # stored together, 64 to a chunk at most
    cli("init", "--source", str(src))
    sid = json.loads(cli("snapshot", "--json").stdout)["short_id"]
    pack, ref, victims, _ = _flip_one_chunk(cli, src)
    assert 1 < len(victims) <= 64
    proc = cli("verify", "--read-data", "--json", check=False)
    assert proc.returncode == 13, proc.stdout + proc.stderr
    damage = json.loads(proc.stdout)["damage"]
    assert [(d.get("blob"), d.get("pack")) for d in damage] == [(ref.id.hex(), pack.name)]
    assert sorted(damage[0]["affects"]) == [f"snapshot {sid}: src/{v}" for v in victims]
    out = tmp_path / "out"
    proc = cli("restore", "latest", "--to", str(out), check=False)
    assert proc.returncode == 13
    assert sorted(os.listdir(out / "src")) == sorted(set(os.listdir(src)) - set(victims))
    assert all(f"src/{v}: not restored: blob {ref.id.hex()[:12]}" in proc.stderr
               for v in victims), proc.stderr
    out = cli("repair").stdout
    assert f"blob {ref.id.hex()[:12]}" in out and f"snapshot {sid}: src/{victims[0]}" in out
    heal_and_check(cli, src, tmp_path / "ok")  # the next snapshot stores them again


def test_a_damaged_blob_known_from_a_rebuilt_index_keeps_its_place_in_its_file(
        cli: Cli, sample_tree: Path, tmp_path: Path):
    """After an index rebuild the damaged blobs are known without being read again; where
    they lie (so how long they are) is known too: `restore --keep-damaged` zeroes exactly
    those bytes, here two separate chunks of one file."""
    cli("init", "--source", str(sample_tree))
    cli("snapshot")
    ranges = [_damage_a_chunk_of(cli, b"big.bin", at=i) for i in (0, None, -1)]
    cli("index", "rebuild")
    out = tmp_path / "kept"
    proc = cli("restore", "latest", "--to", str(out), "--keep-damaged", check=False)
    assert proc.returncode == 13, proc.stderr
    data = (sample_tree / "big.bin").read_bytes()
    for start, end in ranges:
        data = data[:start] + bytes(end - start) + data[end:]
    assert (out / "src" / "big.bin").read_bytes() == data


def test_repair_heals_from_a_copy_of_the_store(cli: Cli, tmp_path: Path):
    import shutil

    src = _files(tmp_path / "src", 60, 2000)  # small files, stored together
    cli("init", "--source", str(src))
    cli("snapshot")
    copy = tmp_path / "copy"
    shutil.copytree(cli.home / "store", copy)      # e.g. a USB disk, before the damage
    pack, _, _, _ = _flip_one_chunk(cli, src)
    assert cli("verify", "--read-data", check=False).returncode == 13
    cli("index", "rebuild")                         # the damaged pack known, partly indexed

    out = cli("repair", "--from", str(copy)).stdout
    assert f"pack {pack.name[:12]}" in out and f"intact copy from {copy}" in out, out
    assert "nothing was lost" in out and "lost:" not in out, out
    # Healed: nothing to store again from the sources, every byte comes back.
    assert "no problems found" in cli("verify", "--read-data").stdout
    cli("restore", "latest", "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)
    assert (cli.home / "store" / "quarantine" / pack.name).exists()


def test_truncated_pack(backed_up, tmp_path: Path):
    cli, src, snap = backed_up
    pack = largest_pack(cli)
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size // 2)
    proc = cli("verify", check=False)
    assert proc.returncode == 13 and f"pack {pack.name[:12]}" in proc.stdout
    assert "expected" in proc.stdout and snap["short_id"] in proc.stdout
    assert "kept" in cli("repair").stdout
    heal_and_check(cli, src, tmp_path / "ok")


def test_deleted_pack(backed_up, tmp_path: Path):
    cli, src, snap = backed_up
    pack = largest_pack(cli)
    pack.unlink()
    proc = cli("verify", check=False)
    assert proc.returncode == 13
    assert f"pack {pack.name[:12]}: missing from the store" in proc.stdout
    assert f"snapshot {snap['short_id']}: src/" in proc.stdout
    # The snapshot after the loss must not reuse entries whose chunks are gone.
    heal_and_check(cli, src, tmp_path / "ok")


def test_missing_and_corrupt_index_is_rebuilt(backed_up, tmp_path: Path):
    cli, src, _ = backed_up
    index = next((cli.home / "cache").rglob("index*.sqlite"))
    for suffix in ("", "-wal", "-shm"):
        Path(str(index) + suffix).unlink(missing_ok=True)
    cli("restore", "latest", "--to", str(tmp_path / "a"))
    assert tree_state(tmp_path / "a" / "src") == tree_state(src)
    for suffix in ("-wal", "-shm"):
        Path(str(index) + suffix).unlink(missing_ok=True)
    index.write_bytes(b"this is not a database" * 100)
    proc = cli("verify")
    assert "rebuilding it from the packs" in proc.stderr
    out = cli("index", "rebuild").stdout
    assert "index rebuilt: 2 packs" in out
    assert "no problems found" in cli("verify", "--read-data").stdout


def test_no_home_and_wrong_key(cli: Cli, sample_tree: Path, tmp_path: Path):
    proc = cli("snapshots", check=False)
    assert proc.returncode == 10 and "p2pbackup init" in one_line(proc.stderr)
    cli("init", "--source", str(sample_tree))
    cli("snapshot")
    key = cli.home / "keys" / "account.key"
    os.chmod(key, 0o600)
    key.write_bytes(os.urandom(32))
    for cmd in (["snapshots"], ["snapshot"], ["verify"], ["restore", "latest", "--to", str(tmp_path)]):
        proc = cli(*cmd, check=False)
        assert proc.returncode == 15, cmd
        assert "account key does not open the repository" in one_line(proc.stderr)


def test_restore_from_another_accounts_store_is_refused(cli: Cli, sample_tree: Path, tmp_path: Path):
    other = Cli(tmp_path / "other-home")
    other("init", "--source", str(sample_tree))
    cli("init", "--source", str(sample_tree))
    cli("snapshot")
    proc = other("snapshots", "--from", str(cli.home / "store"), check=False)
    assert proc.returncode == 15


def test_unknown_format_version(backed_up, tmp_path: Path):
    cli, src, snap = backed_up
    snapdir = cli.home / "store" / "snapshots"
    good = (snapdir / snap["id"]).read_bytes()
    newer = bytearray(good)
    newer[4] = 9
    import blake3

    newer_id = blake3.blake3(bytes(newer)).hexdigest()
    (snapdir / newer_id).write_bytes(bytes(newer))
    proc = cli("snapshots", "--json")
    assert [s["id"] for s in json.loads(proc.stdout)] == [snap["id"]]
    assert "written by a newer p2pbackup (format v9); upgrade to read it" in proc.stderr
    proc = cli("restore", newer_id[:10], "--to", str(tmp_path / "x"), check=False)
    assert proc.returncode == 14
    assert "newer p2pbackup (format v9)" in one_line(proc.stderr)
    (snapdir / newer_id).unlink()
    config = cli.home / "store" / "config"
    raw = bytearray(config.read_bytes())
    raw[4] = 3
    config.write_bytes(bytes(raw))
    proc = cli("snapshots", check=False)
    assert proc.returncode == 14 and "(format v3)" in one_line(proc.stderr)


def test_second_writer_is_refused_and_stale_lock_taken_over(backed_up):
    import fcntl

    cli, src, _ = backed_up
    lockfile = cli.home / "store" / "lock"
    fd = os.open(lockfile, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, b"4242\n", 0)
    try:
        proc = cli("snapshot", check=False)
        assert proc.returncode == 16
        assert "Another p2pbackup (pid 4242) is writing" in one_line(proc.stderr)
        cli("snapshots")  # readers are not blocked
    finally:
        os.close(fd)
    lockfile.write_text("999999\n")  # left by a dead process: no flock held
    cli("snapshot")


def _write_random_files(root: Path, count: int, size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"f{i:04d}.bin").write_bytes(os.urandom(size))


def test_kill_9_during_snapshot(cli: Cli, tmp_path: Path):
    src = tmp_path / "src"
    _write_random_files(src, 60, 4 * 1024 * 1024)
    cli("init", "--source", str(src))
    proc = cli.popen("snapshot")
    deadline = time.monotonic() + 60
    while not any(p.is_file() for p in (cli.home / "store" / "packs").rglob("*")):
        assert proc.poll() is None, "snapshot finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(cli("snapshots", "--json").stdout) == []
    assert "no problems found" in cli("verify", "--read-data").stdout
    heal_and_check(cli, src, tmp_path / "out")


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry))
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_during_restore(cli: Cli, tmp_path: Path):
    src = tmp_path / "src"
    _write_random_files(src, 80, 2 * 1024 * 1024)  # big enough to be written by worker processes
    cli("init", "--source", str(src))
    cli("snapshot")
    target = tmp_path / "out"
    proc = cli.popen("restore", "latest", "--to", str(target))
    deadline = time.monotonic() + 60
    while len(list((target / "src").glob("f*.bin"))) < 5:
        assert proc.poll() is None, "restore finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    workers = _children(proc.pid)
    assert len(workers) >= 2, "the restore was expected to write from worker processes"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10  # the workers die with the restore, not later
    while any(_running(w) for w in workers):
        assert time.monotonic() < deadline, "a restore worker outlived the killed restore"
        time.sleep(0.05)
    for f in (target / "src").glob("f*.bin"):  # a file at its final name is always whole
        assert f.read_bytes() == (src / f.name).read_bytes()
    out = cli("restore", "latest", "--to", str(target)).stdout
    assert "already complete" in out and " 0 files already" not in out
    assert tree_state(target / "src") == tree_state(src)
    assert not list((target / "src").glob(".p2pb-restore-*"))
    assert "no problems found" in cli("verify").stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_during_snapshot(tmp_path: Path, sample_tree: Path):
    with small_tmpfs(tmp_path / "small", "1500k") as fs:
        cli = Cli(fs / "home")
        cli("init", "--source", str(sample_tree))
        proc = cli("snapshot", check=False)
        assert proc.returncode == 12, proc.stderr
        line = one_line(proc.stderr)
        assert "No space left" in line and "nothing already stored was lost" in line
        assert json.loads(cli("snapshots", "--json").stdout) == []
        assert "no problems found" in cli("verify", "--read-data").stdout
        subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
        heal_and_check(cli, sample_tree, tmp_path / "out")


def _reads_work_on_a_full_disk(cli: Cli, src: Path, out: Path) -> None:
    for args in (["snapshots", "--json"], ["verify", "--read-data"],
                 ["restore", "latest", "--to", str(out)]):
        proc = cli(*args, check=False, timeout=90)  # a hang is a TimeoutExpired
        assert proc.returncode == 0, (args, proc.stderr)
        assert sum(" is full:" in ln for ln in proc.stderr.splitlines()) <= 1, proc.stderr
        assert not any(w in proc.stderr for w in ("Traceback", "error", "damaged")), proc.stderr
    assert tree_state(out / "src") == tree_state(src)
    proc = cli("status", check=False, timeout=90)
    assert proc.returncode == 19 and "not running" in one_line(proc.stderr)
    proc = cli("snapshot", check=False, timeout=90)
    assert proc.returncode == 12, proc.stderr
    assert "No space left" in one_line(proc.stderr) and "damaged" not in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_under_the_home_still_reads_refuses_writes_and_never_hangs(
        tmp_path: Path, sample_tree: Path):
    with small_tmpfs(tmp_path / "small", "16m") as fs:
        cli = Cli(fs / "home")
        cli("init", "--source", str(sample_tree))
        cli("snapshot")
        index = next((cli.home / "cache").rglob("index-*.sqlite"))
        # A pack the index does not know yet (as a killed snapshot leaves one): reading the
        # repository indexes it, which is a write.
        with closing(sqlite3.connect(index)) as db:
            num = db.execute("SELECT num FROM packs LIMIT 1").fetchone()[0]
            db.execute("DELETE FROM blobs WHERE pack=?", (num,))
            db.execute("DELETE FROM packs WHERE num=?", (num,))
            db.execute("UPDATE meta SET value=value+1 WHERE key='generation'")
            db.commit()
        # Held open by another process (as the daemon holds it): its shared-memory file
        # exists, so the index opens and the first write fails.
        holder = sqlite3.connect(index)
        try:
            holder.execute("SELECT count(*) FROM packs").fetchone()
            fill(fs)
            _reads_work_on_a_full_disk(cli, sample_tree, tmp_path / "out-held")
        finally:
            holder.close()  # (the last connection removes the write-ahead log: space again)
        fill(fs)
        # Held by nobody: even opening the index needs a write (its shared-memory file).
        _reads_work_on_a_full_disk(cli, sample_tree, tmp_path / "out-alone")
        assert index.exists()  # a failed write is not damage: the index was not thrown away
        (fs / "filler").unlink()
        heal_and_check(cli, sample_tree, tmp_path / "out")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_init_on_a_full_disk_is_one_line_exit_12_and_leaves_no_half_made_home(
        tmp_path: Path, sample_tree: Path):
    with small_tmpfs(tmp_path / "small", "16m") as fs:
        fill(fs)
        cli = Cli(fs / "home")
        proc = cli("init", "--source", str(sample_tree), check=False)
        assert proc.returncode == 12, proc.stderr
        assert "No space left" in one_line(proc.stderr)
        assert not cli.home.exists()  # nothing half made that a second init would refuse
        (fs / "filler").unlink()
        cli("init", "--source", str(sample_tree))
        cli("snapshot")


def test_damage_verify_finds_while_the_daemon_runs_shows_in_status(backed_up, tmp_path: Path):
    from tests.integration.test_daemon import Daemon

    cli, _, _ = backed_up
    pack = largest_pack(cli)
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        data = bytearray(pack.read_bytes())
        data[len(data) // 3] ^= 0x40
        pack.write_bytes(bytes(data))
        assert cli("verify", "--read-data", check=False).returncode == 13
        st = json.loads(cli("status", "--json").stdout)
        assert [x["pack"] for x in st.get("damaged", ())] == [pack.name], st.get("damaged")
        assert f"damaged: pack {pack.name[:12]}: " in cli("status").stdout
        # verify told p2pbackupd, which checks the pack and asks its peers for a copy
        eventually_sync(lambda: f"pack {pack.name[:12]} is damaged" in
                        (tmp_path / "daemon.log").read_text(), timeout=30)
    finally:
        assert d.stop() == 0
