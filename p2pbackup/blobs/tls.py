"""The TLS check of a remote store's HTTPS client (WebDAV, the storage server)."""

from __future__ import annotations

import ssl

from ..errors import ConfigError


def client_tls(location: str, ca_file: str | None) -> ssl.SSLContext | bool:
    """The system's trusted certificates (True), or a context trusting the PEM `ca_file` that
    vouches for a server with a certificate of its own (self-signed); an unreadable file is
    one line naming the store and the file."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"store {location}: ca_file {ca_file} is not a readable PEM "
                          f"certificate ({exc})") from None
