"""P2PBACKUP_HOME and config.toml: read once, passed down as frozen dataclasses.

This is the only module that reads environment variables.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import tomli_w

from .crypto.identity import DeviceIdentity
from .crypto.keys import ACCOUNT_KEY_SIZE, AccountKeys
from .errors import ConfigError
from .format.records import is_plain_name
from .sizes import parse_size
from .transport.datachannel import IceServer

CONFIG_VERSION = 1


def default_home() -> Path:
    """P2PBACKUP_HOME, or the platform's per-user data directory."""
    env = os.environ.get("P2PBACKUP_HOME")
    if env:
        return Path(env).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_data_dir("p2pbackup"))


@dataclass(frozen=True, slots=True)
class Source:
    """A directory this device backs up; `name` also names its key scope."""

    name: str
    path: str


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """The `[daemon]` table: how often the log is sealed and the tree rescanned."""

    seal_interval: float = 60.0  # seconds
    seal_bytes: int = 64 * 1024 * 1024
    rescan_interval: float = 3600.0  # seconds; the safety net under inotify
    snapshot_interval: float = 86400.0  # seconds between roll-up snapshots
    # seconds; how often the folders inotify cannot watch (past the kernel's limit on watches)
    # are rescanned: their changes are seen that late
    unwatched_rescan_interval: float = 300.0


@dataclass(frozen=True, slots=True)
class IceSettings:
    """The `[ice]` table: STUN/TURN servers for data channels that must cross NATs.

    No servers: host candidates only (a LAN). aioice uses one STUN and one TURN server of the
    list; `relay_only` sends everything through TURN (hides this device's addresses from peers).
    """

    servers: tuple[IceServer, ...] = ()
    relay_only: bool = False


@dataclass(frozen=True, slots=True)
class StaticAddress:
    """A `[peers.addresses]` entry: where a device's signaling endpoint is, without mDNS
    (a port its home router forwards, like Syncthing's static addresses)."""

    device: str     # a device id or a unique prefix of one
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class PeerSettings:
    """The `[peers]` table: finding and reaching the account's other devices."""

    lan: bool = True            # advertise and browse with mDNS, answer on the LAN
    port: int = 0               # signaling endpoint; 0 = any free port (mDNS carries it)
    direct_lane: bool = True    # bulk over TLS when the peer is on the LAN
    interfaces: tuple[str, ...] = ()   # mDNS interfaces (names); empty = all
    removal_grace: float = 7 * 86400   # seconds before a peer deletes what an owner removed
    stall_timeout: float = 30.0        # seconds with no byte from a peer we wait on: ask again
    handshake_timeout: float = 10.0    # seconds a connection to our ports has to authenticate
    addresses: tuple[StaticAddress, ...] = ()   # [peers.addresses]: dialed when not on the LAN
    ice: IceSettings = IceSettings()   # the [ice] table (kept here: whoever dials needs both)

    @classmethod
    def from_env(cls) -> "PeerSettings":
        """The defaults, as P2PBACKUP_LAN leaves them (for a device with no config yet)."""
        return cls(lan=not _lan_off())


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """The `[broker]` table: the account's broker (p2pbackup-broker), for signaling to devices
    that are not on the LAN and for pushes; empty `url`: none."""

    url: str = ""


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """One `[[stores]]` table: a location the daemon uploads this device's store to."""

    location: str
    # The table's other keys (endpoint, region, username, ...), passed to open_store as they are
    options: dict[str, Any] = field(default_factory=dict)
    bandwidth: int | None = None    # bytes per second; None: as fast as it goes
    parallel: int = 4               # uploads at once (DEFAULT_PARALLEL)


STORE_KEYS = ("location", "bandwidth", "parallel")   # the keys that are not backend options
DEFAULT_PARALLEL = 4
MAX_PARALLEL = 64


@dataclass(frozen=True, slots=True)
class WebSettings:
    """The `[web]` table: the local web console p2pbackupd serves."""

    enabled: bool = True
    # 0: a free port, picked at each start (`p2pbackup web` asks the daemon for the URL), so
    # several homes on one machine never fight over one.
    port: int = 0
    listen: str = "127.0.0.1"   # loopback only: 127.0.0.1 or ::1
    # Behind a reverse proxy instead: a Unix socket (relative to the home) and the address
    # the proxy serves it at, which is then the only Host and Origin the console accepts.
    socket: str = ""
    url: str = ""


WEB_LISTEN = ("127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class Config:
    """The parsed config.toml."""

    home: Path
    device_name: str
    store: Path
    sources: tuple[Source, ...]
    daemon: DaemonSettings = DaemonSettings()
    peers: PeerSettings = PeerSettings()
    stores: tuple[StoreSettings, ...] = ()
    web: WebSettings = WebSettings()
    broker: BrokerSettings = BrokerSettings()

    @property
    def account_key_file(self) -> Path:
        return self.home / "keys" / "account.key"

    @property
    def device_key_file(self) -> Path:
        return self.home / "keys" / "device.key"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def control_socket(self) -> Path:
        return self.home / "daemon.sock"


def _source_names(paths: list[str]) -> list[Source]:
    out: list[Source] = []
    used: set[str] = set()
    for p in paths:
        path = os.path.abspath(os.path.expanduser(p))
        base = os.path.basename(path.rstrip("/")) or "root"
        name, n = base, 2
        while name in used:
            name, n = f"{base}-{n}", n + 1
        used.add(name)
        out.append(Source(name, path))
    return out


def sources_for_paths(paths: list[str]) -> tuple[Source, ...]:
    """Name ad-hoc paths like configured sources: by their base name, made unique."""
    return tuple(_source_names(paths))


@dataclass(frozen=True, slots=True)
class SystemdSettings:
    """What systemd passes a Type=notify service: where to notify, how often to ping."""

    notify_socket: str | None
    watchdog_seconds: float | None


def systemd_settings() -> SystemdSettings:
    """Read NOTIFY_SOCKET and WATCHDOG_USEC (set by systemd, or by tests)."""
    sock = os.environ.get("NOTIFY_SOCKET") or None
    usec = os.environ.get("WATCHDOG_USEC", "")
    return SystemdSettings(sock, int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else None)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def init_home(home: Path, source_paths: list[str], *, keys: AccountKeys | None = None,
              identity: DeviceIdentity | None = None, keyless: bool = False,
              device_name: str | None = None) -> tuple[Config, bytes | None]:
    """Create a home; return its config and the account key to show once (None if given).

    `keys` are received by pairing or recovery; `keyless` makes a home that holds no account
    key (a storage partner for other accounts).
    """
    if (home / "config.toml").exists() or (home / "keys" / "account.key").exists():
        raise ConfigError(f"{home} is already set up; use another P2PBACKUP_HOME or remove it first")
    for p in source_paths:
        if not os.path.isdir(p):
            raise ConfigError(f"source {p!r} is not a directory")
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    (home / "keys").mkdir(mode=0o700, exist_ok=True)
    account_key = None
    if keyless:
        _write_private(home / "keys" / "partner-only", b"")
    elif keys is None:
        account_key = os.urandom(ACCOUNT_KEY_SIZE)
        _write_private(home / "keys" / "account.key", account_key)
    _write_private(home / "keys" / "device.key", (identity or DeviceIdentity.generate()).seed)
    sources = _source_names(source_paths)
    doc = {
        "version": CONFIG_VERSION,
        "device_name": device_name or socket.gethostname(),
        "store": "store",
        "sources": [{"name": s.name, "path": s.path} for s in sources],
    }
    tmp = home / "config.toml.tmp"
    tmp.write_bytes(tomli_w.dumps(doc).encode())
    os.replace(tmp, home / "config.toml")
    config = load_config(home)
    if keys is not None:
        save_keys(config, keys)
    return config, account_key


def save_keys(config: Config, keys: AccountKeys) -> None:
    """Write the keys this device holds (every epoch, or its granted sources), mode 0600."""
    path = config.home / "keys" / "keyring"
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    _write_private(tmp, msgpack.packb(keys.export(keys.sources_granted()), use_bin_type=True))
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_config(home: Path | None = None) -> Config:
    """Read `home`/config.toml; every problem is a ConfigError naming the key and the file."""
    home = home or default_home()
    path = home / "config.toml"
    if not path.exists():
        raise ConfigError(f"no p2pbackup home at {home} (no config.toml): run `p2pbackup init` "
                          "or set P2PBACKUP_HOME")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if not doc:  # truncated or blanked: defaults would silently back up nothing
        raise ConfigError(f"{path} is empty; `p2pbackup init` wrote this device's name, store "
                          "and sources there: put them back (from a copy) to use this home")
    version = doc.get("version", CONFIG_VERSION)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ConfigError(f"{path}: key 'version' = {version!r}; this p2pbackup reads version "
                          f"{CONFIG_VERSION}: upgrade p2pbackup")
    name = doc.get("device_name", socket.gethostname())
    if not isinstance(name, str):
        raise ConfigError(f"{path}: key 'device_name' must be a string")
    store = doc.get("store", "store")
    if not isinstance(store, str) or not store:
        raise ConfigError(f"{path}: key 'store' must be a directory path")
    sources = []
    raw = doc.get("sources", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: key 'sources' must be an array of tables")
    for i, s in enumerate(raw):
        if not isinstance(s, dict) or not isinstance(s.get("path"), str) \
                or not isinstance(s.get("name"), str):
            raise ConfigError(f"{path}: key 'sources[{i}]' needs a string 'name' and 'path'")
        # Restore writes a source to <target>/<name>, and snapshots carry the name as it is.
        if not is_plain_name(os.fsencode(s["name"])):
            raise ConfigError(f"{path}: key 'sources[{i}]' name {s['name']!r} must be one plain "
                              "folder name (not empty, '.' or '..'; no '/')")
        same = next((j for j, o in enumerate(sources) if o.name == s["name"]), None)
        if same is not None:
            raise ConfigError(f"{path}: key 'sources[{i}]' name {s['name']!r} is already the "
                              f"name of sources[{same}]; source names must differ")
        sources.append(Source(s["name"], s["path"]))
    return Config(home, name, (home / store).absolute(), tuple(sources),
                  _daemon_settings(doc.get("daemon", {}), path),
                  _peer_settings(doc.get("peers", {}), doc.get("ice", {}), path),
                  _store_settings(doc.get("stores", []), path),
                  _web_settings(doc.get("web", {}), path),
                  _broker_settings(doc.get("broker", {}), path))


def _broker_settings(table: object, path: Path) -> BrokerSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: key 'broker' must be a table")
    url = table.get("url", "")
    if not isinstance(url, str) or url and not re.fullmatch(r"https?://[^/\s]+/?", url):
        raise ConfigError(f"{path}: key 'broker.url' = {url!r} must be the broker's address, "
                          "e.g. \"https://broker.example.org\" (no path)")
    return BrokerSettings(url.rstrip("/"))


def _store_settings(raw: object, path: Path) -> tuple[StoreSettings, ...]:
    """The `[[stores]]` tables; a bad one is one line naming it (stores[i]) and the key."""
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: key 'stores' must be an array of tables ([[stores]])")
    out: list[StoreSettings] = []
    for i, t in enumerate(raw):
        where = f"{path}: [[stores]] table {i + 1}"
        if not isinstance(t, dict):
            raise ConfigError(f"{where} is not a table")
        location = t.get("location")
        if not isinstance(location, str) or not location.strip():
            raise ConfigError(f"{where} needs a 'location' (a path, s3://bucket/prefix, "
                              "webdavs://host/path, https://server/...)")
        where = f"{path}: [[stores]] {location!r}"
        if any(o.location == location for o in out):
            raise ConfigError(f"{where} is listed twice")
        bandwidth = t.get("bandwidth")
        if bandwidth is not None:
            if isinstance(bandwidth, bool) or not isinstance(bandwidth, (str, int)):
                raise ConfigError(f"{where}: 'bandwidth' = {bandwidth!r} must be bytes per "
                                  "second, e.g. \"5MiB\"")
            try:
                bandwidth = parse_size(str(bandwidth), "'bandwidth'")
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc} (bytes per second, e.g. \"5MiB\")") from None
        parallel = t.get("parallel", DEFAULT_PARALLEL)
        if isinstance(parallel, bool) or not isinstance(parallel, int) \
                or not 1 <= parallel <= MAX_PARALLEL:
            raise ConfigError(f"{where}: 'parallel' = {parallel!r} must be a number of uploads "
                              f"at once, from 1 to {MAX_PARALLEL}")
        options = {k: v for k, v in t.items() if k not in STORE_KEYS}
        for k, v in options.items():
            if not isinstance(v, (str, int, float, bool)):
                raise ConfigError(f"{where}: option {k!r} must be a string, number or "
                                  "true/false")
        out.append(StoreSettings(location, options, bandwidth, parallel))
    return tuple(out)


def edit_stores(home: Path, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
                ) -> Config:
    """Rewrite the `[[stores]]` tables of home/config.toml with `change` (given them as
    written); the result is checked before the file is replaced, atomically. Returns the
    config as it now reads. (Comments in the file are not kept.)"""
    path = home / "config.toml"
    load_config(home)   # the rest of the file must be sound before we write it back
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    stores = change([dict(t) for t in doc.get("stores", [])])
    _store_settings(stores, path)
    if stores:
        doc["stores"] = stores
    else:
        doc.pop("stores", None)
    return _rewrite(home, doc)


def _rewrite(home: Path, doc: dict[str, Any]) -> Config:
    """Replace home/config.toml with `doc`, atomically, mode 0600 (a store's options and a
    TURN credential may be secrets); returns the config as it now reads."""
    tmp = home / "config.toml.tmp"
    tmp.unlink(missing_ok=True)
    _write_private(tmp, tomli_w.dumps(doc).encode())
    os.replace(tmp, home / "config.toml")
    return load_config(home)


def read_ice_table(path: Path) -> tuple[IceSettings, dict[str, Any]]:
    """The `[ice]` table of a TOML file (another device's config.toml will do), checked."""
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("ice")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if table is None:
        raise ConfigError(f"{path} has no [ice] table (STUN/TURN servers)")
    return _ice_settings(table, path), table


def set_ice(home: Path, table: dict[str, Any]) -> Config:
    """Write `table` as the [ice] table of home/config.toml."""
    load_config(home)
    doc = tomllib.loads((home / "config.toml").read_text(encoding="utf-8"))
    doc["ice"] = table
    return _rewrite(home, doc)


def set_broker(home: Path, url: str) -> Config:
    """Write `url` as the [broker] url of home/config.toml."""
    load_config(home)
    doc = tomllib.loads((home / "config.toml").read_text(encoding="utf-8"))
    doc["broker"] = {**doc.get("broker", {}), "url": url}
    return _rewrite(home, doc)


def _web_settings(table: object, path: Path) -> WebSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: key 'web' must be a table")
    d = WebSettings()
    enabled = table.get("enabled", d.enabled)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{path}: key 'web.enabled' = {enabled!r} must be true or false")
    port = table.get("port", d.port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"{path}: key 'web.port' = {port!r} must be a port number (0: any)")
    listen = table.get("listen", d.listen)
    if listen not in WEB_LISTEN:
        raise ConfigError(f"{path}: key 'web.listen' = {listen!r} must be one of "
                          f"{', '.join(WEB_LISTEN)} (the console is for this machine only)")
    sock, url = table.get("socket", d.socket), table.get("url", d.url)
    if not isinstance(sock, str) or not isinstance(url, str):
        raise ConfigError(f"{path}: keys 'web.socket' and 'web.url' must be strings")
    if bool(sock) != bool(url) or url and not re.fullmatch(r"https?://[^/\s]+/?", url):
        raise ConfigError(f"{path}: key 'web.socket' needs 'web.url' too, the address your "
                          "reverse proxy serves the console at (e.g. "
                          "\"https://backup.example.org\", no path)")
    return WebSettings(enabled, port, listen, sock, url)


def host_port(text: str) -> tuple[str, int] | None:
    """("host", port) from "HOST:PORT" or "[V6]:PORT"; None if it is not that."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")


def _ice_settings(table: object, path: Path) -> IceSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: key 'ice' must be a table")
    relay_only = table.get("relay_only", False)
    if not isinstance(relay_only, bool):
        raise ConfigError(f"{path}: key 'ice.relay_only' = {relay_only!r} must be true or false")
    raw = table.get("servers", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: key 'ice.servers' must be a list of tables, e.g. "
                          '[{urls = "turn:turn.example.org:3478", username = "u", '
                          'credential = "p"}]')
    servers = []
    for i, t in enumerate(raw):
        where = f"{path}: key 'ice.servers[{i}]'"
        urls = t.get("urls") if isinstance(t, dict) else None
        urls = [urls] if isinstance(urls, str) else urls
        if not isinstance(urls, list) or not urls or not all(
                isinstance(u, str) and u.startswith(ICE_SCHEMES) for u in urls):
            raise ConfigError(f"{where} needs 'urls': \"stun:HOST:PORT\" or "
                              "\"turn:HOST:PORT\" (or a list of them)")
        user, cred = t.get("username"), t.get("credential")
        if not all(v is None or isinstance(v, str) for v in (user, cred)):
            raise ConfigError(f"{where}: 'username' and 'credential' must be strings")
        if any(u.startswith(("turn:", "turns:")) for u in urls) and (user is None or cred is None):
            raise ConfigError(f"{where}: a TURN server needs 'username' and 'credential'")
        servers.append(IceServer(urls[0] if len(urls) == 1 else tuple(urls), user, cred))
    if relay_only and not any(u.startswith(("turn:", "turns:"))
                              for s in servers for u in ((s.urls,) if isinstance(s.urls, str)
                                                         else s.urls)):
        raise ConfigError(f"{path}: key 'ice.relay_only' needs a TURN server in 'ice.servers'")
    return IceSettings(tuple(servers), relay_only)


def _static_addresses(table: object, path: Path) -> tuple[StaticAddress, ...]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: key 'peers.addresses' must be a table of DEVICE = "
                          '"HOST:PORT"')
    out = []
    for device, address in table.items():
        got = host_port(address) if isinstance(address, str) else None
        if not re.fullmatch(r"[0-9a-f]{4,32}", device) or got is None:
            raise ConfigError(f"{path}: key 'peers.addresses.{device}' must map a device id "
                              '(or its first characters, 4 or more) to "HOST:PORT", the '
                              "device's signaling port (`p2pbackup status` shows it)")
        out.append(StaticAddress(device, *got))
    return tuple(out)


def _peer_settings(table: object, ice: object, path: Path) -> PeerSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: key 'peers' must be a table")
    d = PeerSettings()
    lan, lane = table.get("lan", d.lan), table.get("direct_lane", d.direct_lane)
    for key, value in (("lan", lan), ("direct_lane", lane)):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: key 'peers.{key}' = {value!r} must be true or false")
    port = table.get("port", d.port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"{path}: key 'peers.port' = {port!r} must be a port number (0: any)")
    ifaces = table.get("interfaces", [])
    if not isinstance(ifaces, list) or not all(isinstance(i, str) for i in ifaces):
        raise ConfigError(f"{path}: key 'peers.interfaces' must be a list of interface names")
    # P2PBACKUP_LAN=off keeps a daemon off the network (the test suite sets it outside the
    # network namespaces it makes, so no multicast ever leaves the machine).
    grace = table.get("removal_grace", d.removal_grace)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
        raise ConfigError(f"{path}: key 'peers.removal_grace' = {grace!r} must be a number of "
                          "seconds (0 or more)")
    stall = table.get("stall_timeout", d.stall_timeout)
    if isinstance(stall, bool) or not isinstance(stall, (int, float)) or not 0 < stall <= 86400:
        raise ConfigError(f"{path}: key 'peers.stall_timeout' = {stall!r} must be a number of "
                          "seconds (more than 0, at most 86400)")
    handshake = table.get("handshake_timeout", d.handshake_timeout)
    if isinstance(handshake, bool) or not isinstance(handshake, (int, float)) \
            or not 0 < handshake <= 600:
        raise ConfigError(f"{path}: key 'peers.handshake_timeout' = {handshake!r} must be a "
                          "number of seconds (more than 0, at most 600)")
    if _lan_off():
        lan = False
    return PeerSettings(lan, port, lane, tuple(ifaces), float(grace), float(stall),
                        float(handshake), _static_addresses(table.get("addresses", {}), path),
                        _ice_settings(ice, path))


def _lan_off() -> bool:
    return os.environ.get("P2PBACKUP_LAN", "").lower() in ("off", "0", "no", "false")


def _daemon_settings(table: object, path: Path) -> DaemonSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: key 'daemon' must be a table")
    d = DaemonSettings()
    limits = {"seal_interval": (1, 86400), "seal_bytes": (1024, 1 << 34),
              "rescan_interval": (1, 7 * 86400), "snapshot_interval": (10, 366 * 86400),
              "unwatched_rescan_interval": (1, 7 * 86400)}
    values = {}
    for key, (lo, hi) in limits.items():
        value = table.get(key, getattr(d, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise ConfigError(f"{path}: key 'daemon.{key}' = {value!r} must be a number from "
                              f"{lo} to {hi}")
        values[key] = value
    return DaemonSettings(float(values["seal_interval"]), int(values["seal_bytes"]),
                          float(values["rescan_interval"]), float(values["snapshot_interval"]),
                          float(values["unwatched_rescan_interval"]))


def _read_key_file(path: Path, size: int | None = None) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"key file {path} is missing; this home cannot be used "
                          "(recover it with the recovery code)") from None
    except PermissionError:
        raise ConfigError(f"cannot read key file {path}: permission denied") from None
    if size is not None and len(data) != size:
        raise ConfigError(f"key files in {path.parent} are damaged (wrong length)")
    return data


def load_identity(config: Config) -> DeviceIdentity:
    """This device's signing key."""
    return DeviceIdentity(_read_key_file(config.device_key_file, 32))


def load_keys(config: Config) -> tuple[AccountKeys, DeviceIdentity]:
    """Read the account keys and the device identity from the home's key files."""
    identity = load_identity(config)
    keyring = config.home / "keys" / "keyring"
    if keyring.exists():
        try:
            return AccountKeys.from_export(msgpack.unpackb(_read_key_file(keyring),
                                                           strict_map_key=False)), identity
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            raise ConfigError(f"key file {keyring} is damaged") from None
    if (config.home / "keys" / "partner-only").exists():
        raise ConfigError(f"{config.home} holds no account keys: it is only a storage "
                          "partner for other accounts (run `p2pbackup init` in another "
                          "P2PBACKUP_HOME to back up this device)")
    return AccountKeys(_read_key_file(config.account_key_file, ACCOUNT_KEY_SIZE)), identity
