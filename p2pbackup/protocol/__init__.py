"""The peer sync protocol, sans-I/O (no asyncio, no sockets)."""
