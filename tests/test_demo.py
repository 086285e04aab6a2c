"""`fastroute demo` end to end: real mocks, the real router, the openai client; nothing left behind."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import subprocess_env


def _fastroute_children() -> set[str]:
    out = subprocess.run(['pgrep', '-f', 'fastroute.cli (mock|serve)'], capture_output=True, text=True)
    return set(out.stdout.split())


def test_demo_routes_the_mix_and_reports_cost():
    before = _fastroute_children()
    proc = subprocess.run(
        [sys.executable, '-m', 'fastroute.cli', 'demo', '-n', '80', '--concurrency', '8'],
        capture_output=True,
        text=True,
        timeout=180,
        env=subprocess_env(),
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
    assert _fastroute_children() <= before, 'the demo left processes behind'
