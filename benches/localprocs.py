"""Processes for the benchmark scripts: a free loopback port, a child in its own session writing to a log,
a wait until a URL answers, and a stop of them all. (The tests have their own, in tests/conftest.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` in a session of its own (so `stop_all` reaches its children), output to `log`."""
    full = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    with open(log, 'wb') as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=full, start_new_session=True)


def wait_http(url: str, timeout: float = 20.0) -> None:
    """Until `url` answers with any status; exit the script when it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f'{url} did not answer within {timeout}s')


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
