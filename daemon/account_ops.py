"""Control commands that change the account: pairing hosted by the daemon, device removal.

The daemon holds the writer lock, so `p2pbackup pair` and `devices remove` come here when it
runs. A pairing is one task; whatever a peer sends, it ends with one log line and the daemon
goes on. The question whether both devices show the same verification number goes to the
`pair` command over the control socket (pair_wait returns it, pair_answer answers it); the
keys leave only on its yes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from p2pbackup import account, control
from p2pbackup.errors import LocalProtocolError, P2PError, PairingFailed
from p2pbackup.format.membership import Member
from p2pbackup.pairing_link import HostOutcome, MdnsRendezvous, StaticRendezvous, new_code

if TYPE_CHECKING:
    from .main import DeviceDaemon

log = logging.getLogger("p2pbackupd")
# Seconds a withdrawal waits for the hosting task to end (it closes a listener and an mDNS
# announcement): past it the answer still says withdrawn, and a new code may be refused.
CANCEL_WAIT = 10.0


@dataclass(slots=True)
class _HostedPairing:
    """A pairing the daemon hosts for `p2pbackup pair`, which answers its question."""

    task: asyncio.Task[HostOutcome] | None = None
    question: dict[str, Any] | None = None  # for pair_wait, while `answer` is open
    answer: asyncio.Future[bool] | None = None
    asked: asyncio.Event = field(default_factory=asyncio.Event)

    async def confirm(self, verifier: str, member: Member) -> bool:
        """Ask the CLI's user (pair_wait shows it, pair_answer answers); the link times out."""
        self.answer = asyncio.get_running_loop().create_future()
        self.question = {"state": "question", "verifier": verifier, "name": member.name,
                         "id": member.device_id, "role": member.role}
        log.info("pairing: %s (%s) proved the code and asks to join as %s; verification %s, "
                 "waiting for the answer", member.name, member.device_id[:12], member.role,
                 verifier)
        self.asked.set()
        try:
            return await self.answer
        finally:
            self.question = self.answer = None
            self.asked.clear()


class AccountOps:
    """Pairing and removal for a running daemon."""

    def __init__(self, d: "DeviceDaemon") -> None:
        self.d = d
        self.pairings: dict[str, _HostedPairing] = {}

    def handlers(self) -> dict[str, Any]:
        return {"pair_start": self.pair_start, "pair_wait": self.pair_wait,
                "pair_answer": self.pair_answer, "pair_cancel": self.pair_cancel,
                "devices_remove": self.devices_remove}

    def leases(self) -> dict[str, Any]:
        return {"pair_host": self.pair_host}

    @contextlib.asynccontextmanager
    async def pair_host(self, args: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """pair_start held by the `pair` command that shows the code: when that command ends
        (done, Ctrl-C, killed), the code is withdrawn, so no joiner waits for an answer
        nobody will give and the next `pair` can start at once."""
        started = await self.pair_start(args)
        hosted = self.pairings[started["code"]]
        try:
            yield started
        finally:
            _withdraw(hosted, "the pair command that showed it ended")

    async def pair_start(self, args: dict[str, Any]) -> dict[str, Any]:
        """Start hosting a new code; returns it at once (pair_wait reports the end)."""
        if any(h.task is not None and not h.task.done() for h in self.pairings.values()):
            raise PairingFailed("a pairing is already waiting on this device; finish or let it "
                                "expire first")
        role = control.arg(args, "role", str, "owner")
        sources = control.arg(args, "sources", list)
        if sources is not None and not all(isinstance(s, str) for s in sources):
            raise LocalProtocolError("pair_start: sources must be a list of source names")
        sources = tuple(sources) if sources else None
        quota = control.arg(args, "quota", int)
        lifetime = float(control.arg(args, "expires", (int, float), 600.0))
        port = control.arg(args, "port", int, 0)
        mdns = control.arg(args, "mdns", bool, True)
        mailbox_url = control.arg(args, "mailbox", str)
        invite = account.invitation(self.d.dev, role, sources, quota)
        code, mailbox = await new_code(mailbox_url)
        rendezvous = MdnsRendezvous() if mdns else StaticRendezvous("", 0)
        hosted = _HostedPairing()
        host = account.pairing_host(self.d.dev, invite, code, rendezvous=rendezvous,
                                    lifetime=lifetime, lock=self.d.writing, port=port,
                                    confirm=hosted.confirm, mailbox=mailbox)
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_started(p: int) -> None:
            if not started.done():
                started.set_result(p)

        task = hosted.task = asyncio.create_task(host.run(started=on_started))
        task.add_done_callback(lambda t: self._ended(code, t))
        self.pairings = {code: hosted}
        done, _ = await asyncio.wait({task, started}, timeout=20,
                                     return_when=asyncio.FIRST_COMPLETED)
        if started not in done:
            if task.done() and task.exception() is not None:
                exc = task.exception()
                if isinstance(exc, P2PError):  # e.g. the port is taken: its own line and code
                    raise exc
                raise PairingFailed(f"pairing could not start: {exc}")
            task.cancel()  # or the code stays offered and the next `pair` is refused
            raise PairingFailed("pairing could not start (announcing the code took too long)")
        log.info("pairing code offered on port %d (%s, %d s)", started.result(), role,
                 int(lifetime))
        return {"code": code, "port": started.result(), "expires_in": lifetime}

    def _ended(self, code: str, task: asyncio.Task[HostOutcome]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("pairing ended with an error: %s", exc)
            return
        out = task.result()
        if out.ok:
            log.info("pairing: %s", out.message)
            if self.d.peers is not None:
                asyncio.get_running_loop().create_task(self._changed())
        else:
            log.warning("%s", out.message)

    def _hosted(self, args: dict[str, Any]) -> _HostedPairing:
        hosted = self.pairings.get(str(args.get("code")))
        if hosted is None or hosted.task is None:
            raise PairingFailed("no pairing with that code is running on this device")
        return hosted

    async def pair_wait(self, args: dict[str, Any]) -> dict[str, Any]:
        """Wait for the pairing of `code` to end and say how; with `questions`, return early
        with the question when a device proved the code (answer it with pair_answer)."""
        hosted = self._hosted(args)
        assert hosted.task is not None
        waits: set[asyncio.Future[Any]] = {hosted.task}
        asked = asyncio.ensure_future(hosted.asked.wait())
        if args.get("questions"):
            waits.add(asked)
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            asked.cancel()
        if not hosted.task.done() and hosted.question is not None:
            return hosted.question
        if hosted.task.cancelled():
            return {"state": "ended", "ok": False, "verifier": None,
                    "message": "the pairing code was withdrawn"}
        try:
            out = hosted.task.result()
        except Exception as exc:  # the task logged it already
            return {"state": "ended", "ok": False, "message": f"pairing failed: {exc}",
                    "verifier": None}
        return {"state": "ended", **asdict(out)}

    async def pair_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        """Withdraw the code (the page that showed it was cancelled or closed): no joiner is
        let in with it, and the next pairing can start at once."""
        hosted = self._hosted(args)
        withdrawn = _withdraw(hosted, "cancelled where it was shown")
        if withdrawn and hosted.task is not None:
            # cancel() only asks: until the host's task has ended, a new pair_start is
            # refused as "already waiting" (the page starts one at once)
            await asyncio.wait({hosted.task}, timeout=CANCEL_WAIT)
        return {"withdrawn": withdrawn}

    async def pair_answer(self, args: dict[str, Any]) -> dict[str, Any]:
        """The user's answer to the question: does the other device show the same number?"""
        hosted = self._hosted(args)
        if hosted.answer is None or hosted.answer.done():
            raise PairingFailed("no question is waiting for an answer on this device (the "
                                "pairing has ended)")
        hosted.answer.set_result(control.arg(args, "accept", bool, False))
        return {}

    async def devices_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        """Seal what is pending under the old keys, then re-key without the device."""
        which = control.arg(args, "device", str, "")
        await self.d.seal()
        async with self.d.writing:
            r = await account.remove_device(self.d.dev, which)
        log.info("device %s removed; key epoch %d", r.removed.device_id[:12], r.membership.epoch)
        await self._changed()
        return r.to_json()

    async def _changed(self) -> None:
        """The devices changed: who may connect, and what the peers (storage partners among
        them: the roster) must hear at once."""
        if self.d.peers is not None:
            await self.d.peers.refresh()
        await self.d.announce()   # the remaining devices take their new keys from it at once


def _withdraw(hosted: _HostedPairing, why: str) -> bool:
    """End a pairing that is still waiting; True if it was."""
    if hosted.task is None or hosted.task.done():
        return False
    log.info("pairing code withdrawn: %s", why)
    hosted.task.cancel()
    return True
