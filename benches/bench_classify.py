"""What the trained complexity classifier adds to `Router.decide`, and how fast `fastroute simulate` replays.

Run: `.venv/bin/python benches/bench_classify.py` (after `make build-dev`; `--callgrind N` prints instruction
counts instead, for use under valgrind). One process, `timeit`; medians of repeated runs, in CPU time
(`time.process_time`), since the machine is shared and wall-clock times swing with the load.

Prompts: real MMLU questions (the bundled training file) joined to 2 KB and 20 KB, in a one-message chat body.
Two configs that differ only in the route: `to: small` (no classifier) and `classify: complexity` with the
shipped model. The difference of the medians is the classifier's cost (a second pass over the body that counts
each text string's features and n-gram weights up to its closing quote, then a 16-term dot product and one
`exp`).

Replay: `fastroute simulate`'s loop (`Router.decide` per line, bodies already encoded) over the 7,007 bundled
prompts through the classify config; decisions per CPU second on one core.

Targets (issue 6): +<= 5 µs at 2 KB, +<= 30 µs at 20 KB (as instructions: +<= 45k and +<= 300k); replay
>= 100k requests/s.

Last results (2 shared cores). Instructions from callgrind, python calling decide 200 times minus 0 times,
divided by 200, with PYTHONHASHSEED=0 (unseeded counts swing by ~5k); the build before this change and this one,
in the same session:

      body  no classifier        added instructions, before -> now
      2182  25.7k instr.         +49.1k -> +36.4k  (-26 %)
     21235  193.3k instr.        +386.9k -> +274.1k  (-29 %)

(The plain decide swings by up to 1.4k between builds with the same Rust code: CPython's allocator.)

CPU time, medians over processes (each the median of 15 repeats), the builds alternating: at load average
0.9-1.2, 10 processes each, +5.07 -> +3.69 µs at 2 KB and +41.5 -> +26.4 µs at 20 KB, replay 371k -> 429k
decisions per CPU second; 20 KB only, 8 each pinned to either core, +42.1 -> +27.9 µs; in a slower period
(plain decide 28 µs instead of 19), +7.87 -> +5.77 and +66.4 -> +43.6 µs, then +5.96 -> +5.75 and +43.2 ->
+48.1 µs. A single process is fast or slow in all its repeats, so compare medians of several. The targets are
met in instructions and, on the quieter runs, in CPU time; the replay target is met.

Earlier: version 1 hashing +102k / +887k instructions; version 2 before the AVX2 block walk +76.4k / +597.2k;
before the feature pass stopped re-validating text strings +64.0k / +501.7k; before runs of words +52.9k /
+424.0k. What changed and what did not pay: docs/classifier.md, "Speed".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from fastroute.classifier import chat_body, default_data_path
from fastroute.config import compile_config, loads_config

MODELS = """
server: {allow_anonymous: true}
models:
  small: {endpoints: ["http://127.0.0.1:8001"]}
  large: {endpoints: ["http://127.0.0.1:8011"]}
"""
PLAIN = MODELS + 'routes: [{name: r, to: small}]\n'
CLASSIFY = MODELS + 'routes: [{name: r, classify: complexity, threshold: 0.2, to: {simple: small, complex: large}}]\n'


def prompts() -> list[str]:
    return [json.loads(line)['prompt'] for line in default_data_path().read_text().splitlines()]


def prompt_of_size(texts: list[str], size: int) -> bytes:
    out: list[str] = []
    n = 0
    for t in texts:
        out.append(t)
        n += len(t) + 2
        if n >= size:
            break
    return chat_body('\n\n'.join(out)[:size])


def cpu_median(fn: object, number: int, repeat: int) -> float:
    """Median CPU seconds per call of `fn()` over `repeat` runs of `number` calls."""
    runs = []
    for _ in range(repeat):
        t = time.process_time()
        for _ in range(number):
            fn()  # type: ignore[operator]
        runs.append((time.process_time() - t) / number)
    return statistics.median(runs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument('--repeat', type=int, default=15)
    ap.add_argument('--callgrind', type=int, default=None, help='run N decides of each kind and exit (for valgrind)')
    ap.add_argument('--kind', default='classify-2k')
    args = ap.parse_args()
    texts = prompts()
    plain = compile_config(loads_config(PLAIN))
    clf = compile_config(loads_config(CLASSIFY))
    bodies = {'2k': prompt_of_size(texts, 2048), '20k': prompt_of_size(texts, 20480)}
    if args.callgrind is not None:
        router = clf if args.kind.startswith('classify') else plain
        body = bodies[args.kind.split('-')[1]]
        for _ in range(args.callgrind):
            router.decide('POST', '/v1/chat/completions', {}, body)
        return 0
    print(f'{"body":>6} {"no classifier":>14} {"classifier":>11} {"added":>8}')
    for name, body in bodies.items():
        number = 2000 if name == '2k' else 300
        base = cpu_median(lambda b=body: plain.decide('POST', '/v1/chat/completions', {}, b), number, args.repeat)
        with_clf = cpu_median(lambda b=body: clf.decide('POST', '/v1/chat/completions', {}, b), number, args.repeat)
        print(f'{len(body):>6} {base * 1e6:>11.2f} µs {with_clf * 1e6:>8.2f} µs {(with_clf - base) * 1e6:>5.2f} µs')
    replay = [chat_body(t) for t in texts]
    decide = clf.decide
    rates = []
    for _ in range(5):
        t = time.process_time()
        for b in replay:
            decide('POST', '/v1/chat/completions', {}, b)
        rates.append(len(replay) / (time.process_time() - t))
    print(f'replay: {statistics.median(rates):,.0f} decisions per CPU second ({len(replay)} MMLU prompts, median of 5)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
