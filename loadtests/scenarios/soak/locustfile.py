"""Soak traffic: streaming and non-streaming chat to one model while the runner (loadtests/soak.py) switches
upstream faults on and off. Every answer is classified; the counts by cause go to $SOAK_CAUSES at the end.

Causes: "ok", "ok_fallback" (answered by the fallback model), "status_<n>" (an error answer), "stream_error"
(a stream that ended with an error event after it had begun: allowed, and counted), "truncated_done" (a stream
that ended with [DONE] but without its finish_reason: must never happen), "no_answer" (the connection broke).
"""

from __future__ import annotations

import collections
import json
import os
import random

from locust import HttpUser, between, events, task

CAUSES: collections.Counter[str] = collections.Counter()
KEY = os.environ.get('FASTROUTE_SOAK_KEY', 'sk-soak')


@events.test_stop.add_listener
def _dump(**_kw: object) -> None:
    path = os.environ.get('SOAK_CAUSES')
    if path:
        with open(path, 'w') as f:
            json.dump(dict(CAUSES), f)


class Client(HttpUser):
    wait_time = between(0.02, 0.1)

    def on_start(self) -> None:
        self.headers = {'authorization': f'Bearer {KEY}', 'content-type': 'application/json'}

    def body(self, stream: bool) -> dict:
        words = ' '.join(random.choices(['alpha', 'beta', 'gamma', 'delta', 'omega'], k=random.randint(5, 40)))
        return {'model': 'main', 'messages': [{'role': 'user', 'content': words}], 'stream': stream}

    def served(self, resp) -> str:
        return 'ok_fallback' if resp.headers.get('x-fastroute-model') == 'backup' else 'ok'

    @task(1)
    def chat(self) -> None:
        try:
            with self.client.post(
                '/v1/chat/completions', json=self.body(False), headers=self.headers, name='chat', catch_response=True
            ) as resp:
                if resp.status_code == 200 and 'choices' in resp.json():
                    CAUSES[self.served(resp)] += 1
                    resp.success()
                else:
                    cause = f'status_{resp.status_code}' if resp.status_code else 'no_answer'
                    CAUSES[cause] += 1
                    resp.failure(cause)
        except ValueError:
            CAUSES['bad_json'] += 1

    @task(1)
    def stream(self) -> None:
        with self.client.post(
            '/v1/chat/completions',
            json=self.body(True),
            headers=self.headers,
            name='chat stream',
            stream=True,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                cause = f'status_{resp.status_code}' if resp.status_code else 'no_answer'
                CAUSES[cause] += 1
                resp.failure(cause)
                return
            try:
                text = resp.content.decode()
            except Exception:  # the connection broke while reading
                CAUSES['no_answer'] += 1
                resp.failure('no_answer')
                return
            events_ = [e[6:] for e in text.split('\n\n') if e.startswith('data: ')]
            finished = any('"finish_reason":"' in e for e in events_)
            if events_ and events_[-1] == '[DONE]':
                if finished:
                    CAUSES[self.served(resp)] += 1
                    resp.success()
                else:
                    CAUSES['truncated_done'] += 1
                    resp.failure('a stream without its finish_reason ended with [DONE]')
            elif events_ and events_[-1].startswith('{"error"'):
                CAUSES['stream_error'] += 1
                resp.success()  # an honest, explicit end: counted, not a failure of fastroute
            else:
                CAUSES['stream_no_end'] += 1
                resp.failure('a stream ended with neither [DONE] nor an error event')
