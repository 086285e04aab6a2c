"""Run-time experiments (config `experiments:`): A/B variants, canaries and shadow traffic.

The Rust core decides once per request; an experiment whose scope (route, model, tenant) matches the
decision then picks the arm and overrides the target: `assign` runs right after `decide`, `Ticket.done`
in `record`, after the answer. Weights change at run time (canary steps, operator actions), so the choice
is made here, with the core's pinned split hash (`_core.bucket`) of the experiment's name and the sticky
key: two replicas with the same weights give a user the same arm.

State: `LIVE` is the process's registry. Each experiment has one `State` document (status, step, weights,
history). One process without `redis:`: it lives in memory. With `redis:` (or, for the workers of one
server without Redis, a directory they share: `sharedstate.LocalFiles`) every worker of every replica reads
it every `SYNC_INTERVAL` seconds and changes it only by compare-and-set, the canary samples of all of them
are added up there, and one process at a time (a lease) runs the canary controller. Redis down: traffic
goes on with the last state read; samples wait in memory and are sent when Redis is back.

Every transition is logged and kept in `TRANSITIONS` (the latest) and `TRANSITION_COUNTS`
(experiment, transition) -> count, for the metrics.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import random
import re
import socket
import time
import zlib
from collections.abc import Callable
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import msgspec

from fastroute import _core
from fastroute.admin import AdminRequest, route
from fastroute.canary import Counts, evaluate
from fastroute.errors import RequestError
from fastroute.upstream import USER_AGENT

if TYPE_CHECKING:
    from fastroute.config import Config, Experiment
    from fastroute.sharedstate import LocalFiles, SharedState

__all__ = [
    'LIVE',
    'TRANSITIONS',
    'TRANSITION_COUNTS',
    'ActionError',
    'Registry',
    'State',
    'Ticket',
    'share_between_workers',
]

log = logging.getLogger('fastroute')

SYNC_INTERVAL = 0.25  # seconds between two syncs of a worker (state read, samples sent, controller look)
LEASE_MS = 2000  # the canary controller's lease
HISTORY = 50  # transitions kept in each experiment's state
THRESHOLD_WINDOW = 500  # baseline samples behind the p95 the latency gates compare with
THRESHOLD_MIN = 20
# A worker whose event loop woke this late from the sync loop's sleep is busy: shadows are dropped ("shed")
# until the next look, so that mirrored traffic never competes with primary requests for a saturated loop.
SHADOW_SHED_LAG = 0.05

TRANSITIONS: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
TRANSITION_COUNTS: collections.Counter[tuple[str, str]] = collections.Counter()

_CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"[^"]')
_ZERO_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*0\b')
_USAGE = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*(\d+)')


class ActionError(Exception):
    """An operator action that does not apply to the experiment's state (HTTP 409), or bad input (400)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class State(msgspec.Struct, kw_only=True):
    """One experiment's control state: what every worker and replica serves from."""

    name: str
    kind: str  # 'ab' | 'canary' | 'shadow'
    spec: str  # hash of the experiment's config: a changed definition starts from fresh state
    status: str = 'running'  # running | paused | promoted | rolled_back
    step: int = 0
    weight: float = 0.0  # canary: candidate percent; shadow: percent mirrored
    weights: dict[str, float] = {}  # A/B: variant -> weight
    since: float = 0.0  # wall clock when the step (or status) began
    step_base: int = 0  # candidate requests counted when the step began
    epoch: int = 0  # bumped when samples start again (resume after a rollback)
    version: int = 1
    reason: str = ''
    history: list[dict[str, Any]] = []


_state_decoder = msgspec.json.Decoder(State)
_encode = msgspec.json.Encoder().encode


class Assigned:
    """The decision with the experiment's arm as its target; every other field is the core's."""

    __slots__ = ('_d', 'adapter', 'body', 'pool', 'upstream_model', 'variant')

    def __init__(self, d: Any, pool: str, adapter: str | None, variant: str, upstream_model: Any, body: Any) -> None:
        self._d = d
        self.pool = pool
        self.adapter = adapter
        self.variant = variant
        self.upstream_model = upstream_model
        self.body = body

    def __getattr__(self, name: str) -> Any:
        return getattr(self._d, name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = self._d.to_dict()
        out.update(pool=self.pool, adapter=self.adapter, variant=self.variant, upstream_model=self.upstream_model)
        return out


class Ticket:
    """One request's place in an experiment, kept on `Ctx.experiment` until `record`."""

    __slots__ = ('arm', 'candidate', 'content', 'empty', 'exp', 'shadow', 'watch', 'weight')

    def __init__(self, exp: Live, arm: str, candidate: bool, weight: float, shadow: bool) -> None:
        self.exp = exp
        self.arm = arm
        self.candidate = candidate
        self.weight = weight
        self.shadow = shadow
        self.watch = exp.watch_empty  # look at the answer's bytes only when a gate needs it
        self.empty: bool | None = None  # known for whole answers
        self.content = False  # a streamed answer carried some text

    def seen_body(self, body: Any) -> None:
        if self.watch:
            self.empty = _ZERO_COMPLETION.search(body) is not None or _CONTENT.search(body) is None

    def seen_chunk(self, chunk: Any) -> None:
        if self.watch and not self.content and _CONTENT.search(chunk) is not None:
            self.content = True

    def done(self, ctx: Any) -> None:
        try:
            self.exp.done(ctx, self)
        except Exception:  # an experiment must never break a request's end
            log.exception('experiment %s: recording the outcome failed', self.exp.name)


class _Threshold:
    """The baseline's recent p95 of one latency, from samples before the one being judged."""

    __slots__ = ('_n', 'limit', 'values')

    def __init__(self) -> None:
        self.values: collections.deque[int] = collections.deque(maxlen=THRESHOLD_WINDOW)
        self.limit: int | None = None
        self._n = 0

    def push(self, v: int) -> None:
        self.values.append(v)
        self._n += 1
        if len(self.values) >= THRESHOLD_MIN and (self.limit is None or self._n % 20 == 0):
            s = sorted(self.values)
            self.limit = s[min(len(s) - 1, int(0.95 * len(s)))]


class _Series:
    """Recent values of one measure, for medians and p95 in the admin view."""

    def __init__(self, n: int = 1000) -> None:
        self.values: collections.deque[float] = collections.deque(maxlen=n)

    def summary(self) -> dict[str, float | None]:
        s = sorted(self.values)
        if not s:
            return {'p50': None, 'p95': None}
        return {'p50': round(s[len(s) // 2], 2), 'p95': round(s[min(len(s) - 1, int(0.95 * len(s)))], 2)}


class ShadowStats:
    """The shadow's answers beside the primary's, for the same requests (this worker)."""

    def __init__(self) -> None:
        self.sent = 0
        self.dropped = 0  # over max_in_flight, or shed while the worker was busy
        self.shed = 0
        self.in_flight = 0
        self.errors = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self.latency_ms = _Series()
        self.ttft_ms = _Series()
        self.primary_latency_ms = _Series()
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def view(self) -> dict[str, Any]:
        return {
            'sent': self.sent,
            'dropped': self.dropped,
            'shed_busy': self.shed,
            'in_flight': self.in_flight,
            'errors': self.errors,
            'statuses': dict(self.statuses),
            'latency_ms': self.latency_ms.summary(),
            'ttft_ms': self.ttft_ms.summary(),
            'primary_latency_ms': self.primary_latency_ms.summary(),
            'usage': {'prompt_tokens': self.prompt_tokens, 'completion_tokens': self.completion_tokens},
        }


def _sticky_sources(sticky: str | list[str]) -> list[str]:
    out = []
    for s in [sticky] if isinstance(sticky, str) else sticky:
        out.append(f'header:{s[7:].lower()}' if s.lower().startswith('header:') else s)
    return out


def _retarget(ctx: Any, d: Any, model: str, adapter: str | None, label: str) -> Assigned | None:
    """The decision `d` sent to `model` (with `adapter`), the body rewritten for it; None if the model is gone."""
    snap = ctx.snap
    m = snap.cfg.models.get(model)
    if m is None or model not in snap.pools:
        return None
    if adapter is None and d.tenant is not None:
        t = snap.cfg.tenants.get(d.tenant)
        if t is not None and t.base == model:
            adapter = t.adapter
    if adapter is not None and m.adapter_field == 'model':
        model_value, adapter_id = adapter, None
    else:
        model_value, adapter_id = m.upstream_model, adapter
    # from the core's rewrite when there is one: it may carry more than the model (stream_options for usage)
    body = _core.rewrite_body(d.body or ctx.body, model_value, adapter_id)
    return Assigned(d, model, adapter, label, m.upstream_model or d.requested_model, None if body is ctx.body else body)


class Live:
    """One configured experiment in this process: its definition, state, samples and shadow stats."""

    def __init__(self, name: str, spec: Experiment, spec_hash: str) -> None:
        self.name = name
        self.spec = spec
        self.spec_hash = spec_hash
        self.kind = 'canary' if spec.canary else ('ab' if spec.variants else 'shadow')
        self.sticky = _sticky_sources(spec.sticky)
        self.watch_empty = spec.canary is not None and 'empty' in spec.canary.gates
        self.state = self.initial_state()
        self.pending = Counts()  # samples not yet sent to Redis
        self.seen = Counts()  # every sample this process took since the epoch began
        self.ttft = _Threshold()
        self.latency = _Threshold()
        self.arms: collections.Counter[str] = collections.Counter()
        self.arm_errors: collections.Counter[str] = collections.Counter()
        self.shadow = ShadowStats()
        self.shadow_tasks: set[asyncio.Task[None]] = set()

    def initial_state(self) -> State:
        s = self.spec
        st = State(name=self.name, kind=self.kind, spec=self.spec_hash, since=time.time())
        if s.canary is not None:
            st.weight = s.canary.steps[0] if s.canary.steps else 0.0
        elif s.variants:
            st.weights = {v.name: v.weight for v in s.variants}
        if s.shadow is not None and s.canary is None:
            st.weight = s.shadow.share
        st.history = [{'at': st.since, 'transition': 'start', 'status': st.status, 'weight': st.weight, 'by': 'config'}]
        return st

    # -- the request path ------------------------------------------------------------------

    def matches(self, d: Any) -> bool:
        s = self.spec
        return (
            (s.route is None or d.route == s.route)
            and (s.model is None or d.pool == s.model)
            and (s.tenant is None or d.tenant == s.tenant)
        )

    def sticky_key(self, ctx: Any, d: Any) -> str:
        for src in self.sticky:
            if src == 'tenant':
                v = d.tenant
            elif src == 'user':
                try:
                    v = _core.body_user(ctx.body)
                except (RequestError, ValueError):
                    v = None
            else:
                v = ctx.scope.headers.get(src[7:])
            if v:
                return f'{src}={v}'
        return f'body={zlib.crc32(ctx.body)}'

    def choose(self, ctx: Any, d: Any) -> tuple[str, str | None, str | None, bool, float] | None:
        """The arm for this request: (label, model, adapter, is the canary's candidate, candidate weight);
        None when the experiment does not change the target (paused A/B, shadow only). No side effect."""
        st = self.state
        spec = self.spec
        if self.kind == 'canary':
            c = spec.canary
            w = st.weight
            cand = _core.bucket(self.name, self.sticky_key(ctx, d)) * 100 < w
            arm = c.candidate if cand else c.baseline  # type: ignore[union-attr]
            return ('candidate' if cand else 'baseline'), arm.to, arm.adapter, cand, w
        if self.kind == 'ab' and st.status != 'paused':
            total = sum(st.weights.values())
            if total <= 0:
                return None
            b = _core.bucket(self.name, self.sticky_key(ctx, d)) * total
            acc = 0.0
            chosen = spec.variants[-1]
            for v in spec.variants:
                acc += st.weights.get(v.name, 0.0)
                if b < acc:
                    chosen = v
                    break
            return chosen.name, chosen.to, chosen.adapter, False, 0.0
        return None

    def assign(self, ctx: Any, d: Any) -> Any:
        spec = self.spec
        shadow = spec.shadow is not None and self.state.status != 'paused'
        if shadow:
            share = spec.shadow.share if spec.canary is not None else self.state.weight  # type: ignore[union-attr]
            shadow = random.random() * 100 < share
        arm = self.choose(ctx, d)
        if arm is None:
            if not shadow:
                return d
            arm = ('primary', None, None, False, 0.0)
        label, model, adapter, cand, w = arm
        out = _retarget(ctx, d, model, adapter, label) if model is not None else None
        self.arms[label] += 1
        ctx.experiment = Ticket(self, label, cand, w, shadow)
        if out is None:
            return d
        ctx.decision = out
        return out

    def done(self, ctx: Any, t: Ticket) -> None:
        status = ctx.status
        err = ctx.error
        if status == 499 or (err is not None and getattr(err, 'status', 0) == 499):
            return  # the client left: says nothing about the arm
        error = status >= 500 or status == 0
        if error:
            self.arm_errors[t.arm] += 1
        if t.shadow:
            self.start_shadow(ctx)
        if self.kind != 'canary':
            return
        gates = self.spec.canary.gates  # type: ignore[union-attr]
        w, cand = t.weight, t.candidate
        pending, seen = self.pending, self.seen

        def add(gate: str, bad: bool) -> None:
            pending.add(gate, w, cand, bad)
            seen.add(gate, w, cand, bad)

        add('requests', False)
        if 'errors' in gates:
            add('errors', error)
        if 'aborts' in gates:
            add('aborts', bool(getattr(ctx, 'aborted', False)))
        if error or status >= 400:
            return
        now = perf_counter_ns()
        total = now - ctx.t0
        first = getattr(ctx, 'ttft_ns', 0)
        ttft = first - ctx.t0 if first else total
        for gate, value, thr in (('ttft_p95', ttft, self.ttft), ('latency_p95', total, self.latency)):
            if gate in gates and thr.limit is not None:
                add(gate, value > thr.limit)
            if not cand:
                thr.push(value)
        if 'empty' in gates and not getattr(ctx, 'aborted', False):
            empty = t.empty if t.empty is not None else not t.content
            add('empty', empty)

    # -- shadow ---------------------------------------------------------------------------

    def start_shadow(self, ctx: Any) -> None:
        sh = self.spec.shadow
        stats = self.shadow
        if sh is None or not ctx.body:
            return
        if stats.in_flight >= sh.max_in_flight:
            stats.dropped += 1
            return
        if LIVE.busy:
            stats.dropped += 1
            stats.shed += 1
            return
        d = ctx.decision
        out = _retarget(ctx, d, sh.to, sh.adapter, 'shadow')
        if out is None:
            return
        stats.in_flight += 1
        stats.primary_latency_ms.values.append((perf_counter_ns() - ctx.t0) / 1e6)
        qs = ctx.scope.query_string
        path = getattr(d, 'upstream_path', None) or ctx.path
        if qs:
            path = f'{path}?{qs}'
        task = asyncio.ensure_future(
            self._shadow(ctx.snap, sh.to, path, out.body or ctx.body, ctx.rid, bool(getattr(d, 'stream', False)))
        )
        self.shadow_tasks.add(task)
        task.add_done_callback(self.shadow_tasks.discard)

    async def _shadow(self, snap: Any, model: str, path: str, body: bytes, rid: str, stream: bool) -> None:
        stats = self.shadow
        pool = snap.pools.get(model)
        t0 = perf_counter_ns()
        try:
            if pool is None or not pool.endpoints:
                raise RuntimeError(f'model {model} has no endpoints')
            ep = pool.pick()
            headers = [
                *pool.auth_headers,
                ('content-type', 'application/json'),
                ('x-request-id', f'{rid}-shadow'),
                ('x-fastroute-shadow', '1'),
                ('user-agent', USER_AGENT),
            ]
            if stream:
                up = await ep.open_stream('POST', path, headers, body)
                status = up.status
                data = bytearray()
                try:
                    while True:
                        chunk = await up.read_chunk()
                        if chunk is None:
                            break
                        if not data:
                            stats.ttft_ms.values.append((perf_counter_ns() - t0) / 1e6)
                        data += chunk
                finally:
                    await up.aclose()
                raw = bytes(data)
            else:
                resp = await ep.send('POST', path, headers, body)
                status = resp.status
                raw = bytes(resp.body)  # type: ignore[call-overload]
                stats.ttft_ms.values.append((perf_counter_ns() - t0) / 1e6)
            stats.statuses[str(status)] += 1
            if status >= 500:
                stats.errors += 1
            for k, v in _USAGE.findall(raw):
                if k == b'prompt_tokens':
                    stats.prompt_tokens += int(v)
                else:
                    stats.completion_tokens += int(v)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            stats.errors += 1
            stats.statuses[type(exc).__name__] += 1
        finally:
            stats.in_flight -= 1
            stats.sent += 1
            stats.latency_ms.values.append((perf_counter_ns() - t0) / 1e6)

    # -- the admin view -------------------------------------------------------------------

    def view(self, verdict: dict[str, Any] | None = None) -> dict[str, Any]:
        st = self.state
        out: dict[str, Any] = {
            'name': self.name,
            'kind': self.kind,
            'scope': {'route': self.spec.route, 'model': self.spec.model, 'tenant': self.spec.tenant},
            'state': msgspec.to_builtins(st),
            'requests_this_worker': dict(self.arms),
            'errors_this_worker': dict(self.arm_errors),
        }
        if self.spec.canary is not None:
            c = self.spec.canary
            out['canary'] = {
                'baseline': msgspec.to_builtins(c.baseline),
                'candidate': msgspec.to_builtins(c.candidate),
                'steps': c.steps,
                'gates': c.gates,
                'alpha': c.alpha,
                'last_look': verdict,
            }
        if self.spec.shadow is not None:
            out['shadow'] = {'to': self.spec.shadow.to, 'adapter': self.spec.shadow.adapter, **self.shadow.view()}
        return out


def _spec_hash(spec: Experiment) -> str:
    return hashlib.sha256(msgspec.json.encode(spec)).hexdigest()[:12]


def _note(st: State, transition: str, by: str, reason: str, now: float) -> None:
    entry = {'at': now, 'transition': transition, 'status': st.status, 'weight': st.weight, 'by': by}
    if st.kind == 'ab':
        entry['weights'] = dict(st.weights)
    if reason:
        entry['reason'] = reason
    st.reason = reason or st.reason
    st.history = [*st.history, entry][-HISTORY:]


class Registry:
    """The experiments of this process, their sync loop and their controller."""

    def __init__(self) -> None:
        self.live: list[Live] = []
        self.by_name: dict[str, Live] = {}
        self.active = False
        self.cfg: Config | None = None
        self.store: SharedState | LocalFiles | None = None
        self._store_cfg: Any = None
        self._task: asyncio.Task[None] | None = None
        self.owner = f'{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}'
        self.leader = False
        self.busy = False  # the event loop lags: shed shadow traffic
        self.last_verdict: dict[str, dict[str, Any]] = {}

    # -- configuration --------------------------------------------------------------------

    def configure(self, cfg: Config) -> None:
        """Take the experiments of a newly compiled config. An experiment whose definition did not change
        keeps its state and samples; a new or changed one starts fresh; a removed one is dropped."""
        live: list[Live] = []
        for name, spec in cfg.experiments.items():
            h = _spec_hash(spec)
            old = self.by_name.get(name)
            live.append(old if old is not None and old.spec_hash == h else Live(name, spec, h))
        self.live = live
        self.by_name = {e.name: e for e in live}
        self.active = bool(live)
        self.cfg = cfg
        if cfg.redis != self._store_cfg:
            self._store_cfg = cfg.redis
            old_store, self.store = self.store, None
            if old_store is not None:
                _spawn(old_store.close())

    def _ensure_store(self) -> SharedState | LocalFiles | None:
        if self.store is None:
            from fastroute.sharedstate import STATE_DIR_ENV, LocalFiles, SharedState

            r = self._store_cfg
            if r is not None:
                self.store = SharedState(r.url, r.key_prefix, r.timeout)
            elif os.environ.get(STATE_DIR_ENV):
                self.store = LocalFiles(os.environ[STATE_DIR_ENV])
        return self.store

    def ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self.owner = f'{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}'  # per worker, after a fork
            self._ensure_store()
            self._task = asyncio.ensure_future(self._run())

    # -- the request path ------------------------------------------------------------------

    def assign(self, ctx: Any, d: Any) -> Any:
        """After `decide`: the first experiment in scope picks the arm. Returns the decision to serve."""
        if self._task is None:
            self.ensure_started()
        for e in self.live:
            if e.matches(d):
                return e.assign(ctx, d)
        return d

    def explain(self, ctx: Any, d: Any) -> dict[str, Any] | None:
        """What `assign` would do with this request, for `/v1/route/explain`. No side effect."""
        for e in self.live:
            if e.matches(d):
                arm = e.choose(ctx, d)
                out: dict[str, Any] = {'name': e.name, 'kind': e.kind, 'status': e.state.status}
                if arm is not None:
                    out.update(arm=arm[0], model=arm[1], adapter=arm[2], sticky_key=e.sticky_key(ctx, d))
                if e.spec.shadow is not None:
                    out['shadow'] = {'to': e.spec.shadow.to, 'adapter': e.spec.shadow.adapter}
                return out
        return None

    # -- shared state ----------------------------------------------------------------------

    def _key(self, e: Live, *parts: str) -> str:
        assert self.store is not None
        return self.store.key('exp', e.name, e.spec_hash, *parts)

    def _adopt(self, e: Live, st: State) -> None:
        if st == e.state:
            return
        old = e.state
        if st.epoch != old.epoch:
            e.pending.clear()
            e.seen.clear()
        e.state = st
        if (st.status, st.step, st.weight, st.weights) != (old.status, old.step, old.weight, old.weights):
            log.info(
                'experiment %s: now %s (step %d, weight %g) as decided by %s',
                e.name,
                st.status,
                st.step,
                st.weight,
                (st.history[-1].get('by') if st.history else '?'),
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception('experiments: sync failed; retrying')
            t = loop.time()
            await asyncio.sleep(SYNC_INTERVAL)
            self.busy = loop.time() - t - SYNC_INTERVAL > SHADOW_SHED_LAG

    async def sync(self) -> None:
        """Send samples, read every state, and (as the leader, or alone) let the canary controller look."""
        from fastroute.sharedstate import Unavailable

        store = self._ensure_store()
        if store is None:
            self.leader = True
            for e in self.live:
                if e.kind == 'canary' and e.state.status == 'running':
                    await self._look(e, e.seen)
            return
        try:
            for e in self.live:
                if e.pending.cells:
                    fields = e.pending.to_fields()
                    await store.add_counts(self._key(e, 'samples', str(e.state.epoch)), fields)
                    e.pending.clear()
            docs = await store.get_many([self._key(e, 'state') for e in self.live])
            for e, doc in zip(self.live, docs, strict=True):
                if doc is None:
                    await store.create(self._key(e, 'state'), _encode(e.state))
                    continue
                try:
                    self._adopt(e, _state_decoder.decode(doc))
                except msgspec.DecodeError:
                    log.error('experiment %s: unreadable state in redis; rewriting it', e.name)
                    await store.cas(self._key(e, 'state'), _version_of(doc), _encode(e.state))
            canaries = [e for e in self.live if e.kind == 'canary' and e.state.status == 'running']
            self.leader = bool(canaries) and await store.lease(store.key('exp', 'leader'), self.owner, LEASE_MS)
            if self.leader:
                for e in canaries:
                    raw = await store.counts(self._key(e, 'samples', str(e.state.epoch)))
                    await self._look(e, Counts.from_fields(raw))
        except Unavailable:
            self.leader = False  # no shared samples: decide nothing until Redis is back

    async def _look(self, e: Live, counts: Counts) -> None:
        c = e.spec.canary
        assert c is not None
        st = e.state
        cand_total = counts.totals('requests')[1]
        v = evaluate(
            counts,
            c.gates,
            c.alpha,
            step_elapsed=time.time() - st.since,
            step_samples=cand_total - st.step_base,
            min_duration=c.min_duration,
            min_samples=c.min_samples,
        )
        self.last_verdict[e.name] = {'action': v.action, 'reason': v.reason, 'gates': v.gates}
        if v.action == 'rollback':
            await self.act(e.name, 'rollback', by='controller', reason=v.reason, counts=counts)
        elif v.action == 'promote':
            await self.act(e.name, 'promote', by='controller', reason=v.reason, counts=counts)

    # -- actions ---------------------------------------------------------------------------

    async def act(
        self,
        name: str,
        action: str,
        *,
        by: str = 'operator',
        reason: str = '',
        weight: float | None = None,
        weights: dict[str, float] | None = None,
        counts: Counts | None = None,
    ) -> State:
        """Apply `action` (pause, resume, promote, rollback, set-weight) to the latest state, by compare-and-set
        when shared. Raises KeyError (no such experiment), ActionError, or sharedstate.Unavailable."""
        e = self.by_name[name]

        def cand_total() -> int:
            return (counts or e.seen).totals('requests')[1]

        def apply(st: State) -> State | None:
            return _apply(e, st, action, by, reason, weight, weights, cand_total)

        store = self._ensure_store()
        if store is None:
            new = apply(msgspec.structs.replace(e.state))
            if new is None:
                return e.state
            new.version = e.state.version + 1
            self._adopt(e, new)
            _count(e, new, action, by)
            return new
        key = self._key(e, 'state')
        if counts is None and e.kind == 'canary':  # where the step starts is counted over every worker
            counts = Counts.from_fields(await store.counts(self._key(e, 'samples', str(e.state.epoch))))
        for _ in range(5):
            (doc,) = await store.get_many([key])
            cur = _state_decoder.decode(doc) if doc is not None else e.state
            base_version = cur.version if doc is not None else 0
            new = apply(msgspec.structs.replace(cur))
            if new is None:
                self._adopt(e, cur)
                return cur
            new.version = cur.version + 1
            if await store.cas(key, base_version, _encode(new)):
                self._adopt(e, new)
                _count(e, new, action, by)
                return new
        raise ActionError('the experiment state kept changing under this action; try again')


def _version_of(doc: bytes) -> int:
    try:
        v = msgspec.json.decode(doc).get('version', 0)
        return int(v)
    except (msgspec.DecodeError, AttributeError, TypeError, ValueError):
        return 0


def _count(e: Live, st: State, action: str, by: str) -> None:
    entry = {'experiment': e.name, **st.history[-1]} if st.history else {'experiment': e.name, 'transition': action}
    TRANSITIONS.append(entry)
    transition = str(entry.get('transition', action))
    TRANSITION_COUNTS[(e.name, transition)] += 1
    try:  # fastroute_experiment_transitions_total: the process that made the transition counts it once
        from fastroute import metrics

        metrics.get().experiment_transitions.labels(e.name, transition).inc()
    except Exception:  # counting must never stop a transition
        log.debug('experiment %s: transition not counted in metrics', e.name, exc_info=True)
    lvl = logging.WARNING if st.status == 'rolled_back' else logging.INFO
    log.log(
        lvl,
        'experiment %s: %s by %s -> %s, weight %g%s',
        e.name,
        entry.get('transition', action),
        by,
        st.status,
        st.weight,
        f' ({st.reason})' if st.reason else '',
    )


class _Act:
    """What an action needs besides the state."""

    __slots__ = ('by', 'c', 'cand_total', 'e', 'now', 'reason', 'weight', 'weights')

    def __init__(self, e: Live, by: str, reason: str, weight: Any, weights: Any, cand_total: Callable[[], int]):
        self.e, self.c, self.by, self.reason = e, e.spec.canary, by, reason
        self.weight, self.weights, self.cand_total, self.now = weight, weights, cand_total, time.time()


def _pause(a: _Act, st: State) -> State | None:
    if st.status == 'paused':
        return None
    if st.status in ('promoted', 'rolled_back'):
        raise ActionError(f'experiment {a.e.name} is {st.status}; nothing to pause')
    st.status = 'paused'
    return st


def _resume(a: _Act, st: State) -> State | None:
    c = a.c
    if st.status == 'running':
        return None
    if st.status == 'promoted':
        raise ActionError(f'experiment {a.e.name} was promoted; nothing to resume')
    if st.status == 'rolled_back' and c is not None:
        st.step, st.weight, st.epoch, st.step_base = 0, c.steps[0], st.epoch + 1, 0
    elif c is not None:
        st.weight = c.steps[st.step]
        st.step_base = a.cand_total()
    st.status, st.since = 'running', a.now
    return st


def _rollback(a: _Act, st: State) -> State | None:
    if a.c is None:
        raise ActionError(f'experiment {a.e.name} is not a canary; pause it, or set its weights')
    if st.status == 'rolled_back':
        return None
    st.status, st.weight, st.since = 'rolled_back', 0.0, a.now
    return st


def _promote(a: _Act, st: State) -> State | None:
    c = a.c
    if c is None:
        raise ActionError(f'experiment {a.e.name} is not a canary; set its weights instead')
    if st.status == 'promoted':
        raise ActionError(f'experiment {a.e.name} is already promoted')
    if st.status == 'rolled_back':
        raise ActionError(f'experiment {a.e.name} is rolled back; resume it first (it starts again at step 1)')
    if st.step >= len(c.steps) - 1:
        st.status = 'promoted'
    else:
        st.step += 1
        st.weight = c.steps[st.step]
        st.status = 'promoted' if st.weight >= 100 else 'running'
    st.since, st.step_base = a.now, a.cand_total()
    return st


def _set_weight(a: _Act, st: State) -> State | None:
    e, weights, weight = a.e, a.weights, a.weight
    if e.kind == 'ab':
        if not weights:
            raise ActionError('give "weights": {variant: weight, ...}', 400)
        known = {v.name for v in e.spec.variants}
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ActionError(f'unknown variant(s) {", ".join(unknown)}; variants: {", ".join(sorted(known))}', 400)
        new = {**st.weights, **{k: float(v) for k, v in weights.items()}}
        if any(not (v >= 0) for v in new.values()) or sum(new.values()) <= 0:
            raise ActionError('weights must be 0 or more and not all 0', 400)
        st.weights = new
    else:
        if weight is None or not (0 <= weight <= 100):
            raise ActionError('give "weight": a percent in [0, 100]', 400)
        st.weight = float(weight)
        if a.c is not None:
            st.status = 'paused'  # an operator's weight holds until resume
    st.since = a.now
    return st


_ACTIONS: dict[str, Callable[[_Act, State], State | None]] = {
    'pause': _pause,
    'resume': _resume,
    'rollback': _rollback,
    'promote': _promote,
    'set-weight': _set_weight,
}


def _apply(
    e: Live,
    st: State,
    action: str,
    by: str,
    reason: str,
    weight: float | None,
    weights: dict[str, float] | None,
    cand_total: Callable[[], int],
) -> State | None:
    """The new state after `action`, or None when it changes nothing. Pure but for the clock."""
    fn = _ACTIONS.get(action)
    if fn is None:
        raise ActionError(f'unknown action {action!r}', 400)
    a = _Act(e, by, reason, weight, weights, cand_total)
    out = fn(a, st)
    if out is not None:
        _note(out, action, by, reason, a.now)
    return out


def _spawn(coro: Any) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        coro.close()
        return
    asyncio.ensure_future(coro)


LIVE = Registry()


def share_between_workers() -> str:
    """Before forking workers without Redis: a directory through which they will share experiment state.
    Removed when this (the parent) process exits."""
    import atexit
    import shutil
    import tempfile

    from fastroute.sharedstate import STATE_DIR_ENV

    d = tempfile.mkdtemp(prefix='fastroute-state-')
    os.environ[STATE_DIR_ENV] = d
    pid = os.getpid()
    atexit.register(lambda: os.getpid() == pid and shutil.rmtree(d, ignore_errors=True))
    return d


# ---------------------------------------------------------------------------------------------
# Admin endpoints.
# ---------------------------------------------------------------------------------------------


def _one(req: AdminRequest, name: str | None) -> Live:
    if not name:
        raise ValueError('name the experiment: ?name=NAME or {"name": NAME}')
    e = LIVE.by_name.get(name)
    if e is None:
        known = ', '.join(LIVE.by_name) or 'none configured'
        raise LookupError(f'no experiment {name!r} (known: {known})')
    return e


def _status_view() -> dict[str, Any]:
    store = LIVE.store
    return {
        'shared': store is not None,
        'through': store.url if store is not None else None,
        'redis_up': store.up if store is not None else None,
        'redis_error': (store.last_error or None) if store is not None and not store.up else None,
        'controller_here': LIVE.leader,
    }


def dashboard_state(snap: Any) -> list[dict[str, Any]]:
    """Each experiment as the dashboard shows it: kind, status, current step and weights (this worker's view
    of the shared state), the last transition."""
    out: list[dict[str, Any]] = []
    for e in LIVE.live:
        st = e.state
        item: dict[str, Any] = {'name': e.name, 'kind': e.kind, 'status': st.status}
        if e.kind == 'canary' and e.spec.canary is not None:
            steps = e.spec.canary.steps
            item['step'] = f'{st.weight:g}% (step {min(st.step, len(steps) - 1) + 1} of {len(steps)})'
        elif e.kind == 'ab':
            item['step'] = ', '.join(f'{k} {v:g}' for k, v in st.weights.items())
        else:
            item['step'] = f'{st.weight:g}% mirrored'
        if st.history:
            last = st.history[-1]
            item['last'] = f'{last.get("transition")} by {last.get("by")}' + (f': {st.reason}' if st.reason else '')
        out.append(item)
    return out


@route('GET', '/admin/experiments')
async def _list(req: AdminRequest) -> tuple[int, Any]:
    LIVE.ensure_started()
    return 200, {
        'experiments': [e.view(LIVE.last_verdict.get(e.name)) for e in LIVE.live],
        'state_sharing': _status_view(),
        'transitions': list(TRANSITIONS)[-100:],
    }


@route('GET', '/admin/experiment')
async def _show(req: AdminRequest) -> tuple[int, Any]:
    LIVE.ensure_started()
    try:
        e = _one(req, (req.query.get('name') or [None])[0])
    except LookupError as exc:
        return 404, {'error': {'message': str(exc), 'type': 'admin_error', 'param': 'name', 'code': 'not_found'}}
    return 200, {**e.view(LIVE.last_verdict.get(e.name)), 'state_sharing': _status_view()}


def _action(action: str) -> Any:
    async def handler(req: AdminRequest) -> tuple[int, Any]:
        from fastroute.sharedstate import Unavailable

        LIVE.ensure_started()
        body = req.json()
        if not isinstance(body, dict):
            raise ValueError('the body must be a JSON object: {"name": ..., ...}')
        try:
            e = _one(req, body.get('name') or (req.query.get('name') or [None])[0])
        except LookupError as exc:
            return 404, {'error': {'message': str(exc), 'type': 'admin_error', 'param': 'name', 'code': 'not_found'}}
        weight = body.get('weight')
        weights = body.get('weights')
        if weight is not None and not isinstance(weight, (int, float)):
            raise ValueError('"weight" must be a number (percent)')
        if weights is not None and not (
            isinstance(weights, dict) and all(isinstance(v, (int, float)) for v in weights.values())
        ):
            raise ValueError('"weights" must map variant names to numbers')
        try:
            st = await LIVE.act(
                e.name, action, by='operator', reason=str(body.get('reason') or ''), weight=weight, weights=weights
            )
        except ActionError as exc:
            code = 'invalid_action' if exc.status == 409 else 'invalid_request'
            return exc.status, {'error': {'message': str(exc), 'type': 'admin_error', 'param': None, 'code': code}}
        except Unavailable as exc:
            msg = (
                f'the shared experiment state ({LIVE.store.url if LIVE.store else "?"}) is unreachable ({exc}); the '
                'action was not applied anywhere. Traffic keeps the last known state; retry when it is back'
            )
            return 503, {'error': {'message': msg, 'type': 'admin_error', 'param': None, 'code': 'state_unavailable'}}
        return 200, {'experiment': e.name, 'action': action, 'state': msgspec.to_builtins(st)}

    return handler


for _name in ('pause', 'resume', 'promote', 'rollback', 'set-weight'):
    route('POST', f'/admin/experiments/{_name}')(_action(_name))


# ---------------------------------------------------------------------------------------------
# `fastroute experiments ...`: the admin API from the command line.
# ---------------------------------------------------------------------------------------------


def cli_experiments_args(p: Any) -> None:
    p.add_argument('action', choices=['list', 'show', 'pause', 'resume', 'promote', 'rollback', 'set-weight'])
    p.add_argument('name', nargs='?', help='the experiment (all but list)')
    p.add_argument('weights', nargs='*', help='set-weight: a percent (canary, shadow) or VARIANT=WEIGHT ...')
    p.add_argument('-c', '--config', help='read the admin address (admin.listen) from this config')
    p.add_argument('--admin', help='admin API base URL, e.g. http://127.0.0.1:9090 (default: from --config)')
    p.add_argument('--token-env', default=None, help='env var holding the admin token (default: admin.token_env)')
    p.add_argument('--reason', default='', help='recorded in the experiment history')


def cli_experiments(args: Any) -> int:
    """`fastroute experiments ACTION [NAME]`: list, show, pause, resume, promote, rollback, set-weight."""
    import json
    import sys
    import urllib.error
    import urllib.request

    base, token_env = args.admin, args.token_env
    if args.config:
        from fastroute.config import load_config

        try:
            cfg = load_config(args.config)
        except Exception as exc:
            print(f'fastroute: config error: {exc}', file=sys.stderr)
            return 1
        if cfg.admin is None:
            print(f'fastroute: {args.config} has no admin: section; pass --admin URL', file=sys.stderr)
            return 1
        base = base or f'http://{cfg.admin.listen}'
        token_env = token_env or cfg.admin.token_env
    token_env = token_env or 'FASTROUTE_ADMIN_TOKEN'
    if not base:
        print('fastroute: say where the admin API is: --admin URL or -c CONFIG', file=sys.stderr)
        return 2
    token = os.environ.get(token_env)
    if not token:
        print(f'fastroute: the admin token env var {token_env} is not set', file=sys.stderr)
        return 2
    if args.action != 'list' and not args.name:
        print(f'fastroute: experiments {args.action} needs the experiment name', file=sys.stderr)
        return 2
    base = base.rstrip('/')
    if args.action == 'list':
        method, url, body = 'GET', f'{base}/admin/experiments', None
    elif args.action == 'show':
        from urllib.parse import quote

        method, url, body = 'GET', f'{base}/admin/experiment?name={quote(args.name)}', None
    else:
        payload: dict[str, Any] = {'name': args.name, 'reason': args.reason}
        if args.action == 'set-weight':
            try:
                if len(args.weights) == 1 and '=' not in args.weights[0]:
                    payload['weight'] = float(args.weights[0])
                else:
                    payload['weights'] = {k: float(v) for k, _, v in (w.partition('=') for w in args.weights)}
            except ValueError:
                print('fastroute: set-weight takes a percent, or VARIANT=WEIGHT pairs', file=sys.stderr)
                return 2
            if not args.weights:
                print('fastroute: set-weight takes a percent, or VARIANT=WEIGHT pairs', file=sys.stderr)
                return 2
        method, url, body = 'POST', f'{base}/admin/experiments/{args.action}', json.dumps(payload).encode()
    req = urllib.request.Request(
        url, data=body, method=method, headers={'authorization': f'Bearer {token}', 'content-type': 'application/json'}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            data, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        with exc:
            data, status = exc.read(), exc.code
    except OSError as exc:
        print(f'fastroute: cannot reach the admin API at {base}: {exc}', file=sys.stderr)
        return 1
    try:
        out = json.loads(data)
    except ValueError:
        out = {'raw': data.decode('utf-8', 'replace')}
    if status >= 400:
        msg = out.get('error', {}).get('message') if isinstance(out, dict) else None
        print(f'fastroute: {status}: {msg or out}', file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0
