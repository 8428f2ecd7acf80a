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
