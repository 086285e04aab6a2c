"""OpenTelemetry tracing against a real fastroute (console exporter: spans as JSON lines in its output): a span
per request with the decision as attributes, a child of the client's trace, its context sent upstream."""

from __future__ import annotations

import json

from obs_support import obs_config, start_observed, wait_for

TRACE_ID = '4bf92f3577b34da6a3ce929d0e0e4736'
CLIENT_SPAN = '00f067aa0ba902b7'


def _spans(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith('{') and '"trace_id"' in line:
            out.append(json.loads(line))
    return out


def test_span_per_request_with_context_sent_upstream(start_mock, procs, tmp_path):
    small = start_mock(model='phi-3-mini', name='small-t')
    large = start_mock(model='llama-3-13b', adapters='acme-lora', name='large-t')
    endpoints = {'small': small.url, 'large': large.url}
    extra = 'tracing: {exporter: console, service_name: fastroute-test}\n'
    fr = start_observed(procs, lambda p: obs_config(endpoints, admin_port=p, extra=extra), tmp_path)
    parent = f'00-{TRACE_ID}-{CLIENT_SPAN}-01'
    r = fr.chat('large', 'acme', headers={'traceparent': parent})
    assert r.status_code == 200
    sent = large.recorded()[-1]['headers']
    version, trace_id, span_id, flags = sent['traceparent'].split('-')
    assert trace_id == TRACE_ID, 'the upstream is not in the client trace'
    assert span_id != CLIENT_SPAN, "the upstream got the client's span, not fastroute's"
    refused = fr.chat('nope-model', 'globex')
    assert refused.status_code == 404

    def exported():
        spans = _spans(fr.proc.log_text())
        return spans if len(spans) >= 2 else None

    spans = wait_for(exported, timeout=10)
    assert spans, fr.proc.log_text()
    by_id = {s['attributes']['fastroute.request_id']: s for s in spans}
    span = by_id[r.headers['x-request-id']]
    assert span['context']['trace_id'] == '0x' + TRACE_ID
    assert span['context']['span_id'] == '0x' + span_id
    assert span['parent_id'] == '0x' + CLIENT_SPAN
    a = span['attributes']
    assert (a['fastroute.route'], a['fastroute.model'], a['fastroute.adapter'], a['fastroute.tenant']) == (
        'by-model',
        'large',
        'acme-lora',
        'acme',
    )
    assert a['http.response.status_code'] == 200
    assert a['gen_ai.usage.output_tokens'] == r.json()['usage']['completion_tokens']
    assert a['fastroute.cost_usd'] > 0
    assert span['resource']['attributes']['service.name'] == 'fastroute-test'
    assert by_id[refused.headers['x-request-id']]['attributes']['http.response.status_code'] == 404
