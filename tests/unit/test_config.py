"""config.toml: source names must be usable as one folder name under `restore --to`."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from p2pbackup.config import load_config
from p2pbackup.errors import ConfigError


def _home(tmp_path: Path, sources: list[dict]) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(tomli_w.dumps({"version": 1, "sources": sources}))
    return home


@pytest.mark.parametrize("name", ["../x", "/abs", "", ".", "..", "a/b", "x\0y"])
def test_source_names_that_are_not_one_plain_folder_name_are_refused(tmp_path: Path, name: str):
    home = _home(tmp_path, [{"name": "docs", "path": "/d"}, {"name": name, "path": "/x"}])
    with pytest.raises(ConfigError, match=r"sources\[1\].*one plain folder name"):
        load_config(home)


def test_two_sources_of_one_name_are_refused(tmp_path: Path):
    home = _home(tmp_path, [{"name": "docs", "path": "/a"}, {"name": "docs", "path": "/b"}])
    with pytest.raises(ConfigError, match=r"sources\[1\].*'docs'.*sources\[0\]"):
        load_config(home)


def test_plain_names_are_kept(tmp_path: Path):
    home = _home(tmp_path, [{"name": "docs", "path": "/a"}, {"name": "..hidden", "path": "/b"},
                            {"name": "naïve – x", "path": "/c"}])
    assert [s.name for s in load_config(home).sources] == ["docs", "..hidden", "naïve – x"]


@pytest.mark.parametrize("web, error", [
    ({"listen": "0.0.0.0"}, r"web.listen.*127.0.0.1, ::1"),
    ({"port": 70000}, r"web.port"),
    ({"enabled": "yes"}, r"web.enabled"),
    ({"socket": "web.sock"}, r"web.socket' needs 'web.url"),
    ({"socket": "web.sock", "url": "https://backup.example.org/console"}, r"no path"),
])
def test_the_web_console_listens_on_loopback_only(tmp_path: Path, web: dict, error: str):
    home = _home(tmp_path, [])
    with open(home / "config.toml", "a") as f:
        f.write(tomli_w.dumps({"web": web}))
    with pytest.raises(ConfigError, match=error):
        load_config(home)


def test_web_console_defaults(tmp_path: Path):
    web = load_config(_home(tmp_path, [])).web
    assert (web.enabled, web.port, web.listen) == (True, 0, "127.0.0.1")
