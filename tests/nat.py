"""Homes behind NAT routers and a TURN server on a pretend internet, for multi-host tests.

Built on tests/netns.py (one NetLab: one random prefix, everything removed at close):

    internet = Internet(lab)                       # a LAN 203.0.113.0/24 and its "public" host
    turn = internet.coturn(user=("p2p", "secret")) # or secret="..." (REST credentials)
    home = internet.home("h1", symmetric=False)    # router 203.0.113.11, LAN 192.168.1.0/24
    dev = home.device("dev")                       # 192.168.1.2, default route via the router
    home.forward(7890, dev)                        # the router forwards TCP 7890 (DNAT)
    broker = internet.broker(tmp / "broker", turn) # p2pbackup-broker beside coturn (https)

A cone-like NAT is MASQUERADE plus a drop of NEW connections arriving on the router's WAN side
(measured: without that drop, STUN hole punching failed 3 of 3 times; with it, 4 of 4
succeeded); a symmetric NAT adds `--random-fully`, so only TURN gets through.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.netns import Host, Lan, NetLab, _run

WAN_NET = "203.0.113"        # TEST-NET-3: the pretend internet
PUBLIC_IP = f"{WAN_NET}.1"   # the public host: coturn (and later the broker)
TURN_PORT = 3478
BROKER_PORT = 8444


def coturn_available() -> bool:
    return shutil.which("turnserver") is not None


def _ns(host: Host, *argv: str) -> None:
    _run(["ip", "netns", "exec", host.ns, *argv])


@dataclass
class Home:
    """A router namespace (WAN side on the internet, LAN side its own bridge) and its LAN."""

    internet: Internet
    router: Host
    lan: Lan
    index: int
    public_ip: str
    devices: list[Host] = field(default_factory=list)

    def device(self, name: str) -> Host:
        """A host on this home's LAN (192.168.N.2, .3, ...) whose default route is the router."""
        lab = self.internet.lab
        ip = f"192.168.{self.index}.{len(self.devices) + 2}"
        host = lab.host(name, self.lan, f"{ip}/24")
        _run(["ip", "-n", host.ns, "route", "add", "default", "via", f"192.168.{self.index}.1"])
        self.devices.append(host)
        return host

    def forward(self, port: int, to: Host) -> str:
        """Forward TCP `port` on the router's public address to `to` (a port forward a user sets
        up for the signaling endpoint); returns "PUBLIC_IP:PORT"."""
        _ns(self.router, "iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p",
            "tcp", "--dport", str(port), "-j", "DNAT", "--to-destination", f"{to.ip}:{port}")
        _ns(self.router, "iptables", "-w", "-A", "FORWARD", "-i", "wan", "-o", "lan", "-p",
            "tcp", "-d", str(to.ip), "--dport", str(port), "-j", "ACCEPT")
        return f"{self.public_ip}:{port}"


class Internet:
    """The pretend internet: one bridge, a public host, and NAT routers of homes on it."""

    def __init__(self, lab: NetLab) -> None:
        self.lab = lab
        self.wan = lab.lan("wan")
        self.public = lab.host("pub", self.wan, f"{PUBLIC_IP}/24")
        # Without a default route coturn cannot relay toward the peers' private candidates
        # ("Network is unreachable") and ICE hangs in checking: route the rest of the world
        # into a veth with ARP off, which drops it, as the internet drops private addresses.
        _ns(self.public, "ip", "link", "add", "sink0", "type", "veth", "peer", "name", "sink1")
        _ns(self.public, "ip", "link", "set", "sink0", "arp", "off", "up")
        _ns(self.public, "ip", "link", "set", "sink1", "up")
        _ns(self.public, "ip", "route", "add", "default", "dev", "sink0")
        self.homes: list[Home] = []
        # coturn's databases (removed with this object, or at exit)
        self._files = tempfile.TemporaryDirectory(prefix="nat-coturn-")

    def home(self, name: str, *, symmetric: bool = False) -> Home:
        """A home behind a NAT router: cone-like, or symmetric (`--random-fully`)."""
        index = len(self.homes) + 1
        lab = self.lab
        router = lab.host(name, None)
        public_ip = f"{WAN_NET}.{10 + index}"
        lan = lab.lan(f"{name}-lan")
        lab.attach(router, self.wan, f"{public_ip}/24", ifname="wan")
        lab.attach(router, lan, f"192.168.{index}.1/24", ifname="lan")
        router.ip = public_ip
        # Everything not on the internet's bridge goes to the public host, which drops it.
        _run(["ip", "-n", router.ns, "route", "add", "default", "via", PUBLIC_IP])
        _ns(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        masq = ["iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j",
                "MASQUERADE"]
        _ns(router, *masq, *(["--random-fully"] if symmetric else []))
        _ns(router, "iptables", "-w", "-P", "FORWARD", "DROP")
        _ns(router, "iptables", "-w", "-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT")
        _ns(router, "iptables", "-w", "-A", "FORWARD", "-m", "conntrack", "--ctstate",
            "ESTABLISHED,RELATED", "-j", "ACCEPT")
        _ns(router, "iptables", "-w", "-A", "INPUT", "-i", "wan", "-m", "conntrack",
            "--ctstate", "NEW", "-j", "DROP")
        home = Home(self, router, lan, index, public_ip)
        self.homes.append(home)
        return home

    def coturn(self, *, user: tuple[str, str] | None = None, secret: str | None = None,
               realm: str = "p2pbackup.test", port: int = TURN_PORT) -> Coturn:
        """coturn on the public host, with a long-term user or a REST shared secret (the
        broker's scheme: transport/turn.py); give each of several its own `port`."""
        if (user is None) == (secret is None):
            raise ValueError("give user=(name, password) or secret=...")
        relays = 49152 + (port - TURN_PORT) * 100   # relay ports of their own
        # With the REST secret coturn looks for a turn_secret table first: an empty database
        # (/dev/null) refuses every user ("Cannot find credentials"), a new SQLite file works.
        auth = (["--lt-cred-mech", f"--user={user[0]}:{user[1]}", "--userdb=/dev/null"]
                if user else ["--use-auth-secret", f"--static-auth-secret={secret}",
                              f"--userdb={self._files.name}/turn-{port}.sqlite"])
        proc = self.public.popen(
            ["turnserver", "-n", f"--listening-ip={PUBLIC_IP}", f"--relay-ip={PUBLIC_IP}",
             f"--listening-port={port}", f"--min-port={relays}", f"--max-port={relays + 99}",
             *auth, f"--realm={realm}", "--fingerprint", "--no-tls", "--no-dtls", "--no-cli",
             "--no-stdout-log", "--log-file=/dev/null", "--simple-log",
             # its own database and pid file, so two labs never share them
             "--pidfile=/dev/null"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self._listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"turnserver did not start (exit {proc.poll()})")
            time.sleep(0.05)
        return Coturn(f"stun:{PUBLIC_IP}:{port}", f"turn:{PUBLIC_IP}:{port}", user, secret)

    def _listening(self, port: int, proto: str = "u") -> bool:
        out = self.public.run(["ss", f"-Hl{proto}n", f"sport = :{port}"], capture_output=True,
                              text=True).stdout
        return bool(out.strip())

    def broker(self, directory: Path, turn: Coturn, port: int = BROKER_PORT) -> NatBroker:
        """`p2pbackup-broker` on the public host over https (a certificate for PUBLIC_IP: a
        daemon trusts it through SSL_CERT_FILE, `NatBroker.env`), handing out `turn` (a
        coturn with a REST secret) as its STUN and TURN server; started."""
        from p2pbackup.server.tlsutil import self_signed_cert

        if turn.secret is None:
            raise ValueError("the broker hands out REST credentials: give a coturn(secret=...)")
        cert, key = self_signed_cert(directory / "tls", PUBLIC_IP)
        broker = NatBroker(self, directory, port, cert, key, turn)
        broker.start()
        return broker


@dataclass
class NatBroker:
    """The broker on the public host; `kill()` (SIGKILL) and `start()` again on the same data
    directory to restart it."""

    internet: Internet
    directory: Path
    port: int
    cert: Path
    key: Path
    turn: Coturn
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://{PUBLIC_IP}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a daemon or CLI needs in its environment to trust this broker."""
        return {"SSL_CERT_FILE": str(self.cert)}

    def start(self) -> None:
        log = open(self.directory / "broker.log", "ab")
        self.proc = self.internet.public.popen(
            [sys.executable, "-m", "p2pbackup.broker.main", "--data", str(self.directory / "data"),
             "--listen", f"{PUBLIC_IP}:{self.port}", "--tls-cert", str(self.cert), "--tls-key",
             str(self.key), "--stun-url", self.turn.stun, "--turn-url", self.turn.turn,
             "--turn-secret", self.turn.secret or ""], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not self.internet._listening(self.port, "t"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"p2pbackup-broker did not start (exit {self.proc.poll()}): "
                                   f"{(self.directory / 'broker.log').read_text()[-500:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)


@dataclass(frozen=True)
class Coturn:
    """A running coturn: its STUN and TURN URLs and how to authenticate."""

    stun: str
    turn: str
    user: tuple[str, str] | None
    secret: str | None

    def credentials(self, id: str = "test", ttl: int = 3600) -> tuple[str, str]:
        """(username, credential): the static user's, or REST ones made from the secret."""
        if self.user is not None:
            return self.user
        from p2pbackup.transport.turn import rest_credentials

        cred = rest_credentials(self.secret or "", ttl, id, now=time.time())
        return cred.username, cred.credential

    def toml(self, *, stun_only: bool = False, relay_only: bool = False, id: str = "test") -> str:
        """An [ice] table for config.toml naming this server."""
        text = f'\n[ice]\nrelay_only = {str(relay_only).lower()}\n\n[[ice.servers]]\n' \
               f'urls = "{self.stun}"\n'
        if not stun_only:
            username, credential = self.credentials(id)
            text += (f'\n[[ice.servers]]\nurls = "{self.turn}"\nusername = "{username}"\n'
                     f'credential = "{credential}"\n')
        return text
