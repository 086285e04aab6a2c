"""Prometheus metrics, cost and stream usage against real processes: fastroute with two forked workers in front
of two `fastroute mock` upstreams; `/metrics` and `/admin/stats` on the admin listener."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from obs_support import KEYS, PRICES, obs_config, start_observed, total, wait_for

N_SMALL, N_LARGE = 24, 16


@pytest.fixture(scope='module')
def env(module_start_mock, module_procs, tmp_path_factory):
    small = module_start_mock(model='phi-3-mini', name='small-m')
    large = module_start_mock(model='llama-3-13b', adapters='acme-lora', name='large-m', ttft_ms=5)
    endpoints = {'small': small.url, 'large': large.url}
    fr = start_observed(
        module_procs, lambda p: obs_config(endpoints, admin_port=p, workers=2), tmp_path_factory.mktemp('metrics')
    )
    # Traffic on fresh connections from 8 threads at once, so both workers serve some of it.
    jobs = [('small', 'globex')] * N_SMALL + [('large', 'acme')] * N_LARGE
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda j: fr.chat(j[0], j[1]), jobs))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    return {'fr': fr, 'small': small, 'large': large, 'answers': answers}


def _requests(m, **labels):
    return total(m, 'fastroute_requests_total', **labels)


def test_counts_add_up_across_workers(env):
    fr = env['fr']
    workers = {a.headers['x-request-id'].rsplit('-', 1)[0] for a in env['answers']}
    assert len(workers) == 2, f'the traffic should have reached both workers, saw {workers}'
    m = wait_for(lambda: (m := fr.metrics()) and _requests(m, status='200') >= N_SMALL + N_LARGE and m)
    assert _requests(m, model='small', tenant='globex', status='200') == N_SMALL
    assert _requests(m, model='large', tenant='acme', adapter='acme-lora', status='200') == N_LARGE
    # every scrape (a new connection each: any worker may answer) sees the same sums
    for _ in range(4):
        again = fr.metrics()
        assert _requests(again, model='small', status='200') == N_SMALL
        assert _requests(again, model='large', status='200') == N_LARGE


def test_latency_overhead_and_upstream_histograms(env):
    m = wait_for(lambda: (m := env['fr'].metrics()) and total(m, 'fastroute_overhead_seconds_count') >= 40 and m)
    n = N_SMALL + N_LARGE
    assert total(m, 'fastroute_overhead_seconds_count') >= n
    assert total(m, 'fastroute_request_duration_seconds_count', model='small') == N_SMALL
    assert total(m, 'fastroute_upstream_duration_seconds_count', model='large') == N_LARGE
    # fastroute's own time is a part of the total time, and the upstream's the rest
    overhead = total(m, 'fastroute_overhead_seconds_sum')
    whole = total(m, 'fastroute_request_duration_seconds_sum')
    upstream = total(m, 'fastroute_upstream_duration_seconds_sum')
    assert 0 < overhead < whole
    assert upstream < whole
    buckets = [v for (name, lb), v in m.items() if name == 'fastroute_overhead_seconds_bucket']
    assert max(buckets) == total(m, 'fastroute_overhead_seconds_count')


def test_tokens_and_cost_follow_the_upstream_usage(env):
    fr = env['fr']
    before = wait_for(lambda: (m := fr.metrics()) and _requests(m, status='200') >= N_SMALL + N_LARGE and m)
    r = fr.chat('small', 'free', content='count my tokens please')
    assert r.status_code == 200
    usage = r.json()['usage']

    def moved():
        m = fr.metrics()
        return m if total(m, 'fastroute_tokens_total', tenant='free') > 0 else None

    after = wait_for(moved)
    tin = total(after, 'fastroute_tokens_total', tenant='free', direction='input')
    tout = total(after, 'fastroute_tokens_total', tenant='free', direction='output')
    assert (tin, tout) == (usage['prompt_tokens'], usage['completion_tokens'])
    p, ref = PRICES['small'], PRICES['large']
    cost = tin * p['input_per_1k'] / 1000 + tout * p['output_per_1k'] / 1000
    assert total(after, 'fastroute_cost_usd_total', tenant='free') == pytest.approx(cost)
    ref_cost = tin * ref['input_per_1k'] / 1000 + tout * ref['output_per_1k'] / 1000 + ref['per_request']
    assert total(after, 'fastroute_reference_cost_usd_total', tenant='free') == pytest.approx(ref_cost)
    assert total(before, 'fastroute_cost_usd_total', tenant='free') == 0


def _sse_events(raw: bytes) -> list[dict]:
    out = []
    for block in raw.split(b'\n\n'):
        if block.startswith(b'data: ') and block != b'data: [DONE]':
            out.append(json.loads(block[6:]))
    return out


def test_stream_usage_is_asked_for_and_hidden_from_a_client_that_did_not(env):
    fr, small = env['fr'], env['small']
    body = {'model': 'small', 'stream': True, 'messages': [{'role': 'user', 'content': 'stream me a story'}]}
    headers = {'authorization': f'Bearer {KEYS["globex"]}'}
    raw = httpx.post(fr.url + '/v1/chat/completions', json=body, headers=headers, timeout=15.0).content
    assert raw.endswith(b'data: [DONE]\n\n')
    events = _sse_events(raw)
    assert events and all(e['choices'] for e in events), 'the usage-only chunk reached a client that did not ask'
    assert all(e.get('usage') is None for e in events)
    sent = small.recorded()[-1]['body']
    assert sent['stream_options'] == {'include_usage': True}, 'the upstream was not asked for usage'
    # the same request, asking for usage itself: the client gets the chunk, unchanged
    raw2 = httpx.post(
        fr.url + '/v1/chat/completions',
        json={**body, 'stream_options': {'include_usage': True}},
        headers=headers,
        timeout=15.0,
    ).content
    usage_events = [e for e in _sse_events(raw2) if e.get('usage')]
    assert len(usage_events) == 1 and usage_events[0]['choices'] == []
    text = ''.join(e['choices'][0]['delta'].get('content') or '' for e in events if e['choices'])
    assert text, 'no content streamed'


def test_openai_client_stream_counts_tokens(env):
    fr = env['fr']
    client = openai.OpenAI(base_url=fr.url + '/v1', api_key=KEYS['free'], max_retries=0, timeout=15.0)
    before = total(fr.metrics(), 'fastroute_tokens_total', tenant='free', direction='output')
    chunks = list(
        client.chat.completions.create(
            model='small',
            messages=[{'role': 'user', 'content': 'a streamed answer'}],
            stream=True,
            stream_options={'include_usage': True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None

    def moved():
        return total(fr.metrics(), 'fastroute_tokens_total', tenant='free', direction='output') > before

    assert wait_for(moved)
    after = total(fr.metrics(), 'fastroute_tokens_total', tenant='free', direction='output')
    assert after - before == usage.completion_tokens


def test_label_values_are_bounded(env):
    fr = env['fr']
    odd = 'model-zz9-plural-z-alpha'
    r = fr.chat(odd, 'globex')
    assert r.status_code == 404
    r = fr.chat('small', 'globex', headers={'x-ab': 'odd-header-value-77', 'x-user': 'user-odd-91'})
    assert r.status_code == 200
    r = httpx.post(
        fr.url + '/v1/chat/completions', content=b'{not json', headers={'authorization': 'Bearer ' + KEYS['acme']}
    )
    assert r.status_code == 400
    text = wait_for(lambda: (t := fr.admin_get('/metrics').text) and 'status="404"' in t and t)
    for s in (odd, 'odd-header-value-77', 'user-odd-91'):
        assert s not in text
    allowed = {
        '',
        'small',
        'large',
        'acme',
        'globex',
        'free',
        'acme-lora',
        'ab-small',
        'ab-large',
        'ab-test',
        'by-model',
        'other',
    }
    for key in ('model', 'tenant', 'adapter', 'variant', 'route'):
        for value in re.findall(rf'[{{,]{key}="([^"]*)"', text):
            assert value in allowed, f'{key}={value!r} became a label value'


def test_variant_traffic_and_decisions_by_rule(env):
    fr = env['fr']
    for i in range(12):
        assert fr.chat('small', 'globex', headers={'x-ab': '1', 'x-user': f'u{i}'}).status_code == 200
    m = wait_for(lambda: (m := fr.metrics()) and total(m, 'fastroute_decisions_total', route='ab-test') >= 12 and m)
    variants = total(m, 'fastroute_variant_requests_total', variant='ab-small') + total(
        m, 'fastroute_variant_requests_total', variant='ab-large'
    )
    assert variants == 12
    assert total(m, 'fastroute_decisions_total', route='by-model') >= N_SMALL + N_LARGE


def test_endpoint_circuit_state(env):
    m = env['fr'].metrics()
    for model in ('small', 'large'):
        assert total(m, 'fastroute_endpoint_circuit_state', model=model, state='closed') == 1
        assert total(m, 'fastroute_endpoint_circuit_state', model=model, state='open') == 0


def test_metrics_and_stats_need_the_admin_token(env):
    fr = env['fr']
    assert fr.admin_get('/metrics', token=None).status_code == 401
    assert fr.admin_get('/admin/stats', token='wrong').status_code == 403
    assert fr.admin_get('/dashboard', token=None).status_code == 200  # the page holds no data


def test_stats_agree_with_metrics(env):
    fr = env['fr']
    m = fr.metrics()
    s = fr.stats()
    assert s['totals']['requests'] >= N_SMALL + N_LARGE
    assert s['reference_model'] == 'large'
    assert s['totals']['cost'] == pytest.approx(total(m, 'fastroute_cost_usd_total'), rel=0.05)
    assert s['totals']['saving'] > 0  # most traffic went to the cheaper model
    tenants = {t['tenant']: t for t in s['tenants']}
    assert tenants['acme']['cost'] > tenants['globex']['cost'] > 0
    assert {e['model'] for e in s['endpoints']} == {'small', 'large'}
    assert s['histograms']['overhead']['count'][-1] > 0


def test_granian_workers_add_up(env, module_procs, tmp_path_factory):
    """The same sums with granian's worker processes (the multiprocess directory set before they start)."""
    endpoints = {'small': env['small'].url, 'large': env['large'].url}
    fr = start_observed(
        module_procs,
        lambda p: obs_config(endpoints, admin_port=p, workers=2),
        tmp_path_factory.mktemp('granian'),
        '--server',
        'granian',
        name='fastroute-granian',
    )
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: fr.chat('small', 'globex'), range(30)))
    assert all(a.status_code == 200 for a in answers)
    workers = {a.headers['x-request-id'].rsplit('-', 1)[0] for a in answers}
    m = wait_for(lambda: (m := fr.metrics()) and _requests(m, status='200') >= 30 and m)
    assert _requests(m, model='small', tenant='globex', status='200') == 30
    assert len(workers) == 2, f'the traffic should have reached both granian workers, saw {workers}'


def test_grafana_and_alerts_name_real_metrics():
    """Every metric the Grafana dashboard and the alert rules query is one fastroute exports."""
    import yaml
    from conftest import REPO

    source = (REPO / 'python/fastroute/metrics.py').read_text()
    known = set()
    for name in re.findall(r"'(fastroute_[a-z_]+)'", source):
        known |= {name, name + '_total', name + '_bucket', name + '_sum', name + '_count'}
    exprs = []
    for group in yaml.safe_load((REPO / 'deploy/prometheus/alerts.yml').read_text())['groups']:
        exprs += [r['expr'] for r in group['rules']]
    dash = json.loads((REPO / 'deploy/grafana/fastroute.json').read_text())
    exprs += [t['expr'] for p in dash['panels'] for t in p['targets']]
    assert len(exprs) > 20
    used = {n for e in exprs for n in re.findall(r'\b(fastroute_[a-z_]+)', e)}
    assert 'fastroute_experiment_transitions_total' in used  # the canary-rolled-back alert
    assert used <= known, f'unknown metrics: {sorted(used - known)}'


def test_stream_usage_can_be_turned_off_per_model():
    """`models.<name>.stream_usage: false`: the body goes upstream as the client sent it."""
    from fastroute.config import compile_config, loads_config

    cfg = loads_config(
        'server: {allow_anonymous: true}\n'
        'models:\n  plain: {endpoints: ["http://127.0.0.1:9"], stream_usage: false}\n'
        '  counted: {endpoints: ["http://127.0.0.1:9"]}\n'
        'routes:\n  - {name: by-model, requested: true}\n'
    )
    router = compile_config(cfg)
    body = b'{"model":"plain","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    d = router.decide('POST', '/v1/chat/completions', {}, body)
    assert d.status == 200 and d.body is None and d.usage_injected is False
    d = router.decide('POST', '/v1/chat/completions', {}, body.replace(b'"plain"', b'"counted"'))
    assert d.usage_injected is True and json.loads(d.body)['stream_options'] == {'include_usage': True}


def _usage_event(prompt: int, completion: int, sep: bytes = b'\n\n') -> bytes:
    body = {'id': 'c', 'choices': [], 'usage': {'prompt_tokens': prompt, 'completion_tokens': completion}}
    return b'data: ' + json.dumps(body).encode() + sep


@pytest.mark.parametrize('sep', [b'\n\n', b'\r\n\r\n'])
def test_stream_usage_filter_holds_split_events_only(sep):
    """The usage chunk is taken out however the reads cut the stream; other bytes pass unchanged."""
    from fastroute.spend import StreamUsage

    content = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"say \\"usage\\" twice"}}]}' + sep
    done = b'data: [DONE]' + sep
    stream = content * 3 + _usage_event(7, 11, sep) + done
    for cut in range(1, len(stream)):
        su = StreamUsage(strip=True)
        out = b''
        for chunk in (stream[:cut], stream[cut:]):
            if su.wants(chunk):
                chunk = su.feed(chunk)
            out += chunk
        out += su.flush()
        assert out == content * 3 + done, cut
        assert su.usage == (7, 11)
    asked = StreamUsage(strip=False)  # the client asked: nothing taken out, usage still read
    assert asked.feed(stream) == stream and asked.usage == (7, 11)
    whole = StreamUsage(strip=True)
    assert not whole.wants(content)  # a complete event without usage costs two byte searches, no copy
