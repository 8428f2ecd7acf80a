"""The `p2pbackup` command line (typer)."""
