"""The device daemon `p2pbackupd` (config, scheduler, watcher, replicator, control API)."""
