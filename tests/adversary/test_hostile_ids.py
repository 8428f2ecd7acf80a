"""Ids inside objects from other devices become file names: anything but their exact form
(hex of the right length, ASCII digits) is refused before it touches a path."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from p2pbackup import ids
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.crypto.identity import DeviceIdentity, verify_signature
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.errors import IntegrityError
from p2pbackup.format.removal import Removal, read_removal, removal_object
from p2pbackup.repo import replica
from p2pbackup.repo.repository import Repository

OWNER = DeviceIdentity.generate()
DEV = "0123456789abcdef" * 2


def test_ids_have_exactly_one_form():
    assert ids.is_account("0123456789abcdef") and ids.is_device(DEV)
    for bad in ("..", "../x", "/abs", "a/b", "0123456789abcdef0", "0123456789abcdeg",
                "0123456789ABCDEF", "", " 0123456789abcdef", "0123456789abcdef\n", None, 7,
                b"0123456789abcdef"):
        assert not ids.is_account(bad), bad
    assert not ids.is_device(DEV[:-1]) and not ids.is_device(DEV + "0")


def test_object_names_with_unicode_digits_or_paths_are_not_object_names():
    arabic = "\u0661" * 12   # ARABIC-INDIC DIGIT ONE: a regex \d matches it
    for name in (f"membership/{arabic}", f"segments/{DEV}/{arabic}", "keyring/\u0660" * 1,
                 f"keyring/{arabic[:6]}", f"segments/{DEV}/../../keys", "packs/" + "ab" * 32 + "/",
                 "heads/" + DEV.upper(), f"devices/{DEV}/x", "config/x", "../config"):
        assert not replica.is_object_name(name), name
    assert replica.is_object_name("membership/000000000001")
    assert replica.is_object_name(f"segments/{DEV}/000000000007")


def test_a_removal_record_cannot_name_paths_or_odd_names_for_deletion():
    listed = ("packs/" + "ab" * 32, "packs/../../../etc/passwd", "snapshots/../config",
              "packs/x", "snapshots/" + "AB" * 32, f"segments/{DEV}/anchor",
              f"segments/{DEV}/" + "\u0661" * 12, f"segments/{DEV}/000000000003",
              "snapshots/" + "cd" * 32 + "/..")
    data = removal_object(Removal(OWNER.device_id, time.time_ns(), listed), OWNER.sign)
    got = read_removal(data, {OWNER.device_id: OWNER.public_key}.get, verify_signature)
    assert got.names == ("packs/" + "ab" * 32, f"segments/{DEV}/000000000003")


async def test_a_signer_named_with_a_path_is_refused_before_any_file_is_read(tmp_path: Path):
    keys = AccountKeys(os.urandom(32))
    repo = await Repository.create(LocalDirStore(tmp_path / "s"), keys, OWNER,
                                   str(tmp_path / "c"), "a")
    try:
        for signer in ("../../keys/account", "a" * 31 + "/", DEV.upper()):
            with pytest.raises(IntegrityError, match="not a device id"):
                await repo.device_key(signer)
    finally:
        await repo.close()


def test_a_list_prefix_from_a_peer_never_walks_outside_the_store(tmp_path: Path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "account.key").write_bytes(b"secret")
    store = LocalDirStore(tmp_path / "store")
    store.put_sync("packs/" + "ab" * 32, b"x")
    for prefix in ("../", "..", "../keys/", "./../keys", "/", "/etc/"):
        assert store.list_sync(prefix) == [], prefix
    assert store.list_sync("packs/") == ["packs/" + "ab" * 32]
