"""A logic-free Python pass-through proxy (aiohttp server + aiohttp client on uvloop): a baseline only.

The floor of a naive Python proxy for benches/bench_overhead.py: no routing, no parsing, no metrics.
Run: .venv/bin/python benches/minimal_proxy.py --listen 127.0.0.1:8100 --upstream http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

FORWARD = ('content-type', 'authorization', 'accept', 'x-request-id')


async def proxy(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app['session']
    body = await request.read()
    headers = {k: v for k in FORWARD if (v := request.headers.get(k)) is not None}
    url = request.app['upstream'] + request.rel_url.raw_path_qs
    async with session.request(request.method, url, data=body, headers=headers) as up:
        ctype = up.headers.get('content-type', 'application/octet-stream')
        if ctype.startswith('text/event-stream'):
            resp = web.StreamResponse(status=up.status, headers={'content-type': ctype})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        return web.Response(status=up.status, body=await up.read(), headers={'content-type': ctype})


async def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app['upstream'] = upstream.rstrip('/')

    async def session_ctx(app: web.Application):
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=120)
        app['session'] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await app['session'].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route('*', '/{tail:.*}', proxy)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--listen', default='127.0.0.1:8100')
    ap.add_argument('--upstream', required=True)
    args = ap.parse_args()
    host, port = args.listen.rsplit(':', 1)
    loop = uvloop.new_event_loop()
    app = make_app(args.upstream)
    web.run_app(app, host=host, port=int(port), access_log=None, print=None, backlog=4096, loop=loop)


if __name__ == '__main__':
    main()
