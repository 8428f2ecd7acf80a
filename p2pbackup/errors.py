"""The few exception types p2pbackup raises; each message is something a person can act on.

Like borg, each class's docstring is its message template and each class has its own exit
code; the CLI catches `P2PError` in one place and prints one line.
"""

from __future__ import annotations


class P2PError(Exception):
    """{}"""

    exit_code = 1

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.args_for_message = args

    def __str__(self) -> str:
        template = (type(self).__doc__ or "{}").strip().splitlines()[0]
        try:
            return template.format(*self.args_for_message)
        except (IndexError, KeyError):
            return " ".join(str(a) for a in self.args_for_message) or template


class ConfigError(P2PError):
    """{}"""

    exit_code = 10


class StorageError(P2PError):
    """{}"""

    exit_code = 11


class DiskFull(StorageError):
    """No space left on the device holding {}: free some space and run the command again (nothing already stored was lost)."""

    exit_code = 12


class StoreFailed(P2PError):
    """{}"""

    # Another error's words with the store it happened at and what was kept meanwhile (the
    # snapshot `snapshot --push` saved), and that error's exit code: the same meaning to a
    # user, so a full store stays 12 and a refused device 23 (repo/upload.py store_error).
    def __init__(self, line: str, exit_code: int) -> None:
        super().__init__(line)
        self.exit_code = exit_code

    def __reduce__(self):
        return type(self), (str(self), self.exit_code)


class IntegrityError(P2PError):
    """{}"""

    exit_code = 13


class BlobDamaged(IntegrityError):
    """{}"""

    # An IntegrityError that says which stored blob failed, so that a caller that can heal
    # (the daemon) need not read it out of the message. Same exit code: same meaning to a user.
    def __init__(self, message: str, pack: str = "", blob: bytes = b"") -> None:
        super().__init__(message)
        self.pack, self.blob = pack, blob

    def __reduce__(self):  # restore workers are processes: it must cross a pipe whole
        return type(self), (str(self), self.pack, self.blob)


class NameMismatch(IntegrityError):
    """{}"""

    # An object whose content does not match its (content-addressed) name. Told apart from
    # other refusals so that the peer that sent it checks its own copy, which may have
    # rotted, and not for a refusal about anything else (a quota, who may write what).


class ObjectChanged(IntegrityError):
    """{}"""

    # Other bytes offered under a name already held: objects never change. Told apart so
    # that the storage server answers it as a conflict (409), not as malformed input.


class UnsupportedFormat(P2PError):
    """{} was written by a newer p2pbackup (format v{}); upgrade to read it."""

    exit_code = 14


class WrongKey(P2PError):
    """{}"""

    exit_code = 15


class RepositoryLocked(P2PError):
    """Another p2pbackup (pid {}) is writing to {}; wait for it to finish."""

    exit_code = 16


class DaemonRunning(RepositoryLocked):
    """p2pbackupd (pid {}) is running and uploads to the stores itself; `p2pbackup status` shows how far it is."""


class NotFound(P2PError):
    """{}"""

    exit_code = 17


class RestoreConflict(P2PError):
    """{}"""

    exit_code = 18


class DaemonNotRunning(P2PError):
    """p2pbackupd is not running for {} (start it, e.g. `systemctl --user start p2pbackupd`)."""

    exit_code = 19


class LocalProtocolError(P2PError):
    """{}"""

    exit_code = 20


class RemoteProtocolError(P2PError):
    """{}"""

    exit_code = 21


class PeerUnreachable(P2PError):
    """{}"""

    exit_code = 22


class PeerNotPaired(P2PError):
    """{}"""

    exit_code = 23


class PairingFailed(P2PError):
    """{}"""

    exit_code = 24


# Exit code of a snapshot that completed but could not read some files (restic uses 3 too).
EXIT_PARTIAL = 3
