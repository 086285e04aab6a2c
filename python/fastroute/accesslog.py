"""The access log: one JSON object per line and request (JSONL), also the traffic file `fastroute simulate` replays.

Keys, in this order: ts, request_id, method, path, tenant, route, model, adapter, variant, status, input_tokens,
output_tokens, cost_usd, latency_ms, overhead_us, ttft_ms, attempts, fallbacks; and `request` (the request body
as a JSON object) only with `access_log.log_prompts: true`. Never an API key (keys are not logged at all);
prompt text only in `request`, only when the operator turns it on.

Lines are buffered and written by a thread every `flush_interval` seconds, so a slow disk never blocks the event
loop. Each write is one `write()` of whole lines on a file opened for appending, so the lines of several
workers never interleave. Before each write the writer checks that the path still names its open file; after
a rotation (the file moved or deleted) it opens a new one there, so logrotate's default `create` works. If the disk stalls and more than `max_buffer_lines` wait, new lines are dropped and
counted (`fastroute_access_log_dropped_lines_total`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from fastroute.obsconfig import AccessLog

__all__ = ['Entry', 'Writer', 'writer_for']

log = logging.getLogger('fastroute')


class Entry(msgspec.Struct, omit_defaults=True):
    """One line. Field order is the line's key order; `request` is left out unless prompt logging is on."""

    ts: str
    request_id: str
    method: str
    path: str
    tenant: str | None
    route: str | None
    model: str | None
    adapter: str | None
    variant: str | None
    status: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency_ms: float
    overhead_us: int
    ttft_ms: float | None
    attempts: int
    fallbacks: list[dict[str, str]]
    request: msgspec.Raw | None = None


_encode = msgspec.json.Encoder().encode_into


class Writer:
    """Buffers lines and appends them to one file from a background thread."""

    def __init__(self, cfg: AccessLog) -> None:
        self.path = cfg.path
        self.max_lines = cfg.max_buffer_lines
        self.interval = cfg.flush_interval
        self.buf = bytearray()
        self.lines = 0
        self.dropped = 0
        self.on_drop: Any = None  # callback() for metrics
        self._fd: int | None = None
        self._inode = (0, 0)  # (device, inode) of the open file
        self._lock = threading.Lock()  # one write at a time
        self._timer: asyncio.TimerHandle | None = None
        self._writing = False
        self._last_error = 0.0

    def _open(self) -> int:
        """The file to append to: opened on first use, and again when the path no longer names the open file
        (moved or deleted by a log rotation), so rotating needs neither `copytruncate` nor a signal."""
        fd = self._fd
        if self.path == '-':
            if fd is None:
                fd = self._fd = sys.stdout.fileno()
            return fd
        if fd is not None:
            try:
                st = os.stat(self.path)
                rotated = (st.st_dev, st.st_ino) != self._inode
            except FileNotFoundError:
                rotated = True
            if not rotated:
                return fd
            self._fd = None
            os.close(fd)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        st = os.fstat(fd)
        self._fd, self._inode = fd, (st.st_dev, st.st_ino)
        return fd

    def add(self, entry: Entry) -> None:
        if self.lines >= self.max_lines:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
            return
        buf = self.buf
        _encode(entry, buf, len(buf))
        buf += b'\n'
        self.lines += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush_now()
                return
            self._timer = loop.call_later(self.interval, self._flush_soon, loop)

    def _flush_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._writing or not self.buf:
            if self.buf:
                self._timer = loop.call_later(self.interval, self._flush_soon, loop)
            return
        data, self.buf, self.lines = bytes(self.buf), bytearray(), 0
        self._writing = True
        fut = loop.run_in_executor(None, self._write, data)
        fut.add_done_callback(lambda _f: self._written(loop))

    def _written(self, loop: asyncio.AbstractEventLoop) -> None:
        self._writing = False
        if self.buf and self._timer is None:
            self._timer = loop.call_later(self.interval, self._flush_soon, loop)

    def _write(self, data: bytes) -> None:
        with self._lock:
            try:
                fd = self._open()
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            except OSError as exc:
                now = time.monotonic()
                if now - self._last_error > 10.0:
                    self._last_error = now
                    log.error(
                        'access log: cannot write %s (%s); %d line(s) lost. Check access_log.path and the disk',
                        self.path,
                        exc.strerror or exc,
                        data.count(b'\n'),
                    )

    def flush_now(self) -> None:
        """Write what is buffered, here and now (shutdown, tests)."""
        data, self.buf, self.lines = bytes(self.buf), bytearray(), 0
        if data:
            self._write(data)


_writers: dict[str, Writer] = {}


def writer_for(cfg: AccessLog) -> Writer:
    """The process's writer for this path (kept across reloads)."""
    w = _writers.get(cfg.path)
    if w is None or (w.interval, w.max_lines) != (cfg.flush_interval, cfg.max_buffer_lines):
        w = _writers[cfg.path] = Writer(cfg)
    return w


def flush_all() -> None:
    for w in _writers.values():
        w.flush_now()
