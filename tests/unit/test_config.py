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


def _stores_home(tmp_path: Path, stores: object) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(tomli_w.dumps({"version": 1, "stores": stores}))
    return home


def test_store_tables_are_read_with_their_options(tmp_path: Path):
    home = _stores_home(tmp_path, [
        {"location": "/mnt/usb"},
        {"location": "s3://bucket/p", "bandwidth": "5MiB", "parallel": 8,
         "endpoint": "http://127.0.0.1:9000", "path_style": True}])
    usb, s3 = load_config(home).stores
    assert (usb.location, usb.options, usb.bandwidth, usb.parallel) == ("/mnt/usb", {}, None, 4)
    assert s3.bandwidth == 5 * 1024 * 1024 and s3.parallel == 8
    assert s3.options == {"endpoint": "http://127.0.0.1:9000", "path_style": True}


@pytest.mark.parametrize("stores, says", [
    ({"location": "/x"}, "'stores' must be an array of tables"),
    ([{"bandwidth": "1M"}], r"\[\[stores\]\] table 1 needs a 'location'"),
    ([{"location": ""}], r"\[\[stores\]\] table 1 needs a 'location'"),
    ([{"location": "/x"}, {"location": "/x"}], r"\[\[stores\]\] '/x' is listed twice"),
    ([{"location": "/x", "bandwidth": "fast"}], r"'/x': 'bandwidth' 'fast': give a size"),
    ([{"location": "/x", "bandwidth": 0}], r"'/x': 'bandwidth' '0' must be more than zero"),
    ([{"location": "/x", "parallel": 0}], r"'/x': 'parallel' = 0 must be a number of uploads"),
    ([{"location": "/x", "parallel": True}], r"'parallel' = True"),
    ([{"location": "/x", "region": ["a"]}], r"'/x': option 'region' must be a string"),
])
def test_a_bad_store_table_is_one_line_naming_it(tmp_path: Path, stores, says):
    home = _stores_home(tmp_path, stores)
    with pytest.raises(ConfigError, match=says) as got:
        load_config(home)
    assert "\n" not in str(got.value) and "config.toml" in str(got.value)


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
