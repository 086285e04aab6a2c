"""Start nginx from the templates beside this file, as the current user, in a temp prefix.

Used by benches/clients/compare.py and benches/bench_overhead.py. Also holds the fixed
bodies: a ~555-byte chat completion, a 20-chunk SSE stream, and the request body sent.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NGINX = shutil.which('nginx') or '/usr/sbin/nginx'

CHAT_COMPLETION = {
    'id': 'chatcmpl-8f2c1a9e4b7d4e0f9a1b2c3d4e5f6a7b',
    'object': 'chat.completion',
    'created': 1718000000,
    'model': 'llama-3-13b',
    'system_fingerprint': 'fp_0a1b2c3d4e',
    'choices': [
        {
            'index': 0,
            'message': {
                'role': 'assistant',
                'content': (
                    'The invoice was issued on 12 March and is due within 30 days. The total amount is 4,250 EUR '
                    'including VAT; the supplier is Nordwerk GmbH and the purchase order number is PO-2291, approved '
                    'by finance; pay by bank transfer.'
                ),
            },
            'logprobs': None,
            'finish_reason': 'stop',
        }
    ],
    'usage': {'prompt_tokens': 182, 'completion_tokens': 48, 'total_tokens': 230},
}
CHAT_BODY = json.dumps(CHAT_COMPLETION, separators=(',', ':')).encode()


def _sse_chunks(n: int = 20) -> list[bytes]:
    words = (
        'The invoice is due within thirty days and the total amount is four thousand two hundred euros now'
    ).split()
    out = []
    for i in range(n):
        delta = {'role': 'assistant', 'content': ''} if i == 0 else {'content': ' ' + words[(i - 1) % len(words)]}
        chunk = {
            'id': 'chatcmpl-8f2c1a9e4b7d',
            'object': 'chat.completion.chunk',
            'created': 1718000000,
            'model': 'llama-3-13b',
            'choices': [{'index': 0, 'delta': delta, 'finish_reason': 'stop' if i == n - 1 else None}],
        }
        out.append(b'data: ' + json.dumps(chunk, separators=(',', ':')).encode() + b'\n\n')
    out.append(b'data: [DONE]\n\n')
    return out


SSE_CHUNKS = _sse_chunks()
SSE_BODY = b''.join(SSE_CHUNKS)

# What a client sends: a small chat request (the model is rewritten by a router).
REQUEST = {
    'model': 'gpt-4o-mini',
    'messages': [
        {'role': 'system', 'content': 'You extract fields from business documents.'},
        {'role': 'user', 'content': 'When is invoice PO-2291 from Nordwerk GmbH due, and what is the total?'},
    ],
    'max_tokens': 64,
}
REQUEST_BODY = json.dumps(REQUEST, separators=(',', ':')).encode()
STREAM_REQUEST_BODY = json.dumps({**REQUEST, 'stream': True}, separators=(',', ':')).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f'process exited with {proc.returncode} before listening on {port}')
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f'nothing listening on 127.0.0.1:{port} after {timeout}s')


def _fill(template: str, prefix: Path, **values: str) -> Path:
    text = (HERE / template).read_text()
    for key, val in {'PREFIX': str(prefix), **values}.items():
        text = text.replace(f'@{key}@', val)
    conf = prefix / template.replace('.template', '')
    conf.write_text(text)
    for d in ('body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'):
        (prefix / 'tmp' / d).mkdir(parents=True, exist_ok=True)
    return conf


def _nginx_str(body: bytes) -> str:
    text = body.decode()
    assert "'" not in text and '\\' not in text
    return text


def _spawn(conf: Path, prefix: Path, cpus: str | None) -> subprocess.Popen:
    cmd = [NGINX, '-p', str(prefix), '-c', str(conf), '-e', str(prefix / 'stderr.log')]
    if cpus:
        cmd = ['taskset', '-c', cpus, *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_upstream(prefix: Path, cpus: str | None = None) -> tuple[subprocess.Popen, int, int]:
    """nginx answering the fixed chat completion on `port` and the SSE stream on `sse_port`."""
    port, sse_port = free_port(), free_port()
    conf = _fill(
        'upstream.conf.template',
        prefix,
        PORT=str(port),
        SSE_PORT=str(sse_port),
        CHAT_BODY=_nginx_str(CHAT_BODY),
        SSE_BODY=_nginx_str(SSE_BODY),
    )
    proc = _spawn(conf, prefix, cpus)
    wait_port(port, proc=proc)
    wait_port(sse_port, proc=proc)
    return proc, port, sse_port


def start_proxy(prefix: Path, upstream_port: int, cpus: str | None = None) -> tuple[subprocess.Popen, int]:
    """nginx as a plain keep-alive reverse proxy in front of 127.0.0.1:upstream_port."""
    port = free_port()
    sub = prefix / f'proxy-{upstream_port}'
    sub.mkdir(parents=True, exist_ok=True)
    conf = _fill('proxy.conf.template', sub, PORT=str(port), UPSTREAM=f'127.0.0.1:{upstream_port}')
    proc = _spawn(conf, sub, cpus)
    wait_port(port, proc=proc)
    return proc, port


def stop(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
