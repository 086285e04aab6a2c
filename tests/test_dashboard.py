"""The live dashboard in a real browser: fastroute with traffic flowing, the page opened in headless Chromium
(the OS package, driven by Playwright with the system executable: no browser download), figures checked to
appear and to move, and a screenshot saved (to the test's temp dir; with FASTROUTE_UPDATE_SCREENSHOT=1 to
docs/dashboard.png, the one the README shows)."""

from __future__ import annotations

import os
import re
import shutil
import threading

import pytest
from conftest import REPO
from obs_support import ADMIN_TOKEN, obs_config, start_observed
from playwright.sync_api import sync_playwright

CHROMIUM = next((p for p in (shutil.which('chromium'), shutil.which('chromium-browser')) if p), None)
DOCS_SCREENSHOT = REPO / 'docs' / 'dashboard.png'


def _number(text: str) -> float:
    m = re.search(r'-?[\d.]+', text.replace(',', ''))
    assert m, f'no figure in {text!r}'
    v = float(m.group())
    return v * 1000 if text.strip().endswith('k') else v


@pytest.fixture(scope='module')
def live(module_start_mock, module_procs, tmp_path_factory):
    start_mock, procs, tmp_path = module_start_mock, module_procs, tmp_path_factory.mktemp('dash')
    small = start_mock(model='phi-3-mini', name='small-d', ttft_ms=20, tps=400)
    large = start_mock(model='llama-3-13b', adapters='acme-lora', name='large-d', ttft_ms=60, tps=200)
    endpoints = {'small': small.url, 'large': large.url}
    limits = {'acme': '{requests_per_minute: 100000, spend_per_day: 50}', 'globex': '{tokens_per_minute: 2000000}'}
    fr = start_observed(procs, lambda p: obs_config(endpoints, admin_port=p, limits=limits, workers=2), tmp_path)
    stop = threading.Event()

    def traffic() -> None:  # a steady mix until the test ends, bounded by the event
        i = 0
        while not stop.is_set():
            i += 1
            if i % 3 == 0:
                fr.chat('large', 'acme', content=f'question {i}')
            elif i % 3 == 1:
                fr.chat('small', 'globex', content=f'question {i}', headers={'x-ab': '1', 'x-user': f'u{i % 7}'})
            else:
                fr.chat('small', 'free', content=f'question {i}', stream=True)
            stop.wait(0.03)

    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        yield fr
    finally:
        stop.set()
        for t in threads:
            t.join(20)


def test_dashboard_shows_live_figures(live, tmp_path):
    assert CHROMIUM, 'chromium is not installed: run `make test` (scripts/bootstrap.sh installs it with apt-get)'
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox', '--disable-gpu'])
        try:
            wrong = browser.new_page()
            wrong.goto(live.admin + '/dashboard#token=wrong-token')
            wrong.wait_for_selector('#login:not([hidden])')
            assert '403' in wrong.inner_text('#login-error')
            wrong.close()
            page = browser.new_page(viewport={'width': 1400, 'height': 1000})
            errors: list[str] = []
            page.on('pageerror', lambda e: errors.append(str(e)))
            # without the token the page asks for it
            page.goto(live.admin + '/dashboard?interval=1')
            page.wait_for_selector('#login:not([hidden])')
            page.fill('#token', ADMIN_TOKEN)
            page.click('#go')
            page.wait_for_function('Number(document.getElementById("status").dataset.polls) >= 3', timeout=30000)
            first = _number(page.inner_text('#kpi-requests'))
            page.wait_for_function(
                f'Number(document.getElementById("status").dataset.polls) >= 6 && '
                f'parseFloat(document.getElementById("kpi-requests").textContent) > {first}',
                timeout=30000,
            )
            assert _number(page.inner_text('#kpi-requests')) > first, 'the request count did not move'
            assert _number(page.inner_text('#kpi-rps')) > 0
            assert page.inner_text('#kpi-cost-per-req').startswith('$')
            assert page.inner_text('#kpi-saving').startswith('$')  # reference: large, traffic mostly small
            for kpi in ('#kpi-p50', '#kpi-p99', '#kpi-overhead-p50', '#kpi-ttft'):
                assert re.search(r'\d', page.inner_text(kpi)), f'{kpi} shows no figure'
            models = page.inner_text('#models-table')
            assert 'small' in models and 'large' in models and 'acme-lora' in models
            tenants = page.inner_text('#tenants-table')
            assert 'acme' in tenants and 'req/min' in tenants and '$/day' in tenants
            assert page.inner_text('#endpoints-table').count('closed') == 2
            experiments = page.inner_text('#experiments')
            assert 'ab-small' in experiments and 'ab-large' in experiments
            share = page.inner_text('#share-legend')
            assert 'small' in share and '%' in share
            assert not errors, errors
            shot = (
                DOCS_SCREENSHOT if os.environ.get('FASTROUTE_UPDATE_SCREENSHOT') == '1' else tmp_path / 'dashboard.png'
            )
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
