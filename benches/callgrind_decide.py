"""Instructions per `Router.decide` under callgrind, for the grid of `bench_decide.py`.

Run (release build first: `maturin develop --release`):

    valgrind --tool=callgrind --dump-before='*__pyfunction_noop' --callgrind-out-file=/tmp/cg/out \\
        .venv/bin/python benches/callgrind_decide.py
    .venv/bin/python benches/callgrind_decide.py --report /tmp/cg/out

Each case runs a loop of N calls and a loop of 0 calls, each between two `_core.noop()` markers; callgrind dumps
its counters at every marker, so one dump holds one loop. Instructions per call = (N-loop - 0-loop) / N: the
crossing and the bound-method call are included, the loop's own fixed cost is not. Counts are repeatable whatever
the machine's load. SHA-256 runs its portable path under valgrind (SHA-NI natively).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = [(size, routes) for size in ('200B', '2KB', '100KB') for routes in (5, 50, 500)]


def calls(size: str) -> int:
    return 50 if size == '100KB' else 2000


def run() -> None:
    import msgspec
    from bench_decide import HEADERS, SIZES, make_body, make_spec
    from fastroute import _core
    from fastroute.config import Config

    routers = {
        n: _core.Router.compile(msgspec.json.encode(msgspec.convert(make_spec(n), Config))) for n in (5, 50, 500)
    }
    marker = _core.noop
    for size, n in CASES:
        body = make_body(SIZES[size])
        decide = routers[n].decide
        for _ in range(3):
            decide('POST', '/v1/chat/completions', HEADERS, body)
        for reps in (calls(size), 0):
            marker()
            for _ in range(reps):
                decide('POST', '/v1/chat/completions', HEADERS, body)
        marker()
    for size in SIZES:
        body = make_body(SIZES[size])
        for reps in (calls(size), 0):
            marker()
            for _ in range(reps):
                msgspec.json.decode(body)
        marker()
    marker()
    for _ in range(200):
        marker()


def totals(prefix: str) -> list[int]:
    files = sorted(Path(prefix).parent.glob(Path(prefix).name + '.*'), key=lambda p: int(p.suffix[1:]))
    out = []
    for f in files:
        m = re.search(r'^(?:totals|summary): (\d+)', f.read_text(errors='replace'), re.M)
        out.append(int(m.group(1)) if m else 0)
    return out


def report(prefix: str) -> None:
    t = totals(prefix)
    # Dump 1 is the setup (up to the first marker); then per case three dumps: the N-loop, the 0-loop, and the
    # next case's setup.
    loops = t[1:]
    i = 0
    rows = []
    for size, n in CASES:
        rows.append((f'decide {size} {n} routes', (loops[i] - loops[i + 1]) / calls(size)))
        i += 3
    for size in ('200B', '2KB', '100KB'):
        rows.append((f'msgspec.json.decode {size}', (loops[i] - loops[i + 1]) / calls(size)))
        i += 3
    # The noop loop: each iteration is itself a marker, so its dumps are one per call (plus the bracketing ones).
    noop = loops[i : i + 200]
    if noop:
        rows.append(('_core.noop() loop', sorted(noop)[len(noop) // 2]))
    for name, v in rows:
        print(f'{name:32} {v / 1000:8.2f}k')


if __name__ == '__main__':
    if len(sys.argv) == 3 and sys.argv[1] == '--report':
        report(sys.argv[2])
    else:
        run()
