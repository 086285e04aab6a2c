"""Helpers shared by the observability tests (metrics, limits, access log, dashboard): a config with prices, a
reference model, tenants and an admin listener, a running fastroute with its admin URL, metric parsing."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
from conftest import ProcessManager, fastroute_cmd, free_port, subprocess_env, wait_http

ADMIN_TOKEN = 'obs-admin-token'
KEYS = {'acme': 'sk-acme-obs-1', 'globex': 'sk-globex-obs-2', 'free': 'sk-free-obs-3'}
PRICES = {
    'small': {'input_per_1k': 0.1, 'output_per_1k': 0.2},  # USD; big enough that cost figures are far from 0
    'large': {'input_per_1k': 1.0, 'output_per_1k': 2.0, 'per_request': 0.01},
}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def obs_config(
    endpoints: dict[str, str],
    *,
    admin_port: int,
    workers: int = 1,
    limits: dict[str, str] | None = None,
    extra: str = '',
) -> str:
    """Two priced models, three tenants (limits by tenant as YAML flow maps), a split, spend.reference: large."""
    limits = limits or {}

    def tenant(name: str, more: str = '') -> str:
        lim = f', limits: {limits[name]}' if name in limits else ''
        return f'  {name}: {{keys_sha256: ["{sha(KEYS[name])}"]{more}{lim}}}\n'

    def price(p: dict[str, float]) -> str:
        return '{' + ', '.join(f'{k}: {v}' for k, v in p.items()) + '}'

    return (
        f'server:\n  workers: {workers}\n  timeouts: {{connect: 1.0, first_byte: 5.0, idle: 5.0, total: 30.0}}\n'
        f'admin:\n  listen: 127.0.0.1:{admin_port}\n  token_env: FR_OBS_ADMIN\n'
        'models:\n'
        f'  small: {{endpoints: ["{endpoints["small"]}"], upstream_model: phi-3-mini, price: {price(PRICES["small"])}}}\n'
        f'  large: {{endpoints: ["{endpoints["large"]}"], upstream_model: llama-3-13b, adapters: [acme-lora],'
        f' price: {price(PRICES["large"])}}}\n'
        'tenants:\n'
        + tenant('acme', ', base: large, adapter: acme-lora')
        + tenant('globex')
        + tenant('free')
        + 'splits:\n'
        '  ab: {sticky: "header:x-user", variants: [{name: ab-small, to: small, weight: 50}, {name: ab-large, to: large, weight: 50}]}\n'
        'routes:\n'
        '  - {name: ab-test, match: {headers: {x-ab: "1"}}, split: ab}\n'
        '  - {name: by-model, requested: true}\n'
        'default: small\n'
        'spend: {reference: large}\n' + extra
    )


class Observed:
    """A running fastroute with an admin listener."""

    def __init__(self, proc: Any, admin: str, config_path: Path) -> None:
        self.proc = proc
        self.url = proc.url
        self.admin = admin
        self.config_path = config_path

    def chat(
        self, model: str = 'small', tenant: str | None = 'acme', content: str = 'hello there', **kw: Any
    ) -> httpx.Response:
        headers = dict(kw.pop('headers', {}) or {})
        if tenant is not None:
            headers['authorization'] = f'Bearer {KEYS.get(tenant, tenant)}'
        body = {'model': model, 'messages': [{'role': 'user', 'content': content}], **kw}
        return httpx.post(self.url + '/v1/chat/completions', json=body, headers=headers, timeout=15.0)

    def admin_get(self, path: str, token: str | None = ADMIN_TOKEN) -> httpx.Response:
        headers = {'authorization': f'Bearer {token}'} if token else {}
        return httpx.get(self.admin + path, headers=headers, timeout=10.0)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        r = self.admin_get('/metrics')
        assert r.status_code == 200, r.text
        return parse_metrics(r.text)

    def stats(self) -> dict[str, Any]:
        r = self.admin_get('/admin/stats')
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out


def start_observed(
    manager: ProcessManager, config_for_admin_port: Any, directory: Path, *extra_args: str, name: str = 'fastroute'
) -> Observed:
    """Start fastroute with the config `config_for_admin_port(admin_port)` returns; wait for both listeners."""
    admin_port = free_port()
    path = directory / f'{name}.yaml'
    path.write_text(config_for_admin_port(admin_port))
    argv = fastroute_cmd('serve', '-c', str(path), '--listen', '{host}:{port}', '--log-level', 'warning', *extra_args)
    env = subprocess_env({'FR_OBS_ADMIN': ADMIN_TOKEN})
    proc = manager.start(argv, name=name, ready_path='/healthz', ready_status=200, env=env)
    admin = f'http://127.0.0.1:{admin_port}'
    wait_http(admin + '/metrics', status=401, proc=proc)
    return Observed(proc, admin, path)


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Exposition text -> {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(m: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of `name` over the series whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lb), v in m.items() if n == name and want <= lb)


def wait_for(fn: Any, timeout: float = 8.0, interval: float = 0.2) -> Any:
    """Call `fn` until it returns a truthy value (metrics move into the shared values once a second)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    return last
