//! The request as the router sees it: borrowed method, path and header values, and one pass over
//! the JSON body that validates it and pulls out the fields routing needs (`model`, message text,
//! `stream`, `max_tokens`, `user`, `metadata`, …) without building a DOM. Strings stay borrowed
//! slices of the body; nothing here allocates unless a string needed for routing holds escapes.
//! This module must never decide anything and never copy the body.

use std::borrow::Cow;

use memchr::memchr2;

use crate::classify::{Features, Grams};
use crate::error::DecideError;
use crate::tokens::{self, Estimator};

/// Most distinct `metadata.<key>` names the rules of one router may read.
pub const MAX_METADATA_KEYS: usize = 16;
/// Deepest nesting of arrays and objects accepted in a body.
pub const MAX_DEPTH: u32 = 128;
/// Tokens a chat format adds per message (role markers and separators).
pub const TOKENS_PER_MESSAGE: u32 = 4;

/// A request, borrowed from what the server already holds. Built per call; costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// HTTP method, as received.
    pub method: &'a str,
    /// Request path (no query string).
    pub path: &'a str,
    /// Values of the headers the router reads, indexed by the router's header slots
    /// (`CompiledRouter::header_names`); None when absent.
    pub headers: &'a [Option<&'a str>],
    /// The raw body.
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    /// The value of header slot `slot`, if present.
    #[inline]
    #[must_use]
    pub fn header(&self, slot: usize) -> Option<&'a str> {
        self.headers.get(slot).copied().flatten()
    }
}

/// Byte range `[start, end)` in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// A JSON string from the body: its raw content between the quotes (valid UTF-8, escapes not yet
/// decoded) and whether it holds any escape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JStr<'a> {
    /// The bytes between the quotes.
    pub raw: &'a str,
    /// True when `raw` holds a backslash escape.
    pub escaped: bool,
}

impl<'a> JStr<'a> {
    /// The decoded string; allocates only when the string holds escapes.
    #[must_use]
    pub fn decode(&self) -> Cow<'a, str> {
        if self.escaped {
            Cow::Owned(unescape(self.raw))
        } else {
            Cow::Borrowed(self.raw)
        }
    }

    /// Whether the decoded string equals `s`.
    #[inline]
    #[must_use]
    pub fn eq_str(&self, s: &str) -> bool {
        if self.escaped {
            self.decode() == s
        } else {
            self.raw == s
        }
    }
}

/// An object key from the body: its raw bytes between the quotes (validated) and whether it holds an escape.
/// Keys are only compared, so they are never turned into `&str`.
#[derive(Debug, Clone, Copy)]
struct Key<'a> {
    raw: &'a [u8],
    escaped: bool,
}

impl Key<'_> {
    /// Whether the decoded key equals `name`.
    #[inline]
    fn is(&self, name: &str) -> bool {
        if self.escaped {
            escaped_key_is(self.raw, name)
        } else {
            self.raw == name.as_bytes()
        }
    }
}

#[cold]
fn escaped_key_is(raw: &[u8], name: &str) -> bool {
    std::str::from_utf8(raw).is_ok_and(|s| unescape(s) == name)
}

/// The high bit of each byte of `x` (little-endian) that is a quote, a backslash, a control character or not
/// ASCII; the lowest flagged byte is exact (bytes above it may be flagged falsely).
#[inline]
fn special_bytes(x: u64) -> u64 {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    let quote = x ^ (ONES * u64::from(b'"'));
    let backslash = x ^ (ONES * u64::from(b'\\'));
    let zero = |v: u64| v.wrapping_sub(ONES) & !v;
    (zero(quote) | zero(backslash) | (x.wrapping_sub(ONES * 0x20) & !x) | x) & HIGHS
}

/// The length of the run at the start of `s` up to the first quote or backslash (`s.len()` when there is none),
/// and whether the run holds a control character, and a byte that is not ASCII.
#[inline]
fn plain_run(s: &[u8]) -> (usize, bool, bool) {
    #[cfg(target_arch = "x86_64")]
    if s.len() >= 32 && simd::available() {
        return simd::plain_run(s);
    }
    plain_run_scalar(s)
}

/// [`plain_run`] by `memchr2` and one min/max fold: the portable path, and the reference for the SIMD one.
fn plain_run_scalar(s: &[u8]) -> (usize, bool, bool) {
    let end = memchr2(b'"', b'\\', s).unwrap_or(s.len());
    // NOTE: one branch-free min/max fold (it vectorizes; an early-exit `any` does not) replaces a `min` pass plus
    // `str::from_utf8` over every string: ~2.5k fewer instructions per 2 KB chat body (callgrind).
    let (lo, hi) = s[..end]
        .iter()
        .fold((u8::MAX, 0u8), |(lo, hi), &b| (lo.min(b), hi.max(b)));
    (end, lo < 0x20, hi >= 0x80)
}

/// [`plain_run`] 32 bytes at a time with AVX2 (detected at run time): the end search and both checks in one pass,
/// instead of a `memchr2` pass and a fold pass.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_min_epu8, _mm256_movemask_epi8, _mm256_or_si256,
        _mm256_set1_epi8, _mm256_setzero_si256,
    };

    use super::plain_run_scalar;

    /// Whether the CPU has AVX2 (cached by std after the first call).
    #[inline]
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
    }

    /// [`super::plain_run`]; the caller has checked [`available`].
    pub(super) fn plain_run(s: &[u8]) -> (usize, bool, bool) {
        debug_assert!(available());
        // SAFETY: AVX2 is present (checked by the caller through `available`).
        unsafe { plain_run_avx2(s) }
    }

    #[target_feature(enable = "avx2")]
    fn plain_run_avx2(s: &[u8]) -> (usize, bool, bool) {
        let quote = _mm256_set1_epi8(b'"' as i8);
        let backslash = _mm256_set1_epi8(b'\\' as i8);
        let top_control = _mm256_set1_epi8(0x1f);
        // Control-character lanes and all bytes (for their top bits) of the blocks passed so far.
        let (mut control, mut wide) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let mask = |v: __m256i| _mm256_movemask_epi8(v).cast_unsigned();
        let blocks = s.chunks_exact(32);
        let tail = blocks.remainder();
        for (n, chunk) in blocks.enumerate() {
            // SAFETY: `chunk` is 32 readable bytes; the load is unaligned.
            let v = unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) };
            let ends = mask(_mm256_or_si256(
                _mm256_cmpeq_epi8(v, quote),
                _mm256_cmpeq_epi8(v, backslash),
            ));
            // `min(v, 0x1f) == v` exactly where `v <= 0x1f`.
            let c = _mm256_cmpeq_epi8(_mm256_min_epu8(v, top_control), v);
            if ends != 0 {
                let k = ends.trailing_zeros();
                let before = (1u32 << k) - 1;
                return (
                    32 * n + k as usize,
                    mask(control) != 0 || mask(c) & before != 0,
                    mask(wide) != 0 || mask(v) & before != 0,
                );
            }
            control = _mm256_or_si256(control, c);
            wide = _mm256_or_si256(wide, v);
        }
        let o = s.len() - tail.len();
        let (off, c, w) = plain_run_scalar(tail);
        (o + off, c || mask(control) != 0, w || mask(wide) != 0)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use proptest::prelude::*;

        fn check(s: &[u8]) {
            if available() {
                assert_eq!(plain_run(s), plain_run_scalar(s), "{:?}", String::from_utf8_lossy(s));
            }
        }

        #[test]
        fn all_lengths_and_positions() {
            let fill = b"The quick brown fox jumps over the lazy dog, 0123456789 times. ".repeat(4);
            for len in 0..200 {
                let base = &fill[..len];
                check(base);
                for at in 0..len {
                    for b in [b'"', b'\\', 0x00, 0x1f, 0x20, 0x7f, 0x80, 0xc3, 0xe4, 0xff] {
                        let mut t = base.to_vec();
                        t[at] = b;
                        check(&t);
                        // A second special byte after the first: only what comes before the first end counts.
                        if at + 1 < len {
                            t[len - 1] = [b'"', 0x01, 0xe4][at % 3];
                            check(&t);
                        }
                    }
                }
            }
            let multibyte = "中文 é 😀 ".repeat(40);
            for len in 0..multibyte.len().min(200) {
                check(&multibyte.as_bytes()[..len]);
            }
        }

        proptest! {
            #[test]
            fn equals_the_scalar_scan(s in proptest::collection::vec(
                prop_oneof![16 => 0x20u8..0x7f, 1 => any::<u8>(), 1 => Just(b'"'), 1 => Just(b'\\')], 0..300)) {
                check(&s);
            }
        }
    }
}

/// The value of a JSON integer (`-?[0-9]+`, validated), saturated to the `i64` range.
// NOTE: digit by digit, not `str::from_utf8` and `str::parse` (~0.1k instructions for `"max_tokens": 256`, callgrind).
fn saturating_int(digits: &[u8]) -> i64 {
    let (neg, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    let mut v = 0i64;
    for &d in digits {
        let d = i64::from(d.wrapping_sub(b'0'));
        // A negative value is built downwards, so that `i64::MIN` itself is exact.
        v = if neg {
            v.saturating_mul(10).saturating_sub(d)
        } else {
            v.saturating_mul(10).saturating_add(d)
        };
    }
    v
}

#[cold]
fn not_utf8() -> DecideError {
    DecideError::other("the request body holds a string that is not valid UTF-8")
}

/// Decode the escapes of a string already validated by the scanner.
#[cold]
fn unescape(raw: &str) -> String {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    let mut lit = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        out.push_str(&raw[lit..i]);
        let c = b.get(i + 1).copied().unwrap_or(b'\\');
        i += 2;
        match c {
            b'n' => out.push('\n'),
            b't' => out.push('\t'),
            b'r' => out.push('\r'),
            b'b' => out.push('\u{8}'),
            b'f' => out.push('\u{c}'),
            b'u' => {
                let hi = hex4(b, i).unwrap_or(0xFFFD);
                i += 4;
                let cp = if (0xD800..0xDC00).contains(&hi) {
                    let lo = hex4(b, i + 2).unwrap_or(0xDC00);
                    i += 6;
                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                } else {
                    hi
                };
                out.push(char::from_u32(cp).unwrap_or('\u{FFFD}'));
            }
            other => out.push(char::from(other)),
        }
        lit = i;
    }
    out.push_str(&raw[lit.min(raw.len())..]);
    out
}

fn hex4(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    let mut v = 0u32;
    for &c in s {
        v = (v << 4) | char::from(c).to_digit(16)?;
    }
    Some(v)
}

/// What the body scan needs from the compiled router.
#[derive(Debug, Clone, Copy)]
pub struct ScanOptions<'r> {
    /// How text is counted.
    pub estimator: Estimator,
    /// Collect the complexity features of the text instead of estimating its tokens: the second pass a classify
    /// route asks for when it is reached (`est_tokens` is then not meaningful). Only for a body that a token pass
    /// has accepted: the text strings' content is not validated again.
    pub features: bool,
    /// What the feature pass does with hashed n-grams (a trained model's weights, or nothing).
    pub grams: Grams<'r>,
    /// The `metadata.<key>` names rules read, in slot order.
    pub metadata_keys: &'r [Box<str>],
}

impl ScanOptions<'_> {
    /// The token pass with `estimator`: no features, no n-grams, no metadata.
    #[must_use]
    pub const fn tokens(estimator: Estimator) -> Self {
        Self {
            estimator,
            features: false,
            grams: Grams::Off,
            metadata_keys: &[],
        }
    }
}

/// What one pass over the body found. Borrowed from the body; built on the stack.
#[derive(Debug, Clone)]
pub struct Body<'a> {
    /// The `model` value.
    pub model: Option<JStr<'a>>,
    /// Span of the `model` value, quotes included.
    pub model_span: Option<Span>,
    /// The `adapter_id` value (LoRAX).
    pub adapter_id: Option<JStr<'a>>,
    /// Span of the `adapter_id` value, quotes included.
    pub adapter_id_span: Option<Span>,
    /// `stream`.
    pub stream: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<i64>,
    /// `user`.
    pub user: Option<JStr<'a>>,
    /// `metadata.<key>` string values, by metadata slot.
    pub metadata: [Option<JStr<'a>>; MAX_METADATA_KEYS],
    /// Estimated input tokens.
    pub est_tokens: u32,
    /// Complexity features (zero unless `ScanOptions::features`).
    pub features: Features,
    /// Offset of the top-level object's closing `}`.
    pub close: usize,
    /// Number of top-level fields.
    pub fields: u32,
    /// `stream_options`, when the body has it.
    pub stream_options: Option<StreamOptions>,
}

/// Where `stream_options` sits in the body, for the rewrite that asks the upstream for usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// Span of the value (`null` or the object).
    pub span: Span,
    /// Offset of the object's closing `}` (None when the value is `null`).
    pub close: Option<usize>,
    /// Number of members of the object.
    pub fields: u32,
    /// Span of the `include_usage` value, when present.
    pub include_usage_span: Option<Span>,
    /// `include_usage` is `true`: the client asked for usage itself.
    pub include_usage: bool,
}

const SEEN_MODEL: u16 = 1;
const SEEN_MESSAGES: u16 = 1 << 1;
const SEEN_PROMPT: u16 = 1 << 2;
const SEEN_INPUT: u16 = 1 << 3;
const SEEN_STREAM: u16 = 1 << 4;
const SEEN_MAX_TOKENS: u16 = 1 << 5;
const SEEN_MAX_COMPLETION: u16 = 1 << 6;
const SEEN_USER: u16 = 1 << 7;
const SEEN_METADATA: u16 = 1 << 8;
const SEEN_ADAPTER_ID: u16 = 1 << 9;
const SEEN_STREAM_OPTIONS: u16 = 1 << 10;

/// Scan `body` once: validate it as one JSON object and extract the routing fields.
/// Cost is linear in the body (a few passes of SIMD-friendly loops over string bytes);
/// no allocation unless a metadata key or `model` holds escapes.
///
/// # Errors
/// Malformed JSON, trailing bytes, a body that is not an object, invalid UTF-8 in a string,
/// or a known field of the wrong type.
pub fn scan<'a>(body: &'a [u8], opts: &ScanOptions<'_>) -> Result<Body<'a>, DecideError> {
    let mut s = Scanner {
        buf: body,
        pos: 0,
        opts,
        tokens: 0,
        features: Features::default(),
    };
    let mut out = Body {
        model: None,
        model_span: None,
        adapter_id: None,
        adapter_id_span: None,
        stream: false,
        max_tokens: None,
        user: None,
        metadata: [None; MAX_METADATA_KEYS],
        est_tokens: 0,
        features: Features::default(),
        close: 0,
        fields: 0,
        stream_options: None,
    };
    s.ws();
    if s.peek() != Some(b'{') {
        return Err(DecideError::other("the request body must be a JSON object"));
    }
    let mut seen = 0u16;
    let mut max_tokens = None;
    let mut max_completion = None;
    if s.object_open()? {
        loop {
            out.fields += 1;
            let key = s.object_key()?;
            let (bit, field) = classify_key(key);
            if bit != 0 {
                if seen & bit != 0 {
                    return Err(DecideError::field(field, "a field appears twice in the request body"));
                }
                seen |= bit;
            }
            match bit {
                SEEN_MODEL => {
                    let start = s.pos;
                    if let Some(v) = s.opt_string(field, "`model` must be a string")? {
                        out.model = Some(v);
                        out.model_span = Some(Span { start, end: s.pos });
                    }
                }
                SEEN_ADAPTER_ID => {
                    let start = s.pos;
                    if let Some(v) = s.opt_string(field, "`adapter_id` must be a string")? {
                        out.adapter_id = Some(v);
                        out.adapter_id_span = Some(Span { start, end: s.pos });
                    }
                }
                SEEN_MESSAGES => s.messages()?,
                SEEN_PROMPT => s.prompt_like(field, "`prompt` must be a string or an array")?,
                SEEN_INPUT => s.prompt_like(field, "`input` must be a string or an array")?,
                SEEN_STREAM => out.stream = s.opt_bool(field, "`stream` must be a boolean")?.unwrap_or(false),
                SEEN_MAX_TOKENS => max_tokens = s.opt_int(field, "`max_tokens` must be an integer")?,
                SEEN_MAX_COMPLETION => {
                    max_completion = s.opt_int(field, "`max_completion_tokens` must be an integer")?;
                }
                SEEN_USER => out.user = s.opt_string(field, "`user` must be a string")?,
                SEEN_METADATA => s.metadata(&mut out.metadata)?,
                SEEN_STREAM_OPTIONS => out.stream_options = Some(s.stream_options()?),
                _ => s.skip_value(1)?,
            }
            if !s.object_next()? {
                break;
            }
        }
    }
    out.close = s.pos - 1;
    s.ws();
    if s.pos != body.len() {
        return Err(DecideError::syntax("unexpected data after the JSON object", s.pos));
    }
    out.max_tokens = max_completion.or(max_tokens);
    out.est_tokens = s.tokens;
    out.features = s.features;
    Ok(out)
}

fn classify_key(key: Key<'_>) -> (u16, &'static str) {
    if key.escaped {
        return classify_escaped_key(key.raw);
    }
    match key.raw {
        b"model" => (SEEN_MODEL, "model"),
        b"messages" => (SEEN_MESSAGES, "messages"),
        b"prompt" => (SEEN_PROMPT, "prompt"),
        b"input" => (SEEN_INPUT, "input"),
        b"stream" => (SEEN_STREAM, "stream"),
        b"max_tokens" => (SEEN_MAX_TOKENS, "max_tokens"),
        b"max_completion_tokens" => (SEEN_MAX_COMPLETION, "max_completion_tokens"),
        b"user" => (SEEN_USER, "user"),
        b"metadata" => (SEEN_METADATA, "metadata"),
        b"adapter_id" => (SEEN_ADAPTER_ID, "adapter_id"),
        b"stream_options" => (SEEN_STREAM_OPTIONS, "stream_options"),
        _ => (0, ""),
    }
}

#[cold]
fn classify_escaped_key(raw: &[u8]) -> (u16, &'static str) {
    match std::str::from_utf8(raw) {
        Ok(s) if s.len() <= 6 * 21 => classify_key(Key {
            raw: unescape(s).as_bytes(),
            escaped: false,
        }),
        _ => (0, ""),
    }
}

struct Scanner<'a, 'o, 'r> {
    buf: &'a [u8],
    pos: usize,
    opts: &'o ScanOptions<'r>,
    tokens: u32,
    features: Features,
}

impl<'a> Scanner<'a, '_, '_> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    #[cold]
    fn unexpected(&self) -> DecideError {
        if self.pos >= self.buf.len() {
            DecideError::syntax("unexpected end of input", self.pos)
        } else {
            DecideError::syntax("unexpected character", self.pos)
        }
    }

    fn expect(&mut self, b: u8) -> Result<(), DecideError> {
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected())
        }
    }

    /// At `{`: consume it; true when the object has members.
    fn object_open(&mut self) -> Result<bool, DecideError> {
        self.expect(b'{')?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            Ok(false)
        } else {
            Ok(true)
        }
    }

    /// Read `"key" :` and leave the cursor on the value.
    fn object_key(&mut self) -> Result<Key<'a>, DecideError> {
        if self.peek() != Some(b'"') {
            return Err(self.unexpected());
        }
        // NOTE: the string read inlined, not called: a key is short, and the call with its result passed through
        // memory cost about as much as reading it.
        let (raw, escaped) = self.raw_string_after(0)?;
        let key = Key { raw, escaped };
        self.ws();
        self.expect(b':')?;
        self.ws();
        Ok(key)
    }

    /// After a member's value: true if another member follows.
    fn object_next(&mut self) -> Result<bool, DecideError> {
        self.next_or_close(b'}')
    }

    fn array_open(&mut self) -> Result<bool, DecideError> {
        self.expect(b'[')?;
        self.ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            Ok(false)
        } else {
            Ok(true)
        }
    }

    /// After an element: true if another element follows.
    fn array_next(&mut self) -> Result<bool, DecideError> {
        self.next_or_close(b']')
    }

    /// After a member or element: `,` (true, another follows) or the container's `close` (false).
    #[inline]
    fn next_or_close(&mut self, close: u8) -> Result<bool, DecideError> {
        self.ws();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                self.ws();
                Ok(true)
            }
            Some(b) if b == close => {
                self.pos += 1;
                Ok(false)
            }
            _ => Err(self.unexpected()),
        }
    }

    /// At `"`: read one string, validating escapes, control characters and UTF-8.
    // NOTE: `raw_string` has validated the bytes as UTF-8 already (printable ASCII, or checked by `from_utf8`);
    // checking them again cost ~0.1k instructions per short string (`model`, `user`; callgrind).
    #[allow(unsafe_code)]
    fn string(&mut self) -> Result<JStr<'a>, DecideError> {
        let (raw, escaped) = self.raw_string()?;
        debug_assert!(std::str::from_utf8(raw).is_ok());
        // SAFETY: `raw_string_after` returns only bytes that are valid UTF-8: those it passed as plain printable
        // ASCII, then (from `plain`) escapes of printable ASCII and runs it checked to be ASCII, or else ran through
        // `str::from_utf8` (a failure is an error before any string is returned).
        let text = unsafe { std::str::from_utf8_unchecked(raw) };
        Ok(JStr { raw: text, escaped })
    }

    /// At `"`: read and validate one string like [`Self::string`], returning its raw bytes and whether it holds
    /// escapes. For strings only counted or skipped: an ASCII string is never run through a UTF-8 validator.
    fn raw_string(&mut self) -> Result<(&'a [u8], bool), DecideError> {
        self.raw_string_after(0)
    }

    /// [`Self::raw_string`] of a string whose first `known` bytes are already known to be plain printable ASCII
    /// without a quote or a backslash (`tokens::plain_prefix`): the search for its end starts after them.
    // NOTE: inlined into `raw_string` too, where `known` is 0, so keys and short strings keep their code as it was
    // (a shared body cost ~5 instructions per string).
    #[inline(always)]
    fn raw_string_after(&mut self, known: usize) -> Result<(&'a [u8], bool), DecideError> {
        let start = self.pos + 1;
        // NOTE: keys and short values end within a few plain bytes; testing the first 16 bytes a word at a time is
        // cheaper than the memchr2 call (with keys compared as bytes, ~200 fewer instructions per key, callgrind).
        // Bytes passed here are plain printable ASCII, so the general path below starts after them.
        let mut i = start + known;
        let words = if known == 0 { 2 } else { 0 };
        for _ in 0..words {
            let Some(w) = self.buf.get(i..).and_then(<[u8]>::first_chunk::<8>) else {
                break;
            };
            let special = special_bytes(u64::from_le_bytes(*w));
            if special != 0 {
                i += (special.trailing_zeros() / 8) as usize;
                if self.buf[i] == b'"' {
                    self.pos = i + 1;
                    return Ok((&self.buf[start..i], false));
                }
                break;
            }
            i += 8;
        }
        let plain = i;
        let mut escaped = false;
        let (mut control, mut wide) = (false, false);
        let end = loop {
            // The bytes between escapes: where they end, and whether any is a control character or not ASCII (the
            // escapes themselves are validated printable ASCII).
            let (off, c, w) = plain_run(&self.buf[i..]);
            control |= c;
            wide |= w;
            let j = i + off;
            match self.buf.get(j) {
                None => return Err(DecideError::syntax("unterminated string", self.buf.len())),
                Some(b'"') => break j,
                Some(_) => {
                    escaped = true;
                    i = self.escape(j)?;
                }
            }
        };
        let raw = &self.buf[start..end];
        if control {
            return Err(DecideError::syntax("control character in string", start));
        }
        if wide && std::str::from_utf8(&self.buf[plain..end]).is_err() {
            return Err(not_utf8());
        }
        self.pos = end + 1;
        Ok((raw, escaped))
    }

    /// Validate the escape at `at` (a backslash); return the offset after it.
    fn escape(&self, at: usize) -> Result<usize, DecideError> {
        match self.buf.get(at + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(at + 2),
            Some(b'u') => {
                let Some(cp) = hex4(self.buf, at + 2) else {
                    return Err(DecideError::syntax("bad \\u escape", at));
                };
                if (0xDC00..0xE000).contains(&cp) {
                    return Err(DecideError::syntax("lone surrogate in \\u escape", at));
                }
                if (0xD800..0xDC00).contains(&cp) {
                    let low = if self.buf.get(at + 6..at + 8) == Some(b"\\u") {
                        hex4(self.buf, at + 8)
                    } else {
                        None
                    };
                    if !low.is_some_and(|lo| (0xDC00..0xE000).contains(&lo)) {
                        return Err(DecideError::syntax("lone surrogate in \\u escape", at));
                    }
                    return Ok(at + 12);
                }
                Ok(at + 6)
            }
            _ => Err(DecideError::syntax("bad escape", at)),
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), DecideError> {
        if self.buf.get(self.pos..self.pos + word.len()) == Some(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.unexpected())
        }
    }

    /// Validate a number; return whether it is an integer (no fraction, no exponent).
    fn number(&mut self) -> Result<bool, DecideError> {
        let b = self.buf;
        let mut i = self.pos;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                while b.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
            }
            _ => return Err(DecideError::syntax("bad number", i)),
        }
        let mut int = true;
        if b.get(i) == Some(&b'.') {
            int = false;
            i += 1;
            if !b.get(i).is_some_and(u8::is_ascii_digit) {
                return Err(DecideError::syntax("bad number", i));
            }
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        if let Some(b'e' | b'E') = b.get(i) {
            int = false;
            i += 1;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            if !b.get(i).is_some_and(u8::is_ascii_digit) {
                return Err(DecideError::syntax("bad number", i));
            }
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        self.pos = i;
        Ok(int)
    }

    /// Skip one value of any type, validating it.
    fn skip_value(&mut self, depth: u32) -> Result<(), DecideError> {
        match self.peek() {
            Some(b'"') => self.raw_string().map(|_| ()),
            Some(b'{') => {
                let depth = self.deeper(depth)?;
                if self.object_open()? {
                    loop {
                        self.object_key()?;
                        self.skip_value(depth)?;
                        if !self.object_next()? {
                            break;
                        }
                    }
                }
                Ok(())
            }
            Some(b'[') => {
                let depth = self.deeper(depth)?;
                if self.array_open()? {
                    loop {
                        self.skip_value(depth)?;
                        if !self.array_next()? {
                            break;
                        }
                    }
                }
                Ok(())
            }
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number().map(|_| ()),
            _ => Err(self.unexpected()),
        }
    }

    fn deeper(&self, depth: u32) -> Result<u32, DecideError> {
        if depth >= MAX_DEPTH {
            Err(DecideError::syntax("nesting too deep", self.pos))
        } else {
            Ok(depth + 1)
        }
    }

    /// Count one text string (raw content) toward the token estimate (the feature pass observes its strings in
    /// `text_value`).
    #[inline]
    fn text(&mut self, raw: &[u8], escaped: bool) {
        let n = self.opts.estimator.count_raw(raw, escaped);
        self.tokens = self.tokens.saturating_add(n);
    }

    /// A value that carries prompt text: strings count; arrays and objects are searched
    /// (objects only under `text` and `content`); numbers count as one token each (token-id
    /// prompts); anything else is skipped.
    fn text_value(&mut self, depth: u32) -> Result<(), DecideError> {
        match self.peek() {
            Some(b'"') if !self.opts.features && self.opts.estimator == Estimator::Fast => {
                // NOTE: a long plain string is weighed in the same pass that looks for its end (one read of its
                // bytes, not two: ~1.0k fewer instructions per 2 KB chat body, callgrind); the estimate is the same.
                let prefix = tokens::plain_prefix(self.buf.get(self.pos + 1..).unwrap_or_default());
                let n = if prefix.whole {
                    // NOTE: plain to its closing quote, found and weighed by the prefix (a string that ends in its
                    // first block is read once: ~0.1k fewer instructions per short string, callgrind).
                    let start = self.pos + 1;
                    self.pos = start + prefix.len + 1;
                    tokens::estimate_after(&self.buf[start..start + prefix.len], false, prefix)
                } else {
                    let (raw, escaped) = self.raw_string_after(prefix.len)?;
                    tokens::estimate_after(raw, escaped, prefix)
                };
                self.tokens = self.tokens.saturating_add(n);
                Ok(())
            }
            Some(b'"') if self.opts.features => {
                // NOTE: the feature pass reads a body the token pass has validated: a text string's end is its
                // first unescaped quote, found by `observe` as it counts (no escapes, control characters or UTF-8
                // checked again: ~80k fewer instructions per 20 KB chat body; no separate end search: ~20k fewer,
                // callgrind).
                let start = self.pos + 1;
                let rest = self.buf.get(start..).unwrap_or_default();
                let end = start + self.features.observe(rest, self.opts.grams);
                if end >= self.buf.len() {
                    return Err(DecideError::syntax("unterminated string", self.buf.len()));
                }
                self.pos = end + 1;
                Ok(())
            }
            Some(b'"') => {
                let (raw, escaped) = self.raw_string()?;
                self.text(raw, escaped);
                Ok(())
            }
            Some(b'[') => {
                let depth = self.deeper(depth)?;
                if self.array_open()? {
                    loop {
                        self.text_value(depth)?;
                        if !self.array_next()? {
                            break;
                        }
                    }
                }
                Ok(())
            }
            Some(b'{') => {
                let depth = self.deeper(depth)?;
                if self.object_open()? {
                    loop {
                        let key = self.object_key()?;
                        if key.is("text") || key.is("content") {
                            self.text_value(depth)?;
                        } else {
                            self.skip_value(depth)?;
                        }
                        if !self.object_next()? {
                            break;
                        }
                    }
                }
                Ok(())
            }
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
                self.tokens = self.tokens.saturating_add(1);
                Ok(())
            }
            _ => self.skip_value(depth),
        }
    }

    /// `messages`: an array of objects; each message's `content` is text.
    fn messages(&mut self) -> Result<(), DecideError> {
        match self.peek() {
            Some(b'n') => return self.literal(b"null"),
            Some(b'[') => {}
            _ => return Err(DecideError::field("messages", "`messages` must be an array")),
        }
        if !self.array_open()? {
            return Ok(());
        }
        loop {
            if self.peek() != Some(b'{') {
                return Err(DecideError::field("messages", "`messages` must be an array of objects"));
            }
            self.tokens = self.tokens.saturating_add(TOKENS_PER_MESSAGE);
            let features = self.opts.features;
            let before = self.features.bytes;
            let mut system = false;
            if features {
                self.features.turns += 1;
            }
            if self.object_open()? {
                loop {
                    let key = self.object_key()?;
                    if features && key.is("role") && self.peek() == Some(b'"') {
                        let role = self.string()?;
                        system = role.raw == "system" || role.raw == "developer";
                    } else if key.is("content") {
                        match self.peek() {
                            Some(b'"' | b'[' | b'n') => self.text_value(3)?,
                            _ => {
                                return Err(DecideError::field(
                                    "messages",
                                    "a message's `content` must be a string or an array",
                                ));
                            }
                        }
                    } else {
                        self.skip_value(3)?;
                    }
                    if !self.object_next()? {
                        break;
                    }
                }
            }
            if system {
                self.features.system_bytes += self.features.bytes - before;
            }
            if !self.array_next()? {
                return Ok(());
            }
        }
    }

    /// `prompt` / `input`: a string, an array (of strings, token ids or input items), or null.
    fn prompt_like(&mut self, field: &'static str, msg: &'static str) -> Result<(), DecideError> {
        match self.peek() {
            Some(b'"' | b'[') => self.text_value(1),
            Some(b'n') => self.literal(b"null"),
            _ => Err(DecideError::field(field, msg)),
        }
    }

    fn opt_string(&mut self, field: &'static str, msg: &'static str) -> Result<Option<JStr<'a>>, DecideError> {
        match self.peek() {
            Some(b'"') => self.string().map(Some),
            Some(b'n') => self.literal(b"null").map(|()| None),
            _ => Err(DecideError::field(field, msg)),
        }
    }

    fn opt_bool(&mut self, field: &'static str, msg: &'static str) -> Result<Option<bool>, DecideError> {
        match self.peek() {
            Some(b't') => self.literal(b"true").map(|()| Some(true)),
            Some(b'f') => self.literal(b"false").map(|()| Some(false)),
            Some(b'n') => self.literal(b"null").map(|()| None),
            _ => Err(DecideError::field(field, msg)),
        }
    }

    fn opt_int(&mut self, field: &'static str, msg: &'static str) -> Result<Option<i64>, DecideError> {
        match self.peek() {
            Some(b'n') => self.literal(b"null").map(|()| None),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.pos;
                if !self.number()? {
                    return Err(DecideError::field(field, msg));
                }
                Ok(Some(saturating_int(&self.buf[start..self.pos])))
            }
            _ => Err(DecideError::field(field, msg)),
        }
    }

    /// `stream_options`: null or an object; where it is and whether `include_usage` is true.
    fn stream_options(&mut self) -> Result<StreamOptions, DecideError> {
        let start = self.pos;
        let mut out = StreamOptions {
            span: Span { start, end: start },
            close: None,
            fields: 0,
            include_usage_span: None,
            include_usage: false,
        };
        match self.peek() {
            Some(b'n') => {
                self.literal(b"null")?;
                out.span.end = self.pos;
                return Ok(out);
            }
            Some(b'{') => {}
            _ => {
                return Err(DecideError::field(
                    "stream_options",
                    "`stream_options` must be an object",
                ))
            }
        }
        if self.object_open()? {
            loop {
                out.fields += 1;
                let key = self.object_key()?;
                if key.is("include_usage") {
                    let at = self.pos;
                    let v = self.opt_bool("stream_options", "`stream_options.include_usage` must be a boolean")?;
                    out.include_usage = v == Some(true);
                    out.include_usage_span = Some(Span {
                        start: at,
                        end: self.pos,
                    });
                } else {
                    self.skip_value(2)?;
                }
                if !self.object_next()? {
                    break;
                }
            }
        }
        out.close = Some(self.pos - 1);
        out.span.end = self.pos;
        Ok(out)
    }

    /// `metadata`: an object; string values of the keys the rules read are kept.
    fn metadata(&mut self, slots: &mut [Option<JStr<'a>>; MAX_METADATA_KEYS]) -> Result<(), DecideError> {
        match self.peek() {
            Some(b'n') => return self.literal(b"null"),
            Some(b'{') => {}
            _ => return Err(DecideError::field("metadata", "`metadata` must be an object")),
        }
        if !self.object_open()? {
            return Ok(());
        }
        loop {
            let key = self.object_key()?;
            let slot = self.opts.metadata_keys.iter().position(|k| key.is(k));
            match (slot, self.peek()) {
                (Some(i), Some(b'"')) if i < MAX_METADATA_KEYS => slots[i] = Some(self.string()?),
                _ => self.skip_value(2)?,
            }
            if !self.object_next()? {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: ScanOptions<'static> = ScanOptions::tokens(Estimator::Fast);

    fn ok(body: &str) -> Body<'_> {
        scan(body.as_bytes(), &OPTS).unwrap()
    }

    fn err(body: &[u8]) -> DecideError {
        scan(body, &OPTS).unwrap_err()
    }

    #[test]
    fn extracts_fields() {
        let b = ok(r#" {"model": "gpt-4o", "stream": true, "max_tokens": 100, "user": "u1",
            "messages": [{"role": "user", "content": "hello there"}]} "#);
        assert_eq!(b.model.unwrap().raw, "gpt-4o");
        let span = b.model_span.unwrap();
        assert_eq!(&r#" {"model": "gpt-4o""#[span.start..span.end], "\"gpt-4o\"");
        assert!(b.stream);
        assert_eq!(b.max_tokens, Some(100));
        assert_eq!(b.user.unwrap().raw, "u1");
        assert!(b.est_tokens > TOKENS_PER_MESSAGE);
        assert_eq!(b.fields, 5);
    }

    #[test]
    fn list_content_and_prompt_forms() {
        let a = ok(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"aaaa bbbb cccc dddd"},
            {"type":"image_url","image_url":{"url":"http://x/very/long/url/that/should/not/count"}}]}]}"#,
        );
        let b = ok(r#"{"messages":[{"role":"user","content":"aaaa bbbb cccc dddd"}]}"#);
        assert_eq!(a.est_tokens, b.est_tokens);
        let p = ok(r#"{"prompt":["aaaa bbbb","cccc dddd"]}"#);
        assert!(p.est_tokens > 0);
        let ids = ok(r#"{"prompt":[1,2,3,4,5]}"#);
        assert_eq!(ids.est_tokens, 5);
        let inp = ok(r#"{"input":[{"role":"user","content":[{"type":"input_text","text":"aaaa"}]}]}"#);
        assert_eq!(inp.est_tokens, Estimator::Fast.count(b"aaaa"));
    }

    #[test]
    fn integers_saturate_like_a_parse_that_falls_back_to_the_bound() {
        for digits in [
            "0",
            "-0",
            "7",
            "256",
            "-256",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "-123456789012345678901234567890",
        ] {
            let want = digits
                .parse::<i64>()
                .unwrap_or(if digits.starts_with('-') { i64::MIN } else { i64::MAX });
            assert_eq!(saturating_int(digits.as_bytes()), want, "{digits}");
            let body = format!(r#"{{"max_tokens": {digits}}}"#);
            assert_eq!(ok(&body).max_tokens, Some(want), "{digits}");
        }
    }

    #[test]
    fn max_completion_tokens_wins_and_nulls_are_absent() {
        let b = ok(r#"{"max_tokens":5,"max_completion_tokens":7,"stream":null,"model":null,"user":null}"#);
        assert_eq!(b.max_tokens, Some(7));
        assert!(!b.stream && b.model.is_none() && b.user.is_none());
    }

    #[test]
    fn escapes() {
        let b = ok(r#"{"model":"a\"b\\c\u00e9\ud83d\ude00\n"}"#);
        let m = b.model.unwrap();
        assert!(m.escaped);
        assert_eq!(m.decode(), "a\"b\\cé😀\n");
        assert!(m.eq_str("a\"b\\cé😀\n"));
        let k = ok(r#"{"\u006dodel":"x"}"#);
        assert_eq!(k.model.unwrap().raw, "x");
    }

    #[test]
    fn wrong_types_name_the_field() {
        assert_eq!(err(br#"{"stream":"yes"}"#).param, Some("stream"));
        assert_eq!(err(br#"{"stream":"yes"}"#).msg, "`stream` must be a boolean");
        assert_eq!(err(br#"{"max_tokens":1.5}"#).param, Some("max_tokens"));
        assert_eq!(err(br#"{"model":1}"#).param, Some("model"));
        assert_eq!(err(br#"{"messages":{}}"#).param, Some("messages"));
        assert_eq!(err(br#"{"messages":[1]}"#).param, Some("messages"));
        assert_eq!(err(br#"{"messages":[{"content":1}]}"#).param, Some("messages"));
        assert_eq!(err(br#"{"metadata":[]}"#).param, Some("metadata"));
        assert_eq!(err(br#"{"model":"a","model":"b"}"#).param, Some("model"));
    }

    #[test]
    fn malformed() {
        for bad in [
            &b""[..],
            b"[]",
            b"\"x\"",
            b"{",
            b"{\"a\"}",
            b"{\"a\":}",
            b"{\"a\":1,}",
            b"{\"a\":1} x",
            b"{\"a\":01}",
            b"{\"a\":-}",
            b"{\"a\":1.}",
            b"{\"a\":1e}",
            b"{\"a\":tru}",
            b"{\"a\":\"\x01\"}",
            b"{\"a\":\"\\x\"}",
            b"{\"a\":\"\\ud800\"}",
            b"{\"a\":\"\\udc00\"}",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":[1 2]}",
            b"{'a':1}",
        ] {
            assert!(scan(bad, &OPTS).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(scan(deep.as_bytes(), &OPTS).is_err());
        let fine = format!("{{\"a\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert!(scan(fine.as_bytes(), &OPTS).is_ok());
    }

    #[test]
    fn metadata_slots() {
        let keys: Vec<Box<str>> = vec!["team".into(), "tier".into()];
        let opts = ScanOptions {
            metadata_keys: &keys,
            ..OPTS
        };
        let b = scan(br#"{"metadata":{"tier":"gold","x":{"y":1},"team":"a"}}"#, &opts).unwrap();
        assert_eq!(b.metadata[0].unwrap().raw, "a");
        assert_eq!(b.metadata[1].unwrap().raw, "gold");
    }

    #[test]
    fn the_feature_pass_observes_each_text_string_whole() {
        // Strings around the 32-byte blocks of the end search, with escaped quotes and backslashes anywhere.
        let pieces = [r#"\""#, r"\\", r#"\\\""#, r"\n", r"\u00e9", "é", "word", " ", "?"];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for round in 0..400 {
            let mut texts = Vec::new();
            for _ in 0..3 {
                let mut t = String::new();
                while t.len() < round % 150 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    t.push_str(pieces[(seed % pieces.len() as u64) as usize]);
                }
                texts.push(t);
            }
            let body = format!(
                r#"{{"messages":[{{"role":"system","content":"{}"}},{{"role":"user","content":[{{"type":"text","text":"{}"}}]}}],"prompt":"{}","user":"{}"}}"#,
                texts[0], texts[1], texts[2], texts[2]
            );
            assert!(scan(body.as_bytes(), &OPTS).is_ok(), "{body}");
            let (got_hits, want_hits) = (std::cell::RefCell::new(Vec::new()), std::cell::RefCell::new(Vec::new()));
            let opts = ScanOptions {
                features: true,
                grams: Grams::Collect(&got_hits, u32::MAX),
                ..OPTS
            };
            let got = scan(body.as_bytes(), &opts).unwrap().features;
            let mut want = Features {
                turns: 2,
                ..Features::default()
            };
            for t in &texts {
                want.observe(t.as_bytes(), Grams::Collect(&want_hits, u32::MAX));
            }
            want.system_bytes = u32::try_from(texts[0].len()).unwrap();
            assert_eq!(got, want, "{body}");
            assert_eq!(got_hits, want_hits, "{body}");
        }
    }

    #[test]
    fn close_offset() {
        let b = ok("{\"a\":1 }\n");
        assert_eq!(b.close, 7);
        let e = ok(" { } ");
        assert_eq!((e.close, e.fields), (3, 0));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = scan(&body, &OPTS);
        }

        #[test]
        fn strings_agree_with_serde(
            raw in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::num::u8::ANY,
                    proptest::strategy::Just(b'"'),
                    proptest::strategy::Just(b'\\'),
                    proptest::strategy::Just(b'u'),
                    proptest::strategy::Just(b'd'),
                    proptest::strategy::Just(b'8'),
                    proptest::strategy::Just(b'a'),
                ],
                0..40,
            ),
            as_text in proptest::bool::ANY,
        ) {
            let (head, tail): (&[u8], &[u8]) = if as_text {
                (br#"{"messages":[{"content":""#, br#""}]}"#)
            } else {
                (br#"{"model":""#, br#""}"#)
            };
            let body = [head, &raw, tail].concat();
            let ours = scan(&body, &OPTS);
            let theirs = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body);
            // Only bodies that still hold the one string field (a quote in `raw` may have closed it early).
            proptest::prop_assume!(theirs.as_ref().map_or(true, |m| {
                let field = if as_text { &m["messages"][0] } else { &serde_json::Value::Object(m.clone()) };
                m.len() == 1 && field.as_object().is_some_and(|o| o.len() == 1 && o.values().all(serde_json::Value::is_string))
            }));
            proptest::prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "{}", String::from_utf8_lossy(&body));
            if let (Ok(o), Ok(t), false) = (&ours, &theirs, as_text) {
                proptest::prop_assert_eq!(
                    o.model.map(|m| m.decode().into_owned()),
                    t.get("model").and_then(|v| v.as_str()).map(str::to_owned)
                );
            }
        }

        #[test]
        fn the_feature_pass_finds_the_closing_quote(text in "(\\PC|[\"\\\\\n\u{1}]){0,200}", after in "[\"\\\\a ,}\\]]{0,4}") {
            // Any string as JSON encodes it, then anything: the end is where the encoding's closing quote is, and
            // the features are those of the string's content alone.
            let encoded = serde_json::to_string(&text).unwrap();
            let inner = &encoded.as_bytes()[1..];
            let s = [inner, after.as_bytes()].concat();
            let (mut got, mut want) = (Features::default(), Features::default());
            proptest::prop_assert_eq!(got.observe(&s, Grams::Off), inner.len() - 1, "{:?}", encoded);
            proptest::prop_assert_eq!(want.observe(&inner[..inner.len() - 1], Grams::Off), inner.len() - 1);
            proptest::prop_assert_eq!(got, want, "{:?}", encoded);
        }

        #[test]
        fn agrees_with_serde_on_validity(s in "[{}\\[\\]\",:0-9a-z \\\\.e-]{0,40}") {
            let ours = scan(s.as_bytes(), &OPTS).is_ok();
            let theirs = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&s).is_ok();
            // serde accepts duplicate unknown keys and deep nesting within its own limits; our extra
            // rule (duplicate known fields) only narrows, so ours implies theirs.
            if ours { proptest::prop_assert!(theirs, "{}", s); }
        }
    }
}
