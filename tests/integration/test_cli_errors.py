"""Errors are one line with a distinct exit code; --debug adds the traceback."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Cli


def test_config_error_names_the_key_and_file(cli: Cli, sample_tree: Path):
    cli("init", "--source", str(sample_tree))
    cfg = cli.home / "config.toml"
    cfg.write_text(cfg.read_text().replace('store = "store"', "store = 5"))
    proc = cli("snapshot", check=False)
    assert proc.returncode == 10
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "key 'store'" in lines[0] and str(cfg) in lines[0]
    cfg.write_text("this is = = not toml")
    proc = cli("snapshots", check=False)
    assert proc.returncode == 10 and "not valid TOML" in proc.stderr


def test_debug_shows_the_traceback(cli: Cli):
    plain = cli("snapshots", check=False)
    debug = cli("--debug", "snapshots", check=False)
    assert plain.returncode == debug.returncode == 10
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr


def test_init_rejects_a_missing_source(cli: Cli, tmp_path: Path):
    proc = cli("init", "--source", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 10 and "is not a directory" in proc.stderr
    assert not (cli.home / "keys").exists()


def test_usage_error_is_not_a_traceback(cli: Cli):
    proc = cli("restore", "latest", check=False)  # --to is required
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--to" in proc.stderr


def test_a_bad_peer_setting_is_one_line_naming_it(cli: Cli, sample_tree: Path):
    cli("init", "--source", str(sample_tree))
    cfg = cli.home / "config.toml"
    original = cfg.read_text()
    for value in ("0", "-1", '"soon"', "true"):
        cfg.write_text(original + f"\n[peers]\nstall_timeout = {value}\n")
        proc = cli("snapshots", check=False)
        assert proc.returncode == 10, value
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "key 'peers.stall_timeout'" in lines[0]
    cfg.write_text(original + "\n[peers]\nstall_timeout = 2.5\n")
    assert cli("snapshots").returncode == 0


def test_restore_to_a_file_is_one_line_with_its_exit_code(cli: Cli, sample_tree: Path,
                                                          tmp_path: Path):
    cli("init", "--source", str(sample_tree))
    snap = json.loads(cli("snapshot", "--json").stdout)
    f = tmp_path / "a-file"
    f.write_text("mine\n")
    for to in (f, f / "below"):
        proc = cli("restore", snap["id"], "--to", str(to), check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 18 and len(lines) == 1, proc.stderr
        assert f"{f} is not a directory" in lines[0]
    assert f.read_text() == "mine\n"


def test_a_source_name_that_is_not_one_plain_folder_name_is_refused(cli: Cli, sample_tree: Path):
    cli("init", "--source", str(sample_tree))
    cfg = cli.home / "config.toml"
    cfg.write_text(cfg.read_text().replace('name = "src"', 'name = "../src"'))
    proc = cli("snapshot", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 10 and len(lines) == 1
    assert "sources[0]" in lines[0] and "'../src'" in lines[0] and str(cfg) in lines[0]


def _only_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr and "internal error" not in stderr, stderr
    return lines[0]


def test_debug_after_the_command_shows_the_traceback(cli: Cli):
    proc = cli("snapshots", "--debug", check=False)
    assert proc.returncode == 10 and "Traceback" in proc.stderr, proc.stderr


def test_a_path_named_debug_after_double_dash_is_a_path(cli: Cli, sample_tree: Path,
                                                          tmp_path: Path):
    import json
    import subprocess

    cli("init", "--source", str(sample_tree))
    (tmp_path / "--debug").mkdir()
    (tmp_path / "--debug" / "f.txt").write_text("x\n")
    proc = subprocess.run(cli.argv("snapshot", "--json", "--", "--debug"), cwd=tmp_path,
                          env=cli.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["paths"] == [str(tmp_path / "--debug")]
    assert "Traceback" not in proc.stderr


def test_version_names_the_installed_package(cli: Cli):
    from importlib.metadata import version

    proc = cli("--version", check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == f"p2pbackup {version('p2pbackup')}"


def test_a_recovery_code_with_a_typo_is_one_line_and_exit_15(cli: Cli, sample_tree: Path,
                                                             tmp_path: Path):
    from p2pbackup.crypto import recovery

    cli("init", "--source", str(sample_tree))
    code = recovery.encode((cli.home / "keys" / "account.key").read_bytes())
    typo = ("1" if code[0] != "1" else "2") + code[1:]
    (tmp_path / "code").write_text(typo)
    new = Cli(tmp_path / "new-home")
    proc = new("recover", "--from", str(cli.home / "store"), "--recovery-code-file",
               str(tmp_path / "code"), check=False)
    assert proc.returncode == 15
    assert "typo" in _only_line(proc.stderr)
    assert not (new.home / "config.toml").exists()


def test_status_json_says_the_daemon_is_not_running(cli: Cli, sample_tree: Path):
    import json

    cli("init", "--source", str(sample_tree))
    proc = cli("status", "--json", check=False)
    assert proc.returncode == 19
    st = json.loads(proc.stdout)
    assert st["running"] is False and "not running" in st["error"]


def test_an_empty_config_is_refused_in_one_line(cli: Cli, sample_tree: Path):
    cli("init", "--source", str(sample_tree))
    cfg = cli.home / "config.toml"
    for empty in ("", "\n# nothing here\n"):
        cfg.write_text(empty)
        proc = cli("snapshots", check=False)
        assert proc.returncode == 10
        line = _only_line(proc.stderr)
        assert str(cfg) in line and "empty" in line


def test_snapshot_of_a_missing_directory_is_one_line_and_exit_17(cli: Cli, sample_tree: Path,
                                                                tmp_path: Path):
    cli("init", "--source", str(sample_tree))
    missing = tmp_path / "no-such-dir"
    proc = cli("snapshot", str(sample_tree), str(missing), check=False)
    assert proc.returncode == 17
    assert str(missing) in _only_line(proc.stderr)
    assert cli("snapshots").stdout.strip() == "no snapshots yet"


def test_a_truncated_store_config_is_damage_not_a_wrong_key(cli: Cli, sample_tree: Path):
    cli("init", "--source", str(sample_tree))
    config = cli.home / "store" / "config"
    whole = config.read_bytes()
    for cut in (len(whole) // 2, len(whole) - 1, 10, 3, 0):
        config.write_bytes(whole[:cut])
        proc = cli("snapshots", check=False)
        assert proc.returncode == 13, (cut, proc.stderr)
        line = _only_line(proc.stderr)
        assert "damaged" in line and "another account" not in line, line
    config.write_bytes(whole)
    assert cli("snapshots").returncode == 0
