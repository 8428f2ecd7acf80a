"""A zeroconf process for tests, run inside a namespace; talks JSON lines on stdin/stdout.

  advertise TYPE PORT TXT_JSON [IFACES]  prints {"ready": ...}; each stdin line is a new TXT
                                         under the same names, as other responders update
                                         theirs (prints {"updated": ...}); stdin EOF
                                         unregisters.
  rotate TYPE PORT [IFACES]              a device's advert as the daemons publish it (a rotating
                                         tag, mdns.keep_rotating) on a clock that moves one tag
                                         window per stdin line; prints {"ready"|"renewed": name,
                                         "server": ..., "tag": ...} for each advert.
  find TYPE TAG TIMEOUT [IFACES]         prints {"found": {...} or null, "elapsed": s}.
  browse TYPE TAG [IFACES]               prints {"ready": true}, then one line per event,
                                         until stdin EOF.
TAG "*" matches every service; otherwise TXT "tag" must equal TAG. IFACES: comma-separated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time

from p2pbackup.discovery import mdns


def emit(obj: object) -> None:
    print(json.dumps(obj), flush=True)


async def stdin_lines() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def update_in_place(ad: mdns.Advertisement, txt: dict[str, str]) -> None:
    """A new TXT under the same names, as other responders update theirs: p2pbackup's own
    adverts move to fresh names instead (`renew`), but a browser must follow both."""
    assert ad._zc is not None
    ad._info = ad._make_info(txt)
    await (await ad._zc.async_update_service(ad._info))


def matcher(tag: str) -> mdns.Match:
    return (lambda txt: True) if tag == "*" else (lambda txt: txt["tag"] == tag)


def ifaces(argv: list[str], i: int) -> list[str] | None:
    return argv[i].split(",") if len(argv) > i and argv[i] else None


async def main(argv: list[str]) -> None:
    cmd, stype = argv[0], argv[1]
    if cmd == "advertise":
        reader = await stdin_lines()
        async with mdns.advertise(stype, int(argv[2]), json.loads(argv[3]),
                                  interfaces=ifaces(argv, 4)) as ad:
            emit({"ready": ad.name, "server": ad.server, "addresses": ad.addresses})
            while line := await reader.readline():
                await update_in_place(ad, json.loads(line))
                emit({"updated": json.loads(line)})
        emit({"stopped": True})
    elif cmd == "rotate":
        import os

        from p2pbackup.crypto.tags import TAG_PERIOD, discovery_tag

        key, device, clock = os.urandom(32), os.urandom(16).hex(), [1_000_000.0]

        def txt_at(now: float) -> dict[str, str]:
            return {"v": "1", "tag": discovery_tag(key, device, now)}

        def said(what: str, ad: mdns.Advertisement) -> None:
            emit({what: ad.name, "server": ad.server, "tag": ad._info.properties[b"tag"].decode()})

        reader = await stdin_lines()
        async with mdns.advertise(stype, int(argv[2]), txt_at(clock[0]),
                                  interfaces=ifaces(argv, 3)) as ad:
            said("ready", ad)
            task = asyncio.create_task(mdns.keep_rotating(
                ad, txt_at, period=TAG_PERIOD, now=lambda: clock[0], every=0.05,
                on_renewed=lambda a: said("renewed", a)))
            while await reader.readline():
                clock[0] += TAG_PERIOD
            task.cancel()
        emit({"stopped": True})
    elif cmd == "find":
        start = time.monotonic()
        found = await mdns.find(stype, matcher(argv[2]), timeout=float(argv[3]),
                                interfaces=ifaces(argv, 4))
        emit({"found": dataclasses.asdict(found) if found else None,
              "elapsed": time.monotonic() - start})
    elif cmd == "browse":
        reader = await stdin_lines()
        async with mdns.Browser(stype, match=matcher(argv[2]),
                                interfaces=ifaces(argv, 3)) as browser:
            emit({"ready": True})

            async def pump() -> None:
                async for event in browser:
                    emit({"event": type(event).__name__.lower(),
                          **dataclasses.asdict(event.found)})

            task = asyncio.create_task(pump())
            await reader.read()  # until EOF
            task.cancel()
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
