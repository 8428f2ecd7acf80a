"""The order `account delete` empties a store in: its config first, so a deletion cut short
leaves objects that no longer open as an account (never an account with data missing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pbackup import account_delete
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.errors import StorageError
from p2pbackup.ids import object_kind
from tests.adversary import accounts


class FailingAfter(LocalDirStore):
    """A directory store whose deletes fail after `n` (a store lost mid-way)."""

    def __init__(self, root: Path, n: int) -> None:
        super().__init__(root)
        self.left = n

    async def delete(self, name: str) -> None:
        if self.left == 0:
            raise StorageError(f"store {self.location}: cannot reach it any more")
        self.left -= 1
        await super().delete(name)


async def test_a_deletion_cut_short_leaves_a_store_without_its_config(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a file\n")
    await accounts.make_owner(tmp_path / "home", [src])
    await accounts.snapshot(tmp_path / "home")
    store = FailingAfter(tmp_path / "usb", 1)
    home = LocalDirStore(tmp_path / "home" / "store")
    async for name in home.list(""):
        if object_kind(name) is not None:
            await store.put(name, await home.get(name))
    with pytest.raises(StorageError, match="cannot reach it any more"):
        await account_delete._delete_from(store, None)   # type: ignore[arg-type]
    left = [n async for n in store.list("")]
    assert "config" not in left and len(left) > 3
