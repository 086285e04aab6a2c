"""Cost of a request: tokens (the upstream's `usage`, else the estimate) times the model's price, and what the
same tokens would have cost on the reference model (`spend.reference`), so the saving of routing shows.

Usage is read without parsing answers on the hot path:
- a non-streamed answer: after it was sent, the bytes are searched for `"usage"` and only that object is decoded;
- a stream: the core asked the upstream for a final usage chunk (`stream_options.include_usage`, see
  `Decision.usage_injected`); `StreamUsage` takes that chunk out of the stream when the client did not ask for
  it, so the client sees exactly what it asked for.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import msgspec

from fastroute._core import find_bytes

if TYPE_CHECKING:
    from fastroute.config import Config, Price

__all__ = ['Prices', 'StreamUsage', 'Usage', 'body_usage']


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct):
    usage: Usage | None = None


class _Event(msgspec.Struct):
    choices: list[msgspec.Raw] | None = None
    usage: Usage | None = None


_ENDS = (b'\n\n', b'\r\n\r\n')  # the end of an SSE event
MAX_PENDING = 64 * 1024  # bytes of an unfinished event held back at most
_EVENT = re.compile(rb'(.*?)(\r?\n\r?\n)', re.S)


def _events(data: bytes) -> list[tuple[bytes, bytes]]:
    """(event, its separator) for each complete event of `data` (which ends with a separator)."""
    return [(m.group(1), m.group(2)) for m in _EVENT.finditer(data)]


_decode_body = msgspec.json.Decoder(_WithUsage).decode
_decode_event = msgspec.json.Decoder(_Event).decode
_decode_usage = msgspec.json.Decoder(Usage).decode


def body_usage(body: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of a non-streamed answer, or None when it has no usage."""
    i = body.rfind(b'"usage"')
    if i < 0:
        return None
    # The usage object is small and flat: decode just it when it is found in place, else the whole answer.
    j = body.find(b'{', i + 7, i + 32)
    if j >= 0:
        k = body.find(b'}', j)
        if k > j:
            try:
                u = _decode_usage(body[j : k + 1])
                return u.prompt_tokens, u.completion_tokens
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
    try:
        w = _decode_body(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return (w.usage.prompt_tokens, w.usage.completion_tokens) if w.usage is not None else None


class StreamUsage:
    """Reads the usage chunk of an SSE stream; with `strip`, takes it out (the client did not ask for it).

    `feed(chunk)` returns the bytes to send on. Only chunks that may hold usage come here (see `wants`): when
    stripping, an event split over two reads is held until it is complete (an SSE client could not use half
    an event anyway), so the usage event is never half sent.
    """

    __slots__ = ('chunks', 'pending', 'strip', 'usage')

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.pending = b''
        self.usage: tuple[int, int] | None = None
        self.chunks = 0

    def wants(self, chunk: bytes) -> bool:
        """Whether `chunk` must go through `feed` (cheap: one search, one suffix test)."""
        # NOTE: find_bytes (a SIMD search) instead of `in`: 9.9k -> ~1k instructions for a 3.8 KB stream read
        # at once (callgrind); every byte of a stream goes through here.
        if self.strip:
            return bool(self.pending) or not chunk.endswith(_ENDS) or find_bytes(chunk, b'"usage"') >= 0
        return find_bytes(chunk, b'"usage"') >= 0

    def feed(self, chunk: bytes) -> bytes:
        if not self.strip:
            self._read(chunk)
            return chunk
        data = self.pending + chunk if self.pending else chunk
        end = max(data.rfind(b'\n\n') + 2, data.rfind(b'\r\n\r\n') + 4, 0)
        if end == 0 and len(data) > MAX_PENDING:
            end = len(data)  # not SSE as expected: never hold more than this, pass it on
        self.pending = data[end:]
        done = data[:end]
        if b'"usage"' not in done:
            return done
        out = []
        for event, sep in _events(done):
            if b'"usage"' in event and self._read(event) is not None:
                continue  # the usage-only chunk: fastroute's, not the client's
            out.append(event + sep)
        return b''.join(out)

    def flush(self) -> bytes:
        """What is still held when the stream ends (an unterminated last event)."""
        rest, self.pending = self.pending, b''
        return rest

    def _read(self, data: bytes) -> tuple[int, int] | None:
        """Record the usage of the events in `data`; return it when `data` is one usage-only event."""
        found = None
        for line in data.split(b'\n'):
            line = line.rstrip(b'\r')
            if not line.startswith(b'data:') or b'"usage"' not in line:
                continue
            try:
                ev = _decode_event(line[5:])
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if ev.usage is not None:
                self.usage = (ev.usage.prompt_tokens, ev.usage.completion_tokens)
                if not ev.choices:
                    found = self.usage
        return found


class Prices:
    """USD per input token, per output token and per request, by model; and the reference model's."""

    __slots__ = ('by_model', 'reference', 'reference_name')

    def __init__(self, cfg: Config) -> None:
        self.by_model: dict[str, tuple[float, float, float]] = {n: _per_token(m.price) for n, m in cfg.models.items()}
        ref = cfg.spend.reference if cfg.spend is not None else None
        self.reference_name = ref
        self.reference = self.by_model.get(ref) if ref else None

    def cost(self, model: str | None, tokens_in: int, tokens_out: int) -> tuple[float, float]:
        """(cost, reference cost) in USD. Without a reference, the reference cost is the cost (no saving)."""
        p = self.by_model.get(model) if model else None
        cost = p[0] * tokens_in + p[1] * tokens_out + p[2] if p is not None else 0.0
        r = self.reference
        ref = r[0] * tokens_in + r[1] * tokens_out + r[2] if r is not None else cost
        return cost, ref


def _per_token(p: Price) -> tuple[float, float, float]:
    return p.input_per_1k / 1000.0, p.output_per_1k / 1000.0, p.per_request
