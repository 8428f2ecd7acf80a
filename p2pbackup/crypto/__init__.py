"""Key hierarchy, AEAD, signatures and recovery codes (sans-I/O: bytes in, bytes out)."""
