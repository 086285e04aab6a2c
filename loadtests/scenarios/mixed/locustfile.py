"""Mixed traffic through fastroute: streaming and non-streaming chat over several tenants, plus path routes.

Run through loadtests/run.sh mixed (it starts the upstream mocks and fastroute, then runs this headless).
Each simulated user is one tenant key; its requests are drawn from the weighted tasks below. Every answer
is checked: status 200, the routing headers present, the model the route should pick, and for streams a
well-formed SSE body ending in [DONE]. Streams also report "TTFT" (time to the first event) as its own row.
"""

from __future__ import annotations

import itertools
import json
import random
import time

from locust import HttpUser, between, events, task

# tenant, key, the model its short chat should land on
KEYS = [
    ('acme', 'sk-acme-load-1'),
    ('acme', 'sk-acme-load-2'),
    ('globex', 'sk-globex-load-1'),
    ('initech', 'sk-initech-load-1'),
]
_next_key = itertools.cycle(KEYS)

SHORT = 'Classify the sentiment of this review: the delivery was late but the support team fixed it fast.'
LONG = ' '.join(['The quarterly report covers revenue, churn, hiring and the new data-retention policy.'] * 180)


def chat(content: str, *, stream: bool = False, max_tokens: int = 32) -> dict:
    body = {'model': 'auto', 'messages': [{'role': 'user', 'content': content}], 'max_tokens': max_tokens}
    if stream:
        body['stream'] = True
    return body


class Tenant(HttpUser):
    wait_time = between(0.05, 0.25)

    def on_start(self) -> None:
        self.tenant, key = next(_next_key)
        self.headers = {'authorization': f'Bearer {key}', 'content-type': 'application/json'}

    def expect_model(self, short: bool) -> str:
        if self.tenant == 'initech':
            return 'small'
        return 'small' if short else 'large'

    def check(self, resp, want_model: str | None) -> None:
        if resp.status_code != 200:
            resp.failure(f'status {resp.status_code}: {resp.text[:200]}')
            return
        model = resp.headers.get('x-fastroute-model')
        if want_model is not None and model != want_model:
            resp.failure(f'routed to {model!r}, expected {want_model!r}')
            return
        resp.success()

    @task(5)
    def short_chat(self) -> None:
        with self.client.post(
            '/v1/chat/completions', json=chat(SHORT), headers=self.headers, name='chat short', catch_response=True
        ) as resp:
            self.check(resp, self.expect_model(short=True))
            if resp.status_code == 200 and 'choices' not in resp.json():
                resp.failure('no choices in the answer')

    @task(2)
    def long_chat(self) -> None:
        with self.client.post(
            '/v1/chat/completions', json=chat(LONG), headers=self.headers, name='chat long', catch_response=True
        ) as resp:
            self.check(resp, self.expect_model(short=False))

    @task(4)
    def streaming_chat(self) -> None:
        t0 = time.perf_counter()
        ttft = None
        with self.client.post(
            '/v1/chat/completions',
            json=chat(SHORT if random.random() < 0.5 else LONG, stream=True, max_tokens=24),
            headers=self.headers,
            name='chat stream',
            stream=True,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f'status {resp.status_code}')
                return
            events_seen, done = 0, False
            for line in resp.iter_lines():
                if not line.startswith(b'data: '):
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - t0
                payload = line[6:]
                if payload == b'[DONE]':
                    done = True
                    break
                json.loads(payload)
                events_seen += 1
            if not done or events_seen == 0:
                resp.failure(f'stream ended without [DONE] after {events_seen} events')
                return
            resp.success()
        if ttft is not None:
            events.request.fire(
                request_type='SSE',
                name='chat stream TTFT',
                response_time=ttft * 1000,
                response_length=0,
                exception=None,
                context={},
            )

    @task(1)
    def classify(self) -> None:
        with self.client.post(
            '/v1/classify', json=chat(SHORT), headers=self.headers, name='/v1/classify', catch_response=True
        ) as resp:
            self.check(resp, 'small')

    @task(1)
    def summarize(self) -> None:
        want = None if self.tenant == 'initech' else 'large'
        with self.client.post(
            '/v1/summarize', json=chat(LONG), headers=self.headers, name='/v1/summarize', catch_response=True
        ) as resp:
            if self.tenant == 'initech':
                # initech may only use `small`: the summarize route picks `large`, so 403 is the right answer
                if resp.status_code == 403:
                    resp.success()
                else:
                    resp.failure(f'initech on /v1/summarize: expected 403, got {resp.status_code}')
                return
            self.check(resp, want)

    @task(1)
    def models(self) -> None:
        with self.client.get('/v1/models', headers=self.headers, name='/v1/models', catch_response=True) as resp:
            self.check(resp, None)
