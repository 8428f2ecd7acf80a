"""The backup engine's real repository fixture (local store, SQLite index), for attacks on it."""

from tests.unit.backup.conftest import repo  # noqa: F401
