"""Scan and capture (files, live SQLite), build snapshots; restore; verify."""
