"""A LAN stranger holding many idle TCP connections open to a daemon's ports.

    python -m tests.integration.flood_agent HOST PORT[,PORT...] COUNT SOURCE...

Opens COUNT connections to each port (spread over the SOURCE addresses), sends nothing, and
every second re-opens those the daemon closed, until a line "stop" comes on stdin. A line
"status" prints one JSON line per port: connections open now, closed by the daemon, opened,
refused at connect. "exit" (or the end of stdin) closes everything.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys


class Flood:
    """Idle connections to one port from several source addresses."""

    def __init__(self, host: str, port: int, sources: list[str], count: int) -> None:
        self.host, self.port, self.sources, self.count = host, port, sources, count
        self.open = self.closed_by_peer = self.opened = self.failed = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._next = 0

    async def fill(self) -> None:
        """Open connections until `count` are open."""
        want = self.count - self.open
        await asyncio.gather(*(self._one() for _ in range(want)))

    async def _one(self) -> None:
        source = self.sources[self._next % len(self.sources)]
        self._next += 1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.host, self.port, local_addr=(source, 0)), 10)
        except (OSError, asyncio.TimeoutError):
            self.failed += 1
            return
        self.open += 1
        self.opened += 1
        self._writers.add(writer)
        task = asyncio.get_running_loop().create_task(self._hold(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1)        # b"" at the daemon's close, or an error at its reset
        except OSError:
            pass
        except asyncio.CancelledError:
            return
        self.open -= 1
        self.closed_by_peer += 1
        self._writers.discard(writer)
        writer.close()

    def status(self) -> dict[str, int]:
        return {"port": self.port, "open": self.open, "closed_by_peer": self.closed_by_peer,
                "opened": self.opened, "failed": self.failed}

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for w in list(self._writers):
            w.transport.abort()


async def main(host: str, ports: list[int], count: int, sources: list[str]) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    floods = [Flood(host, p, sources, count) for p in ports]
    for f in floods:
        await f.fill()
    print(json.dumps({"ready": [f.status() for f in floods]}), flush=True)
    refilling = True

    async def refill() -> None:
        while refilling:
            await asyncio.sleep(1.0)
            if refilling:
                for f in floods:
                    await f.fill()

    task = asyncio.get_running_loop().create_task(refill())
    while (line := (await asyncio.to_thread(sys.stdin.readline)).strip()) not in ("", "exit"):
        if line == "stop":
            refilling = False
            task.cancel()
        print(json.dumps({line: [f.status() for f in floods]}), flush=True)
    task.cancel()
    for f in floods:
        await f.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], [int(p) for p in sys.argv[2].split(",")], int(sys.argv[3]),
                     sys.argv[4:]))
