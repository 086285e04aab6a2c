"""The Rust HTTP/1.x head parser and chunked decoder (fastroute._core) that the native server and the upstream
client use: fields, framing, "need more bytes", limits, and the heads refused as malformed or ambiguous."""

from __future__ import annotations

import pytest
from fastroute._core import (
    ChunkedBody,
    HeaderNames,
    HeadTooLarge,
    HttpError,
    find_bytes,
    head_bytes,
    parse_request_head,
    parse_response_head,
    relay_answer,
)


def test_request_head_fields() -> None:
    raw = (
        b'junk'
        + b'POST /v1/chat?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer k\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 2\r\n\r\n{}'
    )
    end, method, path, query, version, headers, length, chunked, keep_alive, upgrade = parse_request_head(raw, 4)
    assert raw[end:] == b'{}'
    assert (method, path, query, version) == ('POST', '/v1/chat', 'x=1', '1.1')
    assert headers == {'host': 'a', 'authorization': 'Bearer k', 'x-a': '1', 'content-length': '2'}
    assert (length, chunked, keep_alive, upgrade) == (2, False, True, False)


def test_request_head_framing_and_connection() -> None:
    h = parse_request_head(b'GET / HTTP/1.0\r\n\r\n')
    assert h is not None and h[4] == '1.0' and h[6] == -1 and h[8] is False
    h = parse_request_head(b'GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n')
    assert h is not None and h[8] is True
    h = parse_request_head(b'POST / HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n')
    assert h is not None and h[7] is True and h[6] == -1
    h = parse_request_head(b'GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: h2c\r\n\r\n')
    assert h is not None and h[9] is True
    h = parse_request_head(b'POST / HTTP/1.1\r\nContent-Length: 7\r\ncontent-length: 7\r\n\r\n')
    assert h is not None and h[6] == 7  # repeated, the same: one length


def test_incomplete_heads_need_more_bytes() -> None:
    raw = b'GET /a HTTP/1.1\r\nhost: x\r\n\r\n'
    for cut in range(len(raw)):
        assert parse_request_head(raw[:cut]) is None
    assert parse_request_head(raw) is not None


@pytest.mark.parametrize(
    'raw',
    [
        b'POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n',
        b'POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n',
        b'POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\n',
        b'POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n',
        b'POST / HTTP/1.1\r\nContent-Length: 0x3\r\n\r\n',
        b'POST / HTTP/1.1\r\nContent-Length:\r\n\r\n',
        b'POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n',
        b'POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n',
        b'GET / HTTP/1.1\r\n folded: header\r\n\r\n',
        b'GET / HTTP/1.1\r\nName With Space: x\r\n\r\n',
        b'GET / HTTP/1.1\r\nx: a\x00b\r\n\r\n',
        b'GET / HTTP/1.1\r\nx: a\rb\r\n\r\n',
        b'GET / HTTP/3\r\n\r\n',
        b'GET  HTTP/1.1\r\n\r\n',
    ],
)
def test_malformed_or_ambiguous_heads_are_refused(raw: bytes) -> None:
    with pytest.raises(HttpError) as exc:
        parse_request_head(raw)
    assert not isinstance(exc.value, HeadTooLarge)
    assert isinstance(exc.value, ValueError)


def test_head_limits() -> None:
    raw = b'GET / HTTP/1.1\r\n' + b''.join(b'h%d: v\r\n' % i for i in range(10)) + b'\r\n'
    assert parse_request_head(raw, 0, 1024, 10) is not None
    with pytest.raises(HeadTooLarge):
        parse_request_head(raw, 0, 1024, 9)
    with pytest.raises(HeadTooLarge):
        parse_request_head(raw, 0, len(raw) - 1)
    with pytest.raises(HeadTooLarge):  # still incomplete, already too long
        parse_request_head(b'GET /' + b'a' * 200, 0, 100)
    assert parse_request_head(b'GET /' + b'a' * 50, 0, 100) is None


def test_response_head() -> None:
    raw = (
        b'HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 3\r\n'
        b'Content-Encoding: gzip\r\nContent-Length: 2\r\n\r\n{}'
    )
    end, status, headers, length, chunked, keep_alive, ctype, enc = parse_response_head(raw, 0, 0)
    assert raw[end:] == b'{}'
    assert (status, length, chunked, keep_alive, ctype, enc) == (429, 2, False, True, 'application/json', 'gzip')
    assert headers == [
        ('content-type', 'application/json'),
        ('retry-after', '3'),
        ('content-encoding', 'gzip'),
        ('content-length', '2'),
    ]
    assert parse_response_head(raw)[2] is None  # by default, no header list
    assert parse_response_head(raw, 0, 300)[2] == headers  # 429: at or above the threshold
    assert parse_response_head(raw, 0, 430)[2] is None
    h = parse_response_head(b'HTTP/1.0 200 OK\r\n\r\n')
    assert h is not None and h[3] == -1 and h[5] is False  # no length: to the end of the connection
    h = parse_response_head(b'HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n')
    assert h is not None and h[4] is True and h[5] is False
    assert parse_response_head(b'HTTP/1.1 200 OK\r\n') is None
    for bad in (b'HTTP/1.1 2000 OK\r\n\r\n', b'SMTP ready\r\n\r\n', b'HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n'):
        with pytest.raises(HttpError):
            parse_response_head(bad)


def test_chunked_body_in_pieces() -> None:
    raw = b'4\r\nWiki\r\n6;name=v\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\nNEXT'
    for cut in range(len(raw) - 4):
        dec = ChunkedBody()
        body, end, done = dec.feed(raw[:cut])
        assert end == cut and not done
        rest, end, done = dec.feed(raw, cut)
        assert body + rest == b'Wikipedia in \r\n\r\nchunks.'
        assert done and dec.done and raw[end:] == b'NEXT'
    body, end, done = ChunkedBody().feed(b'xx0\r\n\r\n', 2)
    assert (body, end, done) == (b'', 7, True)


@pytest.mark.parametrize('raw', [b'g\r\n', b'\r\n', b'3\r\nabcd\r\n', b'3\nabc\r\n', b'1' * 17 + b'\r\n', b'-1\r\n'])
def test_malformed_chunks_are_refused(raw: bytes) -> None:
    with pytest.raises(HttpError):
        ChunkedBody().feed(raw)


def test_head_bytes() -> None:
    hs = [('content-type', 'application/json'), ('x-route', 'caf\xe9')]
    assert head_bytes(b'HTTP/1.1 200 OK\r\n', hs, b'\r\n', b'{}', b'!') == (
        b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-route: caf\xe9\r\n\r\n{}!'
    )
    # a character beyond latin-1: every header as UTF-8, as the text would be encoded
    wide = [('x-route', 'caf\xe9'), ('x-variant', '\u4e2d')]
    assert head_bytes(b'', wide, b'') == 'x-route: caf\xe9\r\nx-variant: \u4e2d\r\n'.encode()
    assert head_bytes(b'', hs, b'', utf8=True) == 'content-type: application/json\r\nx-route: caf\xe9\r\n'.encode()
    assert head_bytes(b'A', [], b'B', bytearray(b'CD')) == b'ABCD'
    assert head_bytes(b'A', (), b'B', memoryview(b'xCDx')[1:3]) == b'ABCD'
    with pytest.raises(TypeError):
        head_bytes(b'', [('a', 1)], b'')


def test_find_bytes_agrees_with_bytes_find() -> None:
    body = b'data: {"choices":[]}\n\n' * 150 + b'data: {"usage":{"prompt_tokens":3}}\n\n'
    for needle in (b'"usage"', b'data', b'\n\n', b'', b'absent'):
        for start in (0, 1, 500, len(body) - 3, len(body), len(body) + 5):
            assert find_bytes(body, needle, start) == body.find(needle, start), (needle, start)
    assert find_bytes(memoryview(body)[10:], b'"usage"') == body[10:].find(b'"usage"')
    assert find_bytes(bytearray(b'xyz'), b'z') == 2


def test_response_head_leaves_out_dropped_headers() -> None:
    drop = HeaderNames(['Connection', 'server', 'content-length'])
    assert 'CONNECTION' in drop and 'date' not in drop and len(drop) == 3
    raw = b'HTTP/1.1 200 OK\r\nServer: x\r\nContent-Type: text/event-stream\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\n'
    h = parse_response_head(raw, 0, 0, 65536, 256, drop)
    assert h is not None
    assert h[2] == [('content-type', 'text/event-stream'), ('x-a', '1')]
    assert h[5] is True  # what was left out still counts: keep-alive


def _relayed_the_general_way(raw: bytes, block_headers: list[tuple[str, str]], overhead_us: int) -> bytes:
    """What the general way answers for a whole 200: the parsed head's content-type and content-encoding, the
    decision headers, the overhead, content-length and the body (as `answer_response` and `response_bytes`)."""
    h = parse_response_head(raw)
    assert h is not None
    end, _status, _, _length, _, _, ctype, enc = h
    relayed = [('content-type', ctype)] if ctype is not None else []
    if ctype is not None and enc is not None:
        relayed.append(('content-encoding', enc))
    headers = relayed + block_headers + [('x-fastroute-overhead-us', str(overhead_us))]
    body = raw[end:]
    return head_bytes(b'HTTP/1.1 200 OK\r\n', headers, b'content-length: %d\r\n\r\n' % len(body), body)


@pytest.mark.parametrize(
    'head',
    [
        b'HTTP/1.1 200 OK\r\nServer: up\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n',
        b'HTTP/1.1 200 Fine\r\ncontent-length: %d\r\ncontent-type: text/plain; charset=utf-8\r\n'
        b'Content-Encoding: gzip\r\nx-other: 1\r\n\r\n',
        b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nConnection: close\r\ncontent-length: %d\r\n\r\n',
    ],
)
def test_relay_answer_is_the_general_answer(head: bytes) -> None:
    body = b'{"id":"x","choices":[]}'
    raw = head % len(body) + body
    block_headers = [('x-fastroute-route', 'r'), ('x-fastroute-model', 'm'), ('x-request-id', 'fr-1')]
    block = head_bytes(b'', block_headers, b'')
    got = relay_answer(b'junk' + raw, 4, block, 37)
    assert got is not None
    out, at, keep_alive = got
    assert out == _relayed_the_general_way(raw, block_headers, 37)
    assert (b'junk' + raw)[at:] == body
    assert keep_alive is (b'Connection: close' not in head)


@pytest.mark.parametrize(
    'raw',
    [
        b'HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}',  # not a 200
        b'HTTP/1.1 500 Oops\r\ncontent-length: 2\r\n\r\n{}',
        b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n',  # not framed by a length
        b'HTTP/1.1 200 OK\r\n\r\n{}',  # delimited by the end of the connection
        b'HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n{}',  # the body is not all in
        b'HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{}',  # bytes after the body
        b'HTTP/1.1 200 OK\r\ncontent-len',  # the head is not all in
        b'HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}',  # malformed
        b'garbage\r\n\r\n',
    ],
)
def test_relay_answer_leaves_the_rest_to_the_general_way(raw: bytes) -> None:
    assert relay_answer(raw, 0, b'x-a: 1\r\n', 1) is None
