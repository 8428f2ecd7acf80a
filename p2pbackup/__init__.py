"""p2pbackup: peer-to-peer, end-to-end encrypted backup and restore for your own devices."""

__version__ = "0.1.0"
