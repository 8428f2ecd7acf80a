"""Finding peers: `mdns` (zeroconf on the LAN); the broker client will live here too.

Import the submodules directly: importing this package does not load zeroconf.
"""
