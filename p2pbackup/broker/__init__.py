"""The broker service (p2pbackup-broker): accounts, devices, signaling relay, push, TURN
credentials."""
