"""Shared fixtures: real server processes on loopback, with guaranteed teardown and their logs on failure.

Building blocks (importable as `from conftest import ...`):
- `free_port()`: a free TCP port on 127.0.0.1.
- `fastroute_cmd(*args)`: argv running the working tree's `fastroute` CLI with this interpreter.
- `wait_http(url, ...)`: poll until the URL answers (any HTTP status, or the one asked for).
- `ServerProcess`: one subprocess in its own process group, output captured to a log file; `stop()` sends
  SIGTERM to the whole group, then SIGKILL.
- `ProcessManager.start(argv, ready_path='/health')`: `{port}` / `{host}` placeholders in argv are filled
  with a fresh loopback port (retried on a port clash), and the call returns once the server answers.
- `MockServer`: a running `fastroute mock` with helpers for its admin API and an `openai` client factory.

Fixtures:
- `procs` / `module_procs`: a ProcessManager for the test / the module; everything it started is killed after.
- `start_mock(**options)` / `module_start_mock(**options)`: start a `fastroute mock` (options are the CLI's
  long options, underscores for dashes, e.g. `adapters='a,b', ttft_ms=0`) and return a MockServer.
- `redis_server` / `module_redis_server`: a real `redis-server` on a fresh loopback port (`RedisServer`).

When a test fails, the tail of the log of every server still running is attached to its report.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
HOST = '127.0.0.1'
_LIVE: list[ServerProcess] = []
_LOG_DIR = Path(tempfile.mkdtemp(prefix='fastroute-test-logs-'))


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def fastroute_cmd(*args: str) -> list[str]:
    return [sys.executable, '-m', 'fastroute.cli', *args]


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for child processes: this working tree's python/ on the path (after any PYTHONPATH the
    caller set), unbuffered output."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (env.get('PYTHONPATH'), str(REPO / 'python')) if p)
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra or {})
    return env


def http_request(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """A small blocking HTTP call (urllib); JSON-encodes `body` unless it is bytes. Never raises on 4xx/5xx."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {'content-type': 'application/json', **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def wait_http(url: str, timeout: float = 15.0, status: int | None = None, proc: ServerProcess | None = None) -> None:
    """Poll `url` until it answers (with `status` if given); fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f'{proc.name} exited with {proc.popen.returncode} before {url} answered')
        try:
            code, _, _ = http_request('GET', url, timeout=1.0)
            if status is None or code == status:
                return
            last = f'status {code}'
        except (OSError, urllib.error.URLError) as e:
            last = e
        time.sleep(0.03)
    raise TimeoutError(f'{url} did not answer within {timeout}s (last: {last})')


class ServerProcess:
    """A subprocess in its own session/process group, stdout+stderr captured to a log file."""

    def __init__(self, argv: list[str], name: str, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.argv = argv
        self.name = name
        self.log_path = _LOG_DIR / f'{name}-{time.monotonic_ns()}.log'
        self._log = open(self.log_path, 'wb')  # closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else subprocess_env(),
            cwd=cwd or REPO,
            start_new_session=True,
        )
        self.url = ''
        self.port = 0
        _LIVE.append(self)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self, tail_lines: int | None = None) -> str:
        try:
            text = self.log_path.read_text(errors='replace')
        except OSError:
            return ''
        if tail_lines is not None:
            text = '\n'.join(text.splitlines()[-tail_lines:])
        return text

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM the whole group, SIGKILL what is left after `timeout`; idempotent."""
        if self in _LIVE:
            _LIVE.remove(self)
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # also reaps worker children that outlived their parent
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class ProcessManager:
    """Starts servers and owns their teardown."""

    def __init__(self) -> None:
        self.started: list[ServerProcess] = []

    def start(
        self,
        argv: list[str],
        *,
        name: str | None = None,
        ready_path: str | None = '/health',
        ready_status: int | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 20.0,
        attempts: int = 3,
    ) -> ServerProcess:
        """Start `argv` with `{port}`/`{host}` filled in; wait until http://host:port<ready_path> answers.

        A start that fails because the port was taken meanwhile is retried on another port.
        """
        name = name or Path(argv[0]).name
        for attempt in range(attempts):
            port = free_port()
            real = [a.replace('{port}', str(port)).replace('{host}', HOST) for a in argv]
            proc = ServerProcess(real, name=name, env=env)
            proc.port, proc.url = port, f'http://{HOST}:{port}'
            self.started.append(proc)
            if ready_path is None:
                return proc
            try:
                wait_http(proc.url + ready_path, timeout=timeout, status=ready_status, proc=proc)
                return proc
            except (RuntimeError, TimeoutError) as e:
                log = proc.log_text(60)
                proc.stop()
                if 'address already in use' in log.lower() and attempt + 1 < attempts:
                    continue
                raise RuntimeError(f'{name} failed to start: {e}\n--- {name} log ---\n{log}') from None
        raise AssertionError('unreachable')

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        self.started.clear()


class RedisServer:
    """A real `redis-server` on a loopback port, no persistence. `stop()` / `start()` again on the same port
    (to test what happens while Redis is down); `url` for configs, `client()` for a blocking redis-py client."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f'redis://{HOST}:{self.port}/0'
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = _LOG_DIR / f'redis-{self.port}.log'

    def start(self, timeout: float = 10.0) -> RedisServer:
        exe = shutil.which('redis-server')
        assert exe, 'redis-server is not installed: run `make test` (scripts/bootstrap.sh installs it with apt-get)'
        argv = [exe, '--port', str(self.port), '--bind', HOST, '--save', '', '--appendonly', 'no']
        argv += ['--logfile', str(self.log), '--protected-mode', 'no']
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f'redis-server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}')
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5) as s:
                    s.sendall(b'PING\r\n')
                    if s.recv(64).startswith(b'+PONG'):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f'redis-server on port {self.port} did not answer PING within {timeout}s')

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=2)


class MockServer:
    """A running `fastroute mock` and helpers for its admin API."""

    def __init__(self, proc: ServerProcess, model: str, name: str) -> None:
        self.proc = proc
        self.url = proc.url
        self.port = proc.port
        self.base_url = proc.url + '/v1'
        self.model = model
        self.name = name

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return http_request(method, self.url + path, body, **kw)

    def get_json(self, path: str) -> Any:
        status, _, body = self.request('GET', path)
        assert status == 200, (status, body)
        return json.loads(body)

    def post_json(self, path: str, body: Any) -> Any:
        status, _, data = self.request('POST', path, body)
        assert status == 200, (status, data)
        return json.loads(data)

    def set_faults(self, *rules: dict[str, Any]) -> list[dict[str, Any]]:
        """Replace the fault rules, e.g. `set_faults({'kind': '429', 'retry_after': 3})`; none clears them."""
        return self.post_json('/_mock/faults', list(rules))['faults']

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change timing at runtime: ttft_ms, tps, latency_ms, max_concurrency (and faults)."""
        return self.post_json('/_mock/config', settings)

    def stats(self) -> dict[str, Any]:
        return self.get_json('/_mock/stats')

    def recorded(self) -> list[dict[str, Any]]:
        return self.get_json('/_mock/requests')['requests']

    def reset(self) -> dict[str, Any]:
        """Counters, recorded requests, faults and timing back to how the process started."""
        return self.post_json('/_mock/reset', {})

    def openai(self, **kw: Any) -> Any:
        import openai

        kw.setdefault('api_key', 'test-key')
        kw.setdefault('max_retries', 0)
        kw.setdefault('timeout', 10.0)
        return openai.OpenAI(base_url=self.base_url, **kw)


def mock_argv(**options: Any) -> tuple[list[str], str, str]:
    """CLI argv for `fastroute mock` from keyword options (underscores for dashes; True for bare flags)."""
    options = {'ttft_ms': 0, 'tps': 0, 'model': 'mock-model', 'log_level': 'warning', **options}
    name = str(options.pop('name', '')) or None
    argv = fastroute_cmd('mock', '--host', '{host}', '--port', '{port}')
    for key, value in options.items():
        if value is None or value is False:
            continue
        argv.append('--' + key.replace('_', '-'))
        if value is not True:
            argv.append(','.join(value) if isinstance(value, (list, tuple)) else str(value))
    if name:
        argv += ['--name', name]
    return argv, str(options['model']), name or ''


def _start_mock(manager: ProcessManager, options: dict[str, Any]) -> MockServer:
    argv, model, name = mock_argv(**options)
    proc = manager.start(argv, name=f'mock-{name or model}', ready_path='/health', ready_status=200)
    return MockServer(proc, model, name or f'{HOST}:{proc.port}')


@pytest.fixture
def procs() -> Iterator[ProcessManager]:
    manager = ProcessManager()
    try:
        yield manager
    finally:
        manager.stop_all()


@pytest.fixture(scope='module')
def module_procs() -> Iterator[ProcessManager]:
    manager = ProcessManager()
    try:
        yield manager
    finally:
        manager.stop_all()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh real Redis for the test (its own port, empty), stopped afterwards."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope='module')
def module_redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_mock(procs: ProcessManager):
    """Factory: `start_mock(model='m', adapters='a,b', ttft_ms=0, tps=0, ...)` -> MockServer (per test)."""
    return lambda **options: _start_mock(procs, options)


@pytest.fixture(scope='module')
def module_start_mock(module_procs: ProcessManager):
    """Factory like `start_mock`, but the servers live for the whole module."""
    return lambda **options: _start_mock(module_procs, options)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for proc in list(_LIVE):
            state = 'running' if proc.alive else f'exited {proc.popen.returncode}'
            report.sections.append((f'server log: {proc.name} ({state}) {proc.log_path}', proc.log_text(80)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for proc in list(_LIVE):
        proc.stop()
    if exitstatus == 0:  # keep the server logs only when something failed
        shutil.rmtree(_LOG_DIR, ignore_errors=True)
