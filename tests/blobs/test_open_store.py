"""open_store: the one place that turns a location into a store."""

from pathlib import Path

import pytest

from p2pbackup.blobs import open_store
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.blobs.quota import QuotaStore
from p2pbackup.errors import ConfigError


def test_a_path_opens_a_local_directory_store(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    assert isinstance(store, LocalDirStore) and store.root == str(tmp_path / "s")
    assert store.capabilities.blocking and store.capabilities.local_disk


@pytest.mark.parametrize("location", ["ftp://host/x", "gopher://h"])
def test_an_unknown_scheme_is_one_config_error_naming_the_store(location: str) -> None:
    with pytest.raises(ConfigError, match=f"store {location}: .*not supported"):
        open_store(location)


def test_a_peer_location_is_refused_with_a_reason() -> None:
    with pytest.raises(ConfigError, match="store peer:laptop: a peer's store"):
        open_store("peer:laptop")


def test_a_quota_store_never_offers_the_fast_path_past_its_quota(tmp_path: Path) -> None:
    store = QuotaStore(LocalDirStore(tmp_path), 10)
    assert not store.capabilities.blocking and not store.capabilities.local_disk
    assert store.capabilities.ranged_reads == LocalDirStore.capabilities.ranged_reads
