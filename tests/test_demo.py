"""`fastroute demo` end to end: real mocks, the real router, the openai client; nothing left behind."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

from conftest import subprocess_env


def _marked(mark: bytes) -> list[int]:
    """Live processes whose environment carries `mark` (the demo and every process it started inherit it)."""
    pids = []
    for d in Path('/proc').iterdir():
        if d.name.isdigit():
            try:
                if mark in (d / 'environ').read_bytes():
                    pids.append(int(d.name))
            except OSError:  # gone, or not ours to read
                pass
    return pids


def test_demo_routes_the_mix_and_reports_cost():
    mark = f'FASTROUTE_TEST_DEMO={uuid.uuid4().hex}'
    env = {**subprocess_env(), 'FASTROUTE_TEST_DEMO': mark.split('=', 1)[1]}
    proc = subprocess.run(
        [sys.executable, '-m', 'fastroute.cli', 'demo', '-n', '80', '--concurrency', '8'],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert '80 requests in' in out and '80 answered, 0 failed' in out, out
    # Path routes: every classify request on small, every summarize request on large.
    classify = re.search(r'^classify\s+(\d+)\s+(\d+)\s+(\d+)', out, re.M)
    summarize = re.search(r'^summarize\s+(\d+)\s+(\d+)\s+(\d+)', out, re.M)
    assert classify and classify.group(1) == classify.group(2) and classify.group(3) == '0', out
    assert summarize and summarize.group(1) == summarize.group(3) and summarize.group(2) == '0', out
    saving = re.search(r'saving: (-?\d+)%', out)
    assert saving and 0 < int(saving.group(1)) < 100, out
    left = _marked(mark.encode() + b'\0')
    assert left == [], f'the demo left processes behind: {left}'
