"""Hot reload: on a change of the config file, on SIGHUP (every worker), keeping the pools of unchanged models;
in-flight requests finish on the old config; an invalid config never replaces the serving one."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ProcessManager, fastroute_cmd
from test_gateway import KEYS, _sha, start_fastroute


def _config(one: str, two: str, *, extra: str = '', watch: bool = True, workers: int = 1) -> str:
    return f"""
server:
  workers: {workers}
  watch_config: {str(watch).lower()}
models:
  one:
    endpoints: ["{one}"]
    upstream_model: one-up
  two:
    endpoints: ["{two}"]
    upstream_model: two-up
{extra}
tenants:
  acme: {{keys_sha256: ["{_sha(KEYS['acme'])}"]}}
routes:
  - {{name: by-model, requested: true}}
"""


_client = httpx.Client(timeout=10)


def _post(url: str, model: str, stream: bool = False) -> httpx.Response:
    body = {'model': model, 'messages': [{'role': 'user', 'content': 'hi'}], 'stream': stream}
    # a new connection each time, so that with several workers each may answer
    return _client.post(
        url + '/v1/chat/completions',
        json=body,
        headers={'authorization': f'Bearer {KEYS["acme"]}', 'connection': 'close'},
        timeout=10,
    )


def _wait(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def _endpoint(url: str, model: str) -> dict[str, Any]:
    return _client.get(url + '/readyz').json()['endpoints'][model][0]


@pytest.fixture
def mocks(start_mock):
    return start_mock(model='one-up', name='one'), start_mock(model='two-up', name='two', tps=10, max_output_tokens=12)


def test_a_changed_file_is_reloaded_and_a_bad_one_rejected(procs: ProcessManager, tmp_path: Path, mocks):
    one, two = mocks
    fr = start_fastroute(procs, _config(one.url, two.url), tmp_path)
    assert _post(fr.url, 'three').status_code == 404
    fr.config_path.write_text(
        _config(one.url, two.url, extra=f'  three:\n    endpoints: ["{one.url}"]\n    upstream_model: one-up\n')
    )
    assert _wait(lambda: _post(fr.url, 'three').status_code == 200), 'the new model was not picked up'
    # an invalid config: logged with its error, the old one keeps serving
    fr.config_path.write_text(_config(one.url, two.url, extra='  four:\n    endpoints: []\n'))
    assert _wait(lambda: 'reload rejected' in fr.proc.log_text())
    log = fr.proc.log_text()
    assert 'models.four.endpoints' in log and 'previous config' in log
    assert _post(fr.url, 'three').status_code == 200
    assert _post(fr.url, 'one').status_code == 200


def test_sighup_reloads_every_worker(procs: ProcessManager, tmp_path: Path, mocks):
    one, two = mocks
    path = tmp_path / 'fastroute.yaml'
    path.write_text(_config(one.url, two.url, watch=False, workers=2))
    argv = fastroute_cmd('serve', '-c', str(path), '--listen', '{host}:{port}', '--log-level', 'info')
    proc = procs.start(argv, name='fastroute', ready_path='/healthz', ready_status=200)
    assert _post(proc.url, 'three').status_code == 404
    path.write_text(
        _config(
            one.url,
            two.url,
            watch=False,
            workers=2,
            extra=f'  three:\n    endpoints: ["{one.url}"]\n    upstream_model: one-up\n',
        )
    )
    time.sleep(1.2)  # no file watch: nothing changes until the signal
    assert _post(proc.url, 'three').status_code == 404
    os.kill(proc.popen.pid, signal.SIGHUP)
    assert _wait(lambda: proc.log_text().count('reloaded') >= 2), proc.log_text()
    assert [_post(proc.url, 'three').status_code for _ in range(20)] == [200] * 20
    assert proc.alive


def test_unchanged_models_keep_their_pools_and_in_flight_requests_finish(
    procs: ProcessManager, tmp_path: Path, mocks, start_mock
):
    one, two = mocks
    other = start_mock(model='two-up', name='other')
    fr = start_fastroute(procs, _config(one.url, two.url, watch=False), tmp_path, '--log-level', 'info')
    for _ in range(5):
        assert _post(fr.url, 'one').status_code == 200
    before = _endpoint(fr.url, 'one')
    assert before['connections_opened'] == 1
    # a slow stream from `two` is under way while `two` moves to another upstream
    result: dict[str, Any] = {}

    def stream() -> None:
        result['r'] = _post(fr.url, 'two', stream=True)

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.3)
    fr.config_path.write_text(_config(one.url, other.url, watch=False))
    os.kill(fr.proc.popen.pid, signal.SIGHUP)
    assert _wait(lambda: 'reloaded' in fr.proc.log_text())
    assert 'pools kept: one' in fr.proc.log_text()
    t.join(10)
    r = result['r']
    assert r.status_code == 200 and r.text.rstrip().endswith('data: [DONE]')  # finished on the old config
    for _ in range(5):
        assert _post(fr.url, 'one').status_code == 200
        assert _post(fr.url, 'two').status_code == 200
    after = _endpoint(fr.url, 'one')
    assert after['connections_opened'] == 1  # the same pool, the same keep-alive connection
    assert _endpoint(fr.url, 'two')['url'] == other.url
    assert other.stats()['requests'] == 5


def test_workers_start_from_the_config_the_server_checked(tmp_path: Path):
    """`fastroute serve` hands forked workers the config it read and compiled; a worker that starts after the file
    changed still serves the checked one, and its file watch sees the change (the stamp is the one read)."""
    from fastroute.gateway import App, _file_stamp, load_compiled

    path = tmp_path / 'fastroute.yaml'
    path.write_text(_config('http://127.0.0.1:9', 'http://127.0.0.1:10'))
    stamp = _file_stamp(str(path))
    cfg, router = load_compiled(str(path))
    app = App(str(path))
    app.preload(str(path), stamp, cfg, router)
    time.sleep(0.01)
    path.write_text(
        _config('http://127.0.0.1:9', 'http://127.0.0.1:10', extra='  three:\n    endpoints: ["http://127.0.0.1:11"]\n')
    )
    snap = app.load()
    assert snap.router is router and set(snap.cfg.models) == {'one', 'two'}
    assert _file_stamp(str(path)) != app._seen == stamp  # the watch will reload the changed file
    again = App(str(path))
    assert 'three' in again.load().cfg.models  # without a preload the file is read
