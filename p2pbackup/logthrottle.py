"""One log line a period per kind of event, with how many it hid: a hostile peer refused
twenty times a second, or a database failing under a thousand messages a second, costs the
log a line a minute instead of filling the disk (nothing rotates a daemon's log)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

KINDS = 256   # kinds remembered (least recently logged forgotten first): bounded memory


class ThrottledLog:
    def __init__(self, log: logging.Logger, *, now: Callable[[], float] = time.monotonic,
                 every: float = 60.0, hidden: str = "more like it") -> None:
        self.log, self.now, self.every, self.hidden = log, now, every, hidden
        self._kinds: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def warning(self, line: str, kind: str | None = None) -> None:
        """Log `line` unless a line of its `kind` (default: the text before its first
        colon) was logged less than `every` seconds ago; then count it for the next line."""
        kind = line.split(":", 1)[0][:120] if kind is None else kind
        t = self.now()
        last, hid = self._kinds.get(kind, (float("-inf"), 0))
        if t - last < self.every:
            self._kinds[kind] = (last, hid + 1)
            return
        self.log.warning("%s%s", line, f" ({hid} {self.hidden} in the last minute)"
                         if hid else "")
        self._kinds[kind] = (t, 0)
        self._kinds.move_to_end(kind)
        while len(self._kinds) > KINDS:
            self._kinds.popitem(last=False)
