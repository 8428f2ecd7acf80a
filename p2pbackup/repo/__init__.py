"""The object model on top of a BlobStore: packs, the pack index, snapshots, devices."""
