"""The access log against a real fastroute: one JSON line per request with the agreed keys, no API keys, no
prompt text unless `log_prompts` is on; and the writer's buffering (lines dropped and counted, never blocking)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from fastroute.accesslog import Entry, Writer
from fastroute.obsconfig import AccessLog
from obs_support import KEYS, obs_config, start_observed, total, wait_for

FIELDS = [
    'ts',
    'request_id',
    'method',
    'path',
    'tenant',
    'route',
    'model',
    'adapter',
    'variant',
    'status',
    'input_tokens',
    'output_tokens',
    'cost_usd',
    'latency_ms',
    'overhead_us',
    'ttft_ms',
    'attempts',
    'fallbacks',
]
SECRET_PROMPT = 'the launch code is 0000-tangerine'


@pytest.fixture(scope='module')
def endpoints(module_start_mock):
    small = module_start_mock(model='phi-3-mini', name='small-log')
    large = module_start_mock(model='llama-3-13b', adapters='acme-lora', name='large-log')
    return {'small': small.url, 'large': large.url}


def _start(procs, endpoints, tmp_path: Path, log_prompts: bool, workers: int = 1):
    log = tmp_path / 'access.jsonl'
    extra = f'access_log: {{path: "{log}", log_prompts: {str(log_prompts).lower()}, flush_interval: 0.2}}\n'
    fr = start_observed(procs, lambda p: obs_config(endpoints, admin_port=p, workers=workers, extra=extra), tmp_path)
    return fr, log


def _lines(log: Path, n: int) -> list[dict]:
    def enough():
        if not log.exists():
            return None
        lines = [ln for ln in log.read_text().splitlines() if ln]
        return lines if len(lines) >= n else None

    lines = wait_for(enough, timeout=10)
    assert lines, f'fewer than {n} lines in {log}'
    return [json.loads(ln) for ln in lines]


def test_one_line_per_request_with_the_agreed_keys(endpoints, procs, tmp_path):
    fr, log = _start(procs, endpoints, tmp_path, log_prompts=False, workers=2)
    answers = [fr.chat('small', 'globex', content=SECRET_PROMPT) for _ in range(6)]
    answers.append(fr.chat('large', 'acme', content=SECRET_PROMPT))
    answers.append(fr.chat('nope-model', 'globex'))  # 404
    stream = httpx.post(
        fr.url + '/v1/chat/completions',
        json={'model': 'small', 'stream': True, 'messages': [{'role': 'user', 'content': SECRET_PROMPT}]},
        headers={'authorization': f'Bearer {KEYS["free"]}'},
        timeout=15.0,
    )
    assert stream.status_code == 200
    rows = _lines(log, 9)
    assert len(rows) == 9
    for row in rows:
        assert list(row) == FIELDS, 'keys or their order changed: `fastroute simulate` replays this format'
    raw = log.read_text()
    assert SECRET_PROMPT not in raw
    for key in KEYS.values():
        assert key not in raw
    by_id = {r['request_id']: r for r in rows}
    for a in answers:
        assert a.headers['x-request-id'] in by_id
    ok = by_id[answers[0].headers['x-request-id']]
    usage = answers[0].json()['usage']
    assert ok['tenant'] == 'globex' and ok['model'] == 'small' and ok['route'] == 'by-model' and ok['status'] == 200
    assert (ok['input_tokens'], ok['output_tokens']) == (usage['prompt_tokens'], usage['completion_tokens'])
    assert ok['cost_usd'] > 0 and ok['latency_ms'] > 0 and ok['overhead_us'] > 0
    assert ok['attempts'] == 1 and ok['fallbacks'] == [] and ok['ttft_ms'] is None
    assert ok['ts'].endswith('Z') and ok['method'] == 'POST' and ok['path'] == '/v1/chat/completions'
    lora = by_id[answers[6].headers['x-request-id']]
    assert (lora['model'], lora['adapter']) == ('large', 'acme-lora')
    missing = by_id[answers[7].headers['x-request-id']]
    assert missing['status'] == 404 and missing['model'] is None and missing['cost_usd'] == 0
    streamed = by_id[stream.headers['x-request-id']]
    assert streamed['ttft_ms'] is not None and 0 < streamed['ttft_ms'] <= streamed['latency_ms']
    assert streamed['output_tokens'] > 0  # from the usage chunk the client never saw
    # the log and the metrics tell the same story
    m = wait_for(lambda: (m := fr.metrics()) and total(m, 'fastroute_requests_total') >= 9 and m)
    assert total(m, 'fastroute_cost_usd_total') == pytest.approx(sum(r['cost_usd'] for r in rows), rel=1e-4)


def test_prompt_logging_when_turned_on(endpoints, procs, tmp_path):
    fr, log = _start(procs, endpoints, tmp_path, log_prompts=True)
    r = fr.chat('small', 'globex', content=SECRET_PROMPT, temperature=0.5)
    assert r.status_code == 200
    row = _lines(log, 1)[0]
    assert list(row) == [*FIELDS, 'request']
    assert row['request'] == {
        'model': 'small',
        'messages': [{'role': 'user', 'content': SECRET_PROMPT}],
        'temperature': 0.5,
    }
    assert KEYS['globex'] not in log.read_text()
    bad = httpx.post(
        fr.url + '/v1/chat/completions',
        content=b'{"model": "small", broken',
        headers={'authorization': f'Bearer {KEYS["globex"]}'},
    )
    assert bad.status_code == 400
    rows = _lines(log, 2)  # every line still parses
    assert rows[1]['status'] == 400 and 'request' not in rows[1]


def test_a_rotated_log_is_reopened(endpoints, procs, tmp_path):
    """logrotate's default: the file is moved away and nothing is signalled; every worker writes on in a new
    file at the configured path, and the moved file keeps what was written before."""
    fr, log = _start(procs, endpoints, tmp_path, log_prompts=False, workers=2)
    before = [fr.chat('small', 'globex').headers['x-request-id'] for _ in range(8)]
    assert {r['request_id'] for r in _lines(log, 8)} == set(before)
    moved = tmp_path / 'access.jsonl.1'
    log.rename(moved)
    after = [fr.chat('small', 'globex').headers['x-request-id'] for _ in range(8)]
    assert {r['request_id'] for r in _lines(log, 8)} == set(after)
    assert {json.loads(ln)['request_id'] for ln in moved.read_text().splitlines()} == set(before)
    log.unlink()  # deleted outright: a new file again
    last = fr.chat('small', 'globex').headers['x-request-id']
    assert [r['request_id'] for r in _lines(log, 1)] == [last]


def _entry(i: int) -> Entry:
    return Entry(
        ts='2026-01-01T00:00:00.000Z',
        request_id=f'r{i}',
        method='POST',
        path='/v1/chat/completions',
        tenant=None,
        route=None,
        model=None,
        adapter=None,
        variant=None,
        status=200,
        input_tokens=1,
        output_tokens=1,
        cost_usd=0.0,
        latency_ms=1.0,
        overhead_us=1,
        ttft_ms=None,
        attempts=1,
        fallbacks=[],
    )


def test_writer_drops_and_counts_beyond_its_buffer(tmp_path):
    path = tmp_path / 'a.jsonl'
    w = Writer(AccessLog(path=str(path), flush_interval=3600, max_buffer_lines=3))
    dropped = []
    w.on_drop = lambda: dropped.append(1)
    for i in range(5):
        w.add(_entry(i))  # no event loop here: each line is written at once
    assert len(path.read_text().splitlines()) == 5 and not dropped

    async def burst() -> None:
        for i in range(5):
            w.add(_entry(i))
        assert w.lines == 3 and len(dropped) == 2  # buffered for the writer thread, not written here
        w.flush_now()

    asyncio.run(burst())
    assert len(path.read_text().splitlines()) == 8


def test_a_client_that_leaves_a_stream_is_logged_499(start_mock, procs, tmp_path):
    slow = start_mock(model='phi-3-mini', name='slow-log', ttft_ms=0, tps=20)
    fr, log = _start(procs, {'small': slow.url, 'large': slow.url}, tmp_path, log_prompts=False)
    body = {'model': 'small', 'stream': True, 'messages': [{'role': 'user', 'content': 'a long story'}]}
    headers = {'authorization': f'Bearer {KEYS["globex"]}'}
    with httpx.stream('POST', fr.url + '/v1/chat/completions', json=body, headers=headers, timeout=15.0) as r:
        rid = r.headers['x-request-id']
        next(r.iter_bytes())  # the first bytes, then the client goes
    rows = {row['request_id']: row for row in _lines(log, 1)}
    assert rows[rid]['status'] == 499
