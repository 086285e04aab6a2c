"""Experiments end to end: real fastroute and `fastroute mock` processes on loopback, driven over HTTP.

Canaries whose candidate turns bad (injected errors, slow first tokens) are rolled back on their own and
stay rolled back; a healthy candidate is promoted step by step to 100 %; A/B shares hold over many users
and a user keeps its variant; shadow traffic never changes the primary's answer and never holds it up;
the admin endpoints and `fastroute experiments` drive all of it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from conftest import ProcessManager, fastroute_cmd, free_port, subprocess_env, wait_http

TOKEN = 'experiments-admin-token'
KEYS = {t: f'sk-{t}-key' for t in ('acme', 'globex', 'initech', 'umbrella', 'hooli', 'wayne')}


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def experiments_config(small: str, large: str, shadow: str, admin_port: int) -> str:
    tenants = '\n'.join(f'  {t}: {{keys_sha256: ["{_sha(k)}"]}}' for t, k in KEYS.items())
    # alpha 0.01: a false rollback of the healthy (A/A) phases would fail a test; at most 1 % of runs, far fewer
    canary = 'steps: [20, 50, 100], min_duration: {dur}, min_samples: {n}, alpha: 0.01, gates: {gates}'
    return f"""
server:
  timeouts: {{connect: 1.0, first_byte: 5.0, idle: 5.0, total: 30.0}}
admin: {{listen: "127.0.0.1:{admin_port}", token_env: FR_EXP_ADMIN}}
models:
  small: {{endpoints: ["{small}"], upstream_model: phi-3-mini}}
  large: {{endpoints: ["{large}"], upstream_model: llama-3-13b, adapters: [v3, v4, g1, g2, h1, h2, w1, w2]}}
  shadowed: {{endpoints: ["{shadow}"], upstream_model: shadow-model}}
tenants:
{tenants}
routes:
  - {{name: all, requested: true}}
experiments:
  acme-v4:
    tenant: acme
    sticky: header:x-user-id
    canary: {{baseline: {{to: large, adapter: v3}}, candidate: {{to: large, adapter: v4}},
             {canary.format(dur=60, n=40, gates='{errors: 0.05}')}}}
  globex-g2:
    tenant: globex
    sticky: header:x-user-id
    canary: {{baseline: {{to: large, adapter: g1}}, candidate: {{to: large, adapter: g2}},
             {canary.format(dur=60, n=40, gates='{ttft_p95: 0.1, latency_p95: 0.1}')}}}
  initech-h2:
    tenant: initech
    sticky: header:x-user-id
    canary: {{baseline: {{to: large, adapter: h1}}, candidate: {{to: large, adapter: h2}},
             {canary.format(dur=0.5, n=40, gates='{errors: 0.25, latency_p95: 0.4}')}}}
  wayne-w2:
    tenant: wayne
    sticky: header:x-user-id
    canary: {{baseline: {{to: large, adapter: w1}}, candidate: {{to: large, adapter: w2}},
             {canary.format(dur=60, n=40, gates='{aborts: 0.05, errors: 0.05}')}}}
  umbrella-ab:
    tenant: umbrella
    sticky: header:x-user-id
    variants: [{{name: a, to: small, weight: 30}}, {{name: b, to: large, weight: 70}}]
  hooli-shadow:
    tenant: hooli
    shadow: {{to: shadowed, share: 100, max_in_flight: 2}}
"""


@pytest.fixture(scope='module')
def env(module_start_mock, module_procs: ProcessManager, tmp_path_factory):
    small = module_start_mock(model='phi-3-mini', name='small')
    large = module_start_mock(model='llama-3-13b', adapters='v3,v4,g1,g2,h1,h2,w1,w2', name='large')
    shadow = module_start_mock(model='shadow-model', name='shadow', latency_ms=1500)
    admin_port = free_port()
    path = tmp_path_factory.mktemp('exp') / 'fastroute.yaml'
    path.write_text(experiments_config(small.url, large.url, shadow.url, admin_port))
    argv = fastroute_cmd('serve', '-c', str(path), '--listen', '{host}:{port}', '--log-level', 'info')
    proc = module_procs.start(
        argv, name='fastroute', ready_path='/healthz', ready_status=200, env=subprocess_env({'FR_EXP_ADMIN': TOKEN})
    )
    admin = f'http://127.0.0.1:{admin_port}'
    wait_http(admin + '/admin/experiments', status=401, proc=proc)
    return {
        'url': proc.url,
        'admin': admin,
        'small': small,
        'large': large,
        'shadow': shadow,
        'proc': proc,
        'path': path,
    }


def _auth() -> dict[str, str]:
    return {'authorization': f'Bearer {TOKEN}'}


def show(env: dict[str, Any], name: str) -> dict[str, Any]:
    r = httpx.get(env['admin'] + '/admin/experiment', params={'name': name}, headers=_auth())
    assert r.status_code == 200, r.text
    return r.json()


def act(env: dict[str, Any], action: str, **body: Any) -> httpx.Response:
    return httpx.post(env['admin'] + f'/admin/experiments/{action}', json=body, headers=_auth())


def chat(client: httpx.Client, url: str, tenant: str, user: str, *, stream: bool = False) -> httpx.Response:
    body = {'model': 'large', 'messages': [{'role': 'user', 'content': f'hello from {user}'}], 'stream': stream}
    headers = {'authorization': f'Bearer {KEYS[tenant]}', 'x-user-id': user}
    if stream:
        with client.stream('POST', url + '/v1/chat/completions', json=body, headers=headers) as r:
            r.read()
            return r
    return client.post(url + '/v1/chat/completions', json=body, headers=headers)


class Traffic:
    """Background clients sending one tenant's requests (distinct users) until stopped; keeps every outcome."""

    def __init__(self, url: str, tenant: str, *, threads: int = 6, stream: bool = False) -> None:
        self.url, self.tenant, self.stream = url, tenant, stream
        self.results: list[tuple[float, str, int, str]] = []  # (time, variant, status, body head)
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self.lock = threading.Lock()

    def _run(self, i: int) -> None:
        n = 0
        with httpx.Client(timeout=15.0) as client:
            while not self.stop_event.is_set():
                n += 1
                try:
                    r = chat(client, self.url, self.tenant, f'user-{i}-{n}', stream=self.stream)
                    rec = (time.monotonic(), r.headers.get('x-fastroute-variant', ''), r.status_code, r.text[:80])
                except httpx.HTTPError as exc:
                    rec = (time.monotonic(), '', 0, repr(exc))
                with self.lock:
                    self.results.append(rec)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(20)


def wait_for_status(env: dict[str, Any], name: str, status: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = show(env, name)
        if view['state']['status'] == status:
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f'{name} did not reach {status} in {timeout}s: {json.dumps(view)[:3000]}')
        time.sleep(0.1)


def test_a_candidate_that_fails_is_rolled_back_and_stays_rolled_back(env):
    large = env['large']
    with Traffic(env['url'], 'acme') as traffic:
        time.sleep(1.0)  # healthy first
        assert show(env, 'acme-v4')['state']['status'] == 'running'
        large.set_faults({'kind': '500', 'rate': 0.5, 'model': 'v4'})
        started = time.monotonic()
        try:
            view = wait_for_status(env, 'acme-v4', 'rolled_back', 60)
            took = time.monotonic() - started
            time.sleep(1.0)
        finally:
            large.set_faults()
    print(f'\nacme-v4: rolled back {took:.2f}s after the candidate began failing half its requests')
    assert 'errors' in view['state']['reason'], view['state']
    assert view['state']['weight'] == 0
    results = traffic.results
    baseline = [r for r in results if r[1] == 'baseline']
    assert baseline and all(r[2] == 200 for r in baseline), Counter(r[2] for r in baseline)
    candidate_errors = [r for r in results if r[1] == 'candidate' and r[2] == 500]
    assert candidate_errors  # the regression was real
    # after the rollback (and the state reaching the only worker) only the baseline serves
    after = [r for r in results if r[0] > started + took + 0.5]
    assert after and all(r[1] == 'baseline' and r[2] == 200 for r in after)
    # it stays rolled back with healthy traffic: only an operator brings it back
    with Traffic(env['url'], 'acme', threads=2):
        time.sleep(1.0)
    assert show(env, 'acme-v4')['state']['status'] == 'rolled_back'
    transitions = [h['transition'] for h in show(env, 'acme-v4')['state']['history']]
    assert transitions[-1] == 'rollback' and show(env, 'acme-v4')['state']['history'][-1]['by'] == 'controller'
    # counted for the canary-rolled-back alert, and shown on the dashboard
    metrics = httpx.get(env['admin'] + '/metrics', headers=_auth()).text
    assert 'fastroute_experiment_transitions_total{experiment="acme-v4",transition="rollback"} 1.0' in metrics
    stats = httpx.get(env['admin'] + '/admin/stats', headers=_auth()).json()
    shown = {e['name']: e for e in stats['experiments']}
    assert shown['acme-v4']['status'] == 'rolled_back' and shown['acme-v4']['step'].startswith('0%')
    r = act(env, 'resume', name='acme-v4', reason='fixed v4')
    assert r.status_code == 200 and r.json()['state']['status'] == 'running'
    assert r.json()['state']['epoch'] == 1  # fresh samples


def test_a_candidate_with_slow_first_tokens_is_rolled_back(env):
    large = env['large']
    with Traffic(env['url'], 'globex', stream=True) as traffic:
        time.sleep(1.0)
        large.set_faults({'kind': 'slow_first_byte', 'rate': 1.0, 'delay_ms': 150, 'model': 'g2'})
        started = time.monotonic()
        try:
            view = wait_for_status(env, 'globex-g2', 'rolled_back', 60)
            took = time.monotonic() - started
        finally:
            large.set_faults()
    print(f"\nglobex-g2: rolled back {took:.2f}s after the candidate's first tokens slowed by 150 ms")
    assert 'ttft_p95' in view['state']['reason'] or 'latency_p95' in view['state']['reason']
    assert all(r[2] == 200 for r in traffic.results)


def test_a_candidate_whose_streams_break_is_rolled_back(env):
    large = env['large']
    with Traffic(env['url'], 'wayne', stream=True) as traffic:
        time.sleep(0.5)
        large.set_faults({'kind': 'stream_cut', 'rate': 0.5, 'after_tokens': 2, 'abort': True, 'model': 'w2'})
        started = time.monotonic()
        try:
            view = wait_for_status(env, 'wayne-w2', 'rolled_back', 60)
            took = time.monotonic() - started
        finally:
            large.set_faults()
    print(f"\nwayne-w2: rolled back {took:.2f}s after half the candidate's streams began breaking mid-answer")
    # a reset that lands before the response head reached fastroute is a 502 (errors), after it an abort
    reason = view['state']['reason']
    gate = 'aborts' if 'worse on aborts' in reason else 'errors'
    assert f'worse on {gate}' in reason, reason
    # the gate that tripped saw the candidate fail and the baseline not (whichever of the two came first)
    looked = view['canary']['last_look']['gates'][gate]
    assert looked['candidate_rate'] > 0, looked
    assert looked['baseline_rate'] == 0, looked
    baseline = [r for r in traffic.results if r[1] == 'baseline']
    assert baseline and all(r[2] == 200 for r in baseline)


def test_a_healthy_candidate_is_promoted_step_by_step(env):
    with Traffic(env['url'], 'initech') as traffic:
        view = wait_for_status(env, 'initech-h2', 'promoted', 90)
        time.sleep(0.5)
    history = view['state']['history']
    steps = [(h['transition'], h['weight']) for h in history]
    assert steps == [('start', 20.0), ('promote', 50.0), ('promote', 100.0)], steps
    assert all(h['by'] in ('config', 'controller') for h in history)
    assert all(r[2] == 200 for r in traffic.results)
    last = traffic.results[-20:]
    assert all(r[1] == 'candidate' for r in last)


def test_ab_shares_follow_the_weights_and_users_keep_their_variant(env):
    url = env['url']
    n = 1200
    seen: dict[str, str] = {}
    with httpx.Client(timeout=15.0) as client:
        for i in range(n):
            r = chat(client, url, 'umbrella', f'u{i}')
            assert r.status_code == 200
            seen[f'u{i}'] = r.headers['x-fastroute-variant']
            want = 'phi-3-mini' if seen[f'u{i}'] == 'a' else 'llama-3-13b'
            assert f'[mock:{want}]' in r.json()['choices'][0]['message']['content']
        share = sum(v == 'a' for v in seen.values()) / n
        # 30 % within 4 standard deviations of a binomial share over 1200 users
        assert abs(share - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5, share
        for i in range(0, n, 40):
            assert chat(client, url, 'umbrella', f'u{i}').headers['x-fastroute-variant'] == seen[f'u{i}']
        r = act(env, 'set-weight', name='umbrella-ab', weights={'a': 0, 'b': 1})
        assert r.status_code == 200, r.text
        assert {chat(client, url, 'umbrella', f'u{i}').headers['x-fastroute-variant'] for i in range(30)} == {'b'}
        act(env, 'set-weight', name='umbrella-ab', weights={'a': 30, 'b': 70})


def test_explain_shows_the_arm_a_request_would_get(env):
    body = {'model': 'large', 'messages': [{'role': 'user', 'content': 'which arm'}]}
    with httpx.Client(timeout=15.0) as client:
        for user in ('x1', 'x2', 'x3'):
            headers = {'authorization': f'Bearer {KEYS["umbrella"]}', 'x-user-id': user}
            served = client.post(env['url'] + '/v1/chat/completions', json=body, headers=headers)
            explained = client.post(env['url'] + '/v1/route/explain', json=body, headers=headers).json()
            exp = explained['experiment']
            assert exp['name'] == 'umbrella-ab' and exp['kind'] == 'ab'
            assert exp['arm'] == served.headers['x-fastroute-variant']
            assert exp['model'] == ('small' if exp['arm'] == 'a' else 'large')
            assert exp['sticky_key'] == f'header:x-user-id={user}'
        # explaining takes no sample and changes nothing
        before = show(env, 'umbrella-ab')['requests_this_worker']
        client.post(env['url'] + '/v1/route/explain', json=body, headers=headers)
        assert show(env, 'umbrella-ab')['requests_this_worker'] == before


def test_shadow_never_changes_or_holds_up_the_primary(env):
    shadow = env['shadow']
    before = shadow.stats()['requests']
    body = {'model': 'small', 'messages': [{'role': 'user', 'content': 'what is shadow traffic'}]}
    headers = {'authorization': f'Bearer {KEYS["hooli"]}'}
    direct = env['small'].openai().chat.completions.create(model='phi-3-mini', messages=body['messages'])
    answers = []
    with httpx.Client(timeout=15.0) as client:
        for _ in range(6):
            r = client.post(env['url'] + '/v1/chat/completions', json=body, headers=headers)
            assert r.status_code == 200
            answers.append(r.json()['choices'][0]['message']['content'])
        # every primary answer is back while the shadow (1.5 s per request upstream) is still working
        view = show(env, 'hooli-shadow')['shadow']
    assert set(answers) == {direct.choices[0].message.content}
    assert view['in_flight'] >= 1
    assert view['dropped'] >= 1  # at most 2 in flight: the rest were dropped, never queued
    deadline = time.monotonic() + 10
    while show(env, 'hooli-shadow')['shadow']['in_flight'] and time.monotonic() < deadline:
        time.sleep(0.1)
    view = show(env, 'hooli-shadow')['shadow']
    assert view['sent'] == 6 - view['dropped']
    assert view['errors'] == 0 and view['statuses'] == {'200': view['sent']}
    assert view['usage']['completion_tokens'] > 0
    assert view['latency_ms']['p50'] >= 1500  # the shadow's own latency is recorded, beside the primary's
    assert shadow.stats()['requests'] - before == view['sent']


def test_admin_experiment_endpoints_need_the_token_and_name_real_experiments(env):
    assert httpx.get(env['admin'] + '/admin/experiments').status_code == 401
    r = httpx.get(env['admin'] + '/admin/experiments', headers=_auth())
    assert r.status_code == 200
    names = {e['name'] for e in r.json()['experiments']}
    assert names == {'acme-v4', 'globex-g2', 'wayne-w2', 'initech-h2', 'umbrella-ab', 'hooli-shadow'}
    missing = act(env, 'pause', name='nope')
    assert missing.status_code == 404 and 'acme-v4' in missing.json()['error']['message']
    bad = act(env, 'set-weight', name='acme-v4', weight=140)
    assert bad.status_code == 400
    assert act(env, 'rollback', name='umbrella-ab').status_code == 409
    garbage = httpx.post(env['admin'] + '/admin/experiments/pause', content=b'{not json', headers=_auth())
    assert garbage.status_code == 400


def test_cli_drives_the_admin_api(env):
    cli_env = subprocess_env({'FR_EXP_ADMIN': TOKEN})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            fastroute_cmd('experiments', *args, '-c', str(env['path'])),
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    out = cli('list')
    assert out.returncode == 0, out.stderr
    assert {e['name'] for e in json.loads(out.stdout)['experiments']} >= {'acme-v4', 'umbrella-ab'}
    out = cli('pause', 'umbrella-ab')
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)['state']['status'] == 'paused'
    out = cli('show', 'umbrella-ab')
    assert json.loads(out.stdout)['state']['status'] == 'paused'
    out = cli('resume', 'umbrella-ab')
    assert json.loads(out.stdout)['state']['status'] == 'running'
    out = cli('set-weight', 'umbrella-ab', 'a=50', 'b=50')
    assert json.loads(out.stdout)['state']['weights'] == {'a': 50.0, 'b': 50.0}
    out = cli('promote', 'umbrella-ab')
    assert out.returncode == 1 and 'not a canary' in out.stderr
    no_token = subprocess.run(
        fastroute_cmd('experiments', 'list', '-c', str(env['path'])),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert no_token.returncode == 2 and 'FR_EXP_ADMIN' in no_token.stderr


# --- config checks (no server) ---------------------------------------------------------------

_BASE = """
models:
  large: {endpoints: ["http://127.0.0.1:9"], adapters: [v3, v4]}
  small: {endpoints: ["http://127.0.0.1:9"]}
tenants:
  acme: {keys_sha256: ["%s"], base: large, adapter: acme-lora}
routes: [{name: all, requested: true}]
experiments:
""" % ('a' * 64)


@pytest.mark.parametrize(
    ('experiment', 'path', 'message'),
    [
        ('x: {route: nope, shadow: {to: small}}', 'experiments.x.route', "unknown route 'nope'"),
        ('x: {tenant: acme}', 'experiments.x', 'nothing to do'),
        (
            'x: {canary: {baseline: {to: large}, candidate: {to: large}}}',
            'experiments.x.canary.candidate',
            'the candidate is the baseline',
        ),
        (
            'x: {canary: {baseline: {to: large}, candidate: {to: larg}}}',
            'experiments.x.canary.candidate.to',
            "did you mean 'large'",
        ),
        (
            'x: {canary: {baseline: {to: large}, candidate: {to: large, adapter: v4}, steps: [50, 20]}}',
            'experiments.x.canary.steps[1]',
            'steps must rise',
        ),
        (
            'x: {canary: {baseline: {to: large}, candidate: {to: small}, gates: {latency: 0.1}}}',
            'experiments.x.canary.gates.latency',
            "unknown gate 'latency'",
        ),
        (
            'x: {canary: {baseline: {to: large}, candidate: {to: small}, alpha: 0.7}}',
            'experiments.x.canary.alpha',
            'a probability in (0, 0.5)',
        ),
        (
            'x: {shadow: {to: large, adapter: acme-lora}}',
            'experiments.x.shadow.adapter',
            'belongs to tenant',
        ),
        ('x: {shadow: {to: small, share: 0}}', 'experiments.x.shadow.share', 'a percentage in (0, 100]'),
        (
            'x: {variants: [{name: a, to: small, weight: 0}, {name: a, to: large, weight: 0}]}',
            'experiments.x.variants',
            'add up to 0',
        ),
        (
            'x: {variants: [{name: a, to: small, weight: 1}, {name: a, to: large, weight: 1}]}',
            'experiments.x.variants[1].name',
            "duplicate variant name 'a'",
        ),
        ('x: {sticky: "cookie:x", shadow: {to: small}}', 'experiments.x.sticky', 'invalid sticky key'),
        ('x: {shadow: {to: small, sample: 3}}', 'experiments.x.shadow', 'sample'),
    ],
)
def test_experiment_config_errors_name_the_key(experiment, path, message):
    from fastroute.config import ConfigError, loads_config

    with pytest.raises(ConfigError) as info:
        loads_config(_BASE + '  ' + experiment + '\n', 'yaml', file='f.yaml')
    text = str(info.value)
    assert f'f.yaml:{path}' in text and message in text, text


def test_a_good_experiments_section_loads():
    from fastroute.config import loads_config

    cfg = loads_config(
        _BASE
        + '  can: {tenant: acme, canary: {baseline: {to: large}, candidate: {to: large, adapter: v4}}}\n'
        + '  ab: {model: small, variants: [{name: a, to: small, weight: 1}, {name: b, to: large, weight: 3}]}\n',
        'yaml',
    )
    assert cfg.experiments['can'].canary.steps == [5.0, 25.0, 50.0, 100.0]
    assert set(cfg.experiments['can'].canary.gates) == {'errors', 'ttft_p95', 'latency_p95', 'aborts', 'empty'}
