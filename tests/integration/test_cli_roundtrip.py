"""init, snapshot, snapshots, restore and verify through the real CLI, on real files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import Cli, inode_groups, make_fidelity_tree, tree_state, xattrs_of


def test_init_makes_private_keys_and_a_checked_recovery_code(cli: Cli, sample_tree: Path):
    out = cli("init", "--source", str(sample_tree)).stdout
    code = next(line.strip() for line in out.splitlines() if line.count("-") == 10)
    from p2pbackup.crypto import recovery

    assert recovery.decode(code) == (cli.home / "keys" / "account.key").read_bytes()
    for f in ("account.key", "device.key"):
        assert stat.S_IMODE(os.stat(cli.home / "keys" / f).st_mode) == 0o600
    assert (cli.home / "config.toml").exists()
    again = cli("init", check=False)
    assert again.returncode == 10
    assert again.stderr.strip().count("\n") == 0 and "already set up" in again.stderr


def test_snapshot_then_restore_is_exact(cli: Cli, sample_tree: Path, tmp_path: Path):
    cli("init", "--source", str(sample_tree))
    snap = json.loads(cli("snapshot", "--json").stdout)
    assert snap["paths"] == [str(sample_tree)] and len(snap["id"]) == 64
    cli("restore", "latest", "--to", str(tmp_path / "out"))
    restored = tmp_path / "out" / "src"
    assert tree_state(restored) == tree_state(sample_tree)
    assert inode_groups(restored) == inode_groups(sample_tree) != []
    assert "no problems found" in cli("verify", "--read-data").stdout


def test_snapshots_json_and_id_prefix(cli: Cli, sample_tree: Path, tmp_path: Path):
    cli("init", "--source", str(sample_tree))
    first = json.loads(cli("snapshot", "--json").stdout)
    (sample_tree / "docs" / "new.txt").write_text("new\n")
    second = json.loads(cli("snapshot", "--json").stdout)
    listed = json.loads(cli("snapshots", "--json").stdout)
    assert [s["id"] for s in listed] == [first["id"], second["id"]]
    for s in listed:
        assert {"id", "time", "paths", "device", "size"} <= set(s)
        assert s["time"][:2] == "20" and "T" in s["time"]
    assert listed[1]["size"] == listed[0]["size"] + 4
    cli("restore", first["id"][:6], "--to", str(tmp_path / "old"))
    assert not (tmp_path / "old" / "src" / "docs" / "new.txt").exists()
    assert (tmp_path / "old" / "src" / "docs" / "a.txt").exists()
    human = cli("snapshots").stdout
    assert first["short_id"] in human and second["short_id"] in human


def test_unchanged_files_are_not_read_again(cli: Cli, sample_tree: Path):
    cli("init", "--source", str(sample_tree))
    cli("snapshot")
    out = cli("snapshot").stdout
    assert " 0 new, 0 changed, " in out and "added 0 B (0 blobs, 0 packs)" in out
    with open(sample_tree / "big.bin", "r+b") as f:
        f.seek(1_000_000)
        f.write(b"CHANGED")
    out = cli("snapshot").stdout
    assert "0 new, 1 changed," in out
    blobs = int(out.split("(")[1].split(" blobs")[0])
    assert 1 <= blobs <= 4  # the changed chunk and the trees above it, not the whole file


def test_unchanged_subtrees_keep_their_tree_ids(cli: Cli, sample_tree: Path):
    import asyncio

    from p2pbackup.device import open_device

    cli("init", "--source", str(sample_tree))
    cli("snapshot")
    (sample_tree / "new-top-level.txt").write_text("x")
    cli("snapshot")

    async def roots():
        async with open_device(cli.home) as dev:
            snaps, _ = await dev.repo.list_snapshots()
            trees = [await dev.repo.load_tree(s.snapshot.sources[0].tree) for s in snaps]
            return [{e.name: e.subtree for e in t.entries if e.type == "d"} for t in trees]

    a, b = asyncio.run(roots())
    assert a == b  # docs/ and empty-dir/ unchanged: same tree ids


def test_restore_refuses_to_overwrite_and_resumes(cli: Cli, sample_tree: Path, tmp_path: Path):
    cli("init", "--source", str(sample_tree))
    cli("snapshot")
    target = tmp_path / "out"
    cli("restore", "latest", "--to", str(target))
    again = cli("restore", "latest", "--to", str(target)).stdout
    assert "0 files (" in again and "already complete" in again
    (target / "src" / "docs" / "a.txt").write_text("local edit")
    refused = cli("restore", "latest", "--to", str(target), check=False)
    assert refused.returncode == 18 and "--overwrite" in refused.stderr
    assert (target / "src" / "docs" / "a.txt").read_text() == "local edit"
    cli("restore", "latest", "--to", str(target), "--overwrite")
    assert tree_state(target / "src") == tree_state(sample_tree)


def test_restore_one_path(cli: Cli, sample_tree: Path, tmp_path: Path):
    cli("init", "--source", str(sample_tree))
    cli("snapshot")
    cli("restore", "latest", "--to", str(tmp_path / "o1"), "--path", "docs/deep")
    got = sorted(p.relative_to(tmp_path / "o1") for p in (tmp_path / "o1").rglob("*"))
    assert [str(p) for p in got] == ["src", "src/docs", "src/docs/deep", "src/docs/deep/er",
                                     "src/docs/deep/er/b.json"]
    cli("restore", "latest", "--to", str(tmp_path / "o2"), "--path", "src/big.bin")
    assert (tmp_path / "o2" / "src" / "big.bin").read_bytes() == (sample_tree / "big.bin").read_bytes()
    missing = cli("restore", "latest", "--to", str(tmp_path / "o3"), "--path", "nope", check=False)
    assert missing.returncode == 17 and "not in this snapshot" in missing.stderr


def test_fifos_devices_xattrs_acls_and_holes_restore_exactly(cli: Cli, tmp_path: Path):
    """Restic-like fidelity: FIFOs and (as root) device nodes are recorded and made again,
    extended attributes and POSIX ACLs come back, a sparse file keeps its holes; a socket is
    skipped without a word, and none of it makes the snapshot exit 3."""
    src = make_fidelity_tree(tmp_path / "src")
    cli("init", "--source", str(src))
    proc = cli("snapshot", check=False)
    assert (proc.returncode, proc.stderr) == (0, "")
    out = tmp_path / "out"
    proc = cli("restore", "latest", "--to", str(out), check=False)
    assert proc.returncode == 0 and "warning" not in proc.stderr \
        and "notice" not in proc.stderr, proc.stderr
    restored = out / "src"
    assert tree_state(restored) == tree_state(src)
    assert xattrs_of(restored) == xattrs_of(src) != {}  # the source folder's own
    assert not (restored / "dir" / "a-socket").exists()
    sparse, original = os.stat(restored / "sparse.img"), os.stat(src / "sparse.img")
    assert sparse.st_size == 64 * 1024 * 1024
    assert original.st_blocks <= sparse.st_blocks <= original.st_blocks + 512  # +256 KiB
    assert "no problems found" in cli("verify", "--read-data").stdout
    again = cli("restore", "latest", "--to", str(out), check=False)  # all there: no conflict
    assert again.returncode == 0, again.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown files and switch users")
def test_owners_are_restored_when_root(cli: Cli, sample_tree: Path, tmp_path: Path):
    os.chown(sample_tree / "docs" / "a.txt", 1234, 5678)
    os.lchown(sample_tree / "dangling", 4321, 8765)
    cli("init", "--source", str(sample_tree))
    cli("snapshot")
    cli("restore", "latest", "--to", str(tmp_path / "out"))
    st = os.stat(tmp_path / "out" / "src" / "docs" / "a.txt")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    st = os.lstat(tmp_path / "out" / "src" / "dangling")
    assert (st.st_uid, st.st_gid) == (4321, 8765)


def test_the_top_folder_of_a_source_keeps_its_mode_owner_and_mtime(cli: Cli, sample_tree: Path,
                                                                   tmp_path: Path):
    os.chmod(sample_tree, 0o751)
    if os.geteuid() == 0:
        os.chown(sample_tree, 1234, 5678)
    os.utime(sample_tree, ns=(1_400_000_000_000_000_003, 1_400_000_000_000_000_003))
    cli("init", "--source", str(sample_tree))
    cli("snapshot")
    cli("restore", "latest", "--to", str(tmp_path / "out"))
    cli("restore", "latest", "--to", str(tmp_path / "part"), "--path", "docs/deep")

    def meta(p: Path) -> tuple:
        st = os.lstat(p)
        return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns

    assert meta(tmp_path / "out" / "src") == meta(sample_tree)
    # --path: the folders above the part restored come back as they were too
    assert meta(tmp_path / "part" / "src") == meta(sample_tree)
    assert meta(tmp_path / "part" / "src" / "docs") == meta(sample_tree / "docs")


@pytest.fixture
def shared_tmp():
    """A temporary directory other users can enter (pytest's own is private to root)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="p2pb-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_unreadable_file_is_a_warning_and_the_snapshot_completes(shared_tmp: Path):
    """Run as an unprivileged user so that mode 000 really blocks reading."""
    import pwd
    import shutil
    import subprocess
    import sys

    from tests.conftest import make_sample_tree

    tmp_path = shared_tmp
    sample_tree = make_sample_tree(tmp_path / "src")
    secret = sample_tree / "docs" / "secret.txt"
    secret.write_text("no")
    os.chmod(secret, 0)
    prefix: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for p in [tmp_path, *tmp_path.rglob("*")]:
            if p != secret:
                os.lchown(p, nobody.pw_uid, nobody.pw_gid)
        assert shutil.which("setpriv")
        prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                  "--clear-groups"]
        probe = subprocess.run([*prefix, sys.executable, "-c", "import p2pbackup.cli.main"],
                               capture_output=True, text=True, cwd=str(tmp_path))
        if probe.returncode != 0:
            pytest.skip("user nobody cannot run this checkout's interpreter (a private "
                        f"directory above it?): {probe.stderr.strip()[-200:]}")
    env = dict(os.environ, P2PBACKUP_HOME=str(tmp_path / "home"), HOME=str(tmp_path))
    base = [*prefix, sys.executable, "-m", "p2pbackup.cli.main"]
    run = lambda *a: subprocess.run([*base, *a], env=env, capture_output=True, text=True,  # noqa: E731
                                    cwd=str(tmp_path))
    assert run("init", "--source", str(sample_tree)).returncode == 0
    proc = run("snapshot")
    assert proc.returncode == 3, proc.stderr
    assert "cannot read" in proc.stderr and "secret.txt" in proc.stderr
    listed = run("snapshots", "--json")
    assert len(__import__("json").loads(listed.stdout)) == 1


@pytest.fixture
def ramfs(tmp_path: Path):
    """A ramfs mount: a file system that keeps no extended attributes at all."""
    import subprocess

    path = tmp_path / "ramfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "p2pb-test", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a ramfs and make devices")
def test_metadata_the_target_cannot_take_is_a_notice_a_missing_device_node_exit_3(
        cli: Cli, tmp_path: Path, ramfs: Path):
    import stat as st
    import subprocess

    src = tmp_path / "src"
    src.mkdir()
    (src / "tagged.txt").write_text("x\n")
    try:
        os.setxattr(src / "tagged.txt", "user.k", b"v")
    except OSError as exc:
        pytest.skip(f"{src} keeps no user.* attributes: {exc.strerror}")
    os.mknod(src / "null", st.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(src / "fifo")
    cli("init", "--source", str(src))
    cli("snapshot")
    # Extended attributes the target file system cannot keep: the files are restored, each
    # is named in a notice, and the restore is complete (exit 0).
    proc = cli("restore", "latest", "--to", str(ramfs), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "notice: " in proc.stderr and "tagged.txt: extended attributes not restored: " \
        "user.k (Operation not supported)" in proc.stderr and "warning" not in proc.stderr
    assert (ramfs / "src" / "tagged.txt").read_text() == "x\n"
    # Without the right to make device nodes: the node is named as not restored and the
    # restore is partial (exit 3: a script must not take it for a complete one).
    out = tmp_path / "out"
    proc = subprocess.run(["setpriv", "--bounding-set", "-mknod", "--inh-caps", "-mknod",
                           *cli.argv("restore", "latest", "--to", str(out))], env=cli.env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "null: device node 1,3 not restored: making one needs root (CAP_MKNOD)" \
        in proc.stderr
    assert st.S_ISFIFO(os.lstat(out / "src" / "fifo").st_mode)
    assert (out / "src" / "tagged.txt").read_text() == "x\n"
    assert not (out / "src" / "null").exists()
