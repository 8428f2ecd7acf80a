"""Removal records with an account set (an account deletion): written and read back, and
still version 1 for readers from before the field."""

from __future__ import annotations

import time

import msgpack
import pytest

from p2pbackup.crypto.identity import DeviceIdentity, verify_signature
from p2pbackup.errors import IntegrityError
from p2pbackup.format.cleartext import open_clear
from p2pbackup.format.header import Kind
from p2pbackup.format.removal import Removal, read_removal, removal_object


def test_an_account_deletion_reads_back_with_its_account_and_stays_version_1() -> None:
    owner = DeviceIdentity.generate()
    data = removal_object(Removal(owner.device_id, time.time_ns(), (), "0123456789abcdef"),
                          owner.sign)
    got = read_removal(data, {owner.device_id: owner.public_key}.get, verify_signature)
    assert got.account == "0123456789abcdef" and got.names == ()
    # What a reader from before the field checks: v 1, device, time, names (none).
    doc = msgpack.unpackb(open_clear(data, Kind.REMOVAL, "removal record", "r").body)
    assert doc["v"] == 1 and doc["names"] == [] and doc["device"] == owner.device_id


def test_a_plain_removal_record_deletes_no_account() -> None:
    owner = DeviceIdentity.generate()
    data = removal_object(Removal(owner.device_id, time.time_ns(), ()), owner.sign)
    got = read_removal(data, {owner.device_id: owner.public_key}.get, verify_signature)
    assert got.account == ""
    doc = msgpack.unpackb(open_clear(data, Kind.REMOVAL, "removal record", "r").body)
    assert "account" not in doc   # byte for byte what versions before it wrote


def test_an_account_deletion_naming_no_fingerprint_is_refused() -> None:
    owner = DeviceIdentity.generate()
    data = removal_object(Removal(owner.device_id, time.time_ns(), (), "../../etc"),
                          owner.sign)
    with pytest.raises(IntegrityError, match="not an account fingerprint"):
        read_removal(data, {owner.device_id: owner.public_key}.get, verify_signature)
