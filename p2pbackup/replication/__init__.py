"""Replication: running sync sessions between this device's store and its peers'."""
