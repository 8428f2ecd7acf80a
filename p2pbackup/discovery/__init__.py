"""Finding peers: `mdns` (zeroconf on the LAN) and `broker` (the broker client).

Import the submodules directly: importing this package does not load zeroconf.
"""
