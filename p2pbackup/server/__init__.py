"""The project's servers: the storage server (`p2pbackup-server`: storage.py, main.py)."""
