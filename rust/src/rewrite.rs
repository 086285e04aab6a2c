//! The body rewrite: splice a new `model` value (and, for LoRAX-style pools, an `adapter_id`
//! field) into the request body at the spans the scan found; for a stream, ask the upstream for
//! usage (`stream_options.include_usage`) when the client did not. Every other byte is copied
//! unchanged, the output size is computed before writing, and nothing is copied at all when the
//! body would not change. This module must never parse JSON; it trusts the scan's spans.

use crate::request::{Body, Span};

/// One change to the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edit<'v> {
    /// Replace the string value at `span` (quotes included) with `value`.
    Replace { span: Span, value: &'v str },
    /// Insert `"key":"value"` (with a leading comma when `comma`) before the closing `}`.
    Insert {
        at: usize,
        comma: bool,
        key: &'static str,
        value: &'v str,
    },
    /// Write `text` verbatim at `span` (an empty span inserts), with a leading comma when `comma`.
    Raw {
        span: Span,
        comma: bool,
        text: &'static str,
    },
}

/// What the rewrite adds so a streamed answer ends with a usage chunk.
const USAGE_MEMBER: &str = r#""stream_options":{"include_usage":true}"#;
const USAGE_OBJECT: &str = r#"{"include_usage":true}"#;
const USAGE_FIELD: &str = r#""include_usage":true"#;
const TRUE: &str = "true";

impl Edit<'_> {
    fn start(&self) -> usize {
        match self {
            Self::Replace { span, .. } | Self::Raw { span, .. } => span.start,
            Self::Insert { at, .. } => *at,
        }
    }

    fn end(&self) -> usize {
        match self {
            Self::Replace { span, .. } | Self::Raw { span, .. } => span.end,
            Self::Insert { at, .. } => *at,
        }
    }

    fn out_len(&self) -> usize {
        match self {
            Self::Replace { value, .. } => escaped_len(value) + 2,
            Self::Insert { comma, key, value, .. } => usize::from(*comma) + key.len() + 3 + escaped_len(value) + 2,
            Self::Raw { comma, text, .. } => usize::from(*comma) + text.len(),
        }
    }
}

/// A planned rewrite: at most three edits, in body order. Computed without copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan<'v> {
    edits: [Option<Edit<'v>>; 3],
    len: usize,
}

/// Plan the rewrite of `body` (already scanned into `scanned`) so that its `model` becomes `model`
/// and, when given, its `adapter_id` becomes `adapter_id`; with `usage`, so that
/// `stream_options.include_usage` is true. None when the body already says so.
#[must_use]
pub fn plan<'v>(
    body: &[u8],
    scanned: &Body<'_>,
    model: Option<&'v str>,
    adapter_id: Option<&'v str>,
    usage: bool,
) -> Option<Plan<'v>> {
    let mut edits: [Option<Edit<'v>>; 3] = [None, None, None];
    let mut n = 0;
    let mut fields = scanned.fields;
    let mut add = |edit: Edit<'v>, n: &mut usize| {
        edits[*n] = Some(edit);
        *n += 1;
    };
    if let Some(m) = model {
        match (scanned.model, scanned.model_span) {
            (Some(cur), _) if cur.eq_str(m) => {}
            (_, Some(span)) => add(Edit::Replace { span, value: m }, &mut n),
            (_, None) => {
                add(
                    Edit::Insert {
                        at: scanned.close,
                        comma: fields > 0,
                        key: "model",
                        value: m,
                    },
                    &mut n,
                );
                fields += 1;
            }
        }
    }
    if let Some(a) = adapter_id {
        match (scanned.adapter_id, scanned.adapter_id_span) {
            (Some(cur), _) if cur.eq_str(a) => {}
            (_, Some(span)) => add(Edit::Replace { span, value: a }, &mut n),
            (_, None) => {
                add(
                    Edit::Insert {
                        at: scanned.close,
                        comma: fields > 0,
                        key: "adapter_id",
                        value: a,
                    },
                    &mut n,
                );
                fields += 1;
            }
        }
    }
    if usage {
        let at_close = Span {
            start: scanned.close,
            end: scanned.close,
        };
        match scanned.stream_options {
            Some(so) if so.include_usage => {}
            None => add(
                Edit::Raw {
                    span: at_close,
                    comma: fields > 0,
                    text: USAGE_MEMBER,
                },
                &mut n,
            ),
            Some(so) => match (so.include_usage_span, so.close) {
                (Some(span), _) => add(
                    Edit::Raw {
                        span,
                        comma: false,
                        text: TRUE,
                    },
                    &mut n,
                ),
                (None, Some(close)) => add(
                    Edit::Raw {
                        span: Span {
                            start: close,
                            end: close,
                        },
                        comma: so.fields > 0,
                        text: USAGE_FIELD,
                    },
                    &mut n,
                ),
                (None, None) => add(
                    Edit::Raw {
                        span: so.span,
                        comma: false,
                        text: USAGE_OBJECT,
                    },
                    &mut n,
                ),
            },
        }
    }
    if n == 0 {
        return None;
    }
    // Body order; a stable sort keeps inserts at the same offset in the order they were added.
    let live = &mut edits[..n];
    for i in 1..live.len() {
        let mut j = i;
        while j > 0 && live[j].map_or(0, |e| e.start()) < live[j - 1].map_or(0, |e| e.start()) {
            live.swap(j, j - 1);
            j -= 1;
        }
    }
    let mut len = body.len();
    for e in edits.iter().flatten() {
        len = len - (e.end() - e.start()) + e.out_len();
    }
    Some(Plan { edits, len })
}

impl Plan<'_> {
    /// Size of the rewritten body in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a plan exists only for a non-empty body.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write the rewritten body into `out`, which must be exactly `self.len()` bytes
    /// (e.g. a Python bytes object allocated at that size). One pass, memcpy between edits.
    pub fn write(&self, body: &[u8], out: &mut [u8]) {
        let mut at = 0;
        self.write_with(body, |b| {
            if let Some(dst) = out.get_mut(at..at + b.len()) {
                dst.copy_from_slice(b);
            }
            at += b.len();
        });
    }

    /// The rewritten body as consecutive pieces handed to `sink`, in order (`self.len()` bytes in all), for a
    /// caller that writes them into memory of its own.
    pub fn write_with(&self, body: &[u8], sink: impl FnMut(&[u8])) {
        let mut w = Writer { sink };
        let mut from = 0;
        for e in self.edits.iter().flatten() {
            w.put(&body[from..e.start()]);
            match *e {
                Edit::Replace { value, .. } => w.string(value),
                Edit::Insert { comma, key, value, .. } => {
                    if comma {
                        w.put(b",");
                    }
                    w.put(b"\"");
                    w.put(key.as_bytes());
                    w.put(b"\":");
                    w.string(value);
                }
                Edit::Raw { comma, text, .. } => {
                    if comma {
                        w.put(b",");
                    }
                    w.put(text.as_bytes());
                }
            }
            from = e.end();
        }
        w.put(&body[from..]);
    }

    /// The rewritten body as a new vector (one allocation of the final size).
    #[must_use]
    pub fn apply(&self, body: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        self.write(body, &mut out);
        out
    }
}

struct Writer<F: FnMut(&[u8])> {
    sink: F,
}

impl<F: FnMut(&[u8])> Writer<F> {
    #[inline]
    fn put(&mut self, b: &[u8]) {
        (self.sink)(b);
    }

    fn string(&mut self, s: &str) {
        self.put(b"\"");
        let bytes = s.as_bytes();
        let mut lit = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let esc: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0..0x20 => b"",
                _ => continue,
            };
            self.put(&bytes[lit..i]);
            if esc.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                self.put(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 15)],
                ]);
            } else {
                self.put(esc);
            }
            lit = i + 1;
        }
        self.put(&bytes[lit..]);
        self.put(b"\"");
    }
}

/// Length of `s` once JSON-escaped, quotes excluded.
fn escaped_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{scan, ScanOptions};
    use crate::tokens::Estimator;

    const OPTS: ScanOptions<'static> = ScanOptions::tokens(Estimator::Fast);

    fn rw(body: &str, model: Option<&str>, adapter: Option<&str>) -> Option<String> {
        rw_usage(body, model, adapter, false)
    }

    fn rw_usage(body: &str, model: Option<&str>, adapter: Option<&str>, usage: bool) -> Option<String> {
        let b = scan(body.as_bytes(), &OPTS).unwrap();
        plan(body.as_bytes(), &b, model, adapter, usage).map(|p| {
            let out = p.apply(body.as_bytes());
            assert_eq!(out.len(), p.len());
            String::from_utf8(out).unwrap()
        })
    }

    #[test]
    fn replaces_model_in_place() {
        assert_eq!(
            rw(r#"{"model" : "a", "x":1}"#, Some("bb"), None).unwrap(),
            r#"{"model" : "bb", "x":1}"#
        );
        assert_eq!(
            rw(r#"{"model":"a"}"#, Some("q\"\n\u{1}"), None).unwrap(),
            r#"{"model":"q\"\n\u0001"}"#
        );
    }

    #[test]
    fn unchanged_is_none() {
        assert_eq!(rw(r#"{"model":"a"}"#, Some("a"), None), None);
        assert_eq!(rw(r#"{"model":"\u0061"}"#, Some("a"), None), None);
        assert_eq!(rw(r#"{"model":"a","adapter_id":"x"}"#, Some("a"), Some("x")), None);
        assert_eq!(rw(r#"{"model":"a"}"#, None, None), None);
    }

    #[test]
    fn inserts_missing_fields() {
        assert_eq!(rw("{}", Some("m"), None).unwrap(), r#"{"model":"m"}"#);
        assert_eq!(
            rw("{ }", Some("m"), Some("ad")).unwrap(),
            r#"{ "model":"m","adapter_id":"ad"}"#
        );
        assert_eq!(
            rw("{\"x\":1\n}", None, Some("ad")).unwrap(),
            "{\"x\":1\n,\"adapter_id\":\"ad\"}"
        );
        assert_eq!(
            rw(r#"{"adapter_id":"old","model":"base"}"#, Some("up"), Some("new")).unwrap(),
            r#"{"adapter_id":"new","model":"up"}"#
        );
    }

    #[test]
    fn asks_for_stream_usage() {
        let usage = |body: &str| rw_usage(body, None, None, true);
        assert_eq!(
            usage(r#"{"stream":true}"#).unwrap(),
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            usage(r#"{"stream":true,"stream_options":null}"#).unwrap(),
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            usage(r#"{"stream_options":{},"stream":true}"#).unwrap(),
            r#"{"stream_options":{"include_usage":true},"stream":true}"#
        );
        assert_eq!(
            usage(r#"{"stream_options":{"x":1},"stream":true}"#).unwrap(),
            r#"{"stream_options":{"x":1,"include_usage":true},"stream":true}"#
        );
        assert_eq!(
            usage(r#"{"stream_options":{"include_usage":false}}"#).unwrap(),
            r#"{"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(usage(r#"{"stream_options":{"include_usage":true}}"#), None);
        assert_eq!(
            rw_usage(r#"{"stream":true}"#, Some("m"), Some("a"), true).unwrap(),
            r#"{"stream":true,"model":"m","adapter_id":"a","stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            rw_usage(r#"{"stream_options":{},"model":"x"}"#, Some("m"), None, true).unwrap(),
            r#"{"stream_options":{"include_usage":true},"model":"m"}"#
        );
        assert_eq!(usage("{}").unwrap(), r#"{"stream_options":{"include_usage":true}}"#);
    }
}
