//! The body rewrite: splice a new `model` value (and, for LoRAX-style pools, an `adapter_id`
//! field) into the request body at the spans the scan found. Every other byte is copied
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
}

impl Edit<'_> {
    fn start(&self) -> usize {
        match self {
            Self::Replace { span, .. } => span.start,
            Self::Insert { at, .. } => *at,
        }
    }

    fn end(&self) -> usize {
        match self {
            Self::Replace { span, .. } => span.end,
            Self::Insert { at, .. } => *at,
        }
    }

    fn out_len(&self) -> usize {
        match self {
            Self::Replace { value, .. } => escaped_len(value) + 2,
            Self::Insert { comma, key, value, .. } => usize::from(*comma) + key.len() + 3 + escaped_len(value) + 2,
        }
    }
}

/// A planned rewrite: at most two edits, in body order. Computed without copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan<'v> {
    edits: [Option<Edit<'v>>; 2],
    len: usize,
}

/// Plan the rewrite of `body` (already scanned into `scanned`) so that its `model` becomes `model`
/// and, when given, its `adapter_id` becomes `adapter_id`. None when the body already says so.
#[must_use]
pub fn plan<'v>(
    body: &[u8],
    scanned: &Body<'_>,
    model: Option<&'v str>,
    adapter_id: Option<&'v str>,
) -> Option<Plan<'v>> {
    let mut edits: [Option<Edit<'v>>; 2] = [None, None];
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
            (_, None) => add(
                Edit::Insert {
                    at: scanned.close,
                    comma: fields > 0,
                    key: "adapter_id",
                    value: a,
                },
                &mut n,
            ),
        }
    }
    if n == 0 {
        return None;
    }
    if let [Some(a), Some(b)] = edits {
        if b.start() < a.start() {
            edits = [Some(b), Some(a)];
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
        let mut w = Writer { out, at: 0 };
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

struct Writer<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl Writer<'_> {
    #[inline]
    fn put(&mut self, b: &[u8]) {
        if let Some(dst) = self.out.get_mut(self.at..self.at + b.len()) {
            dst.copy_from_slice(b);
        }
        self.at += b.len();
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

    const OPTS: ScanOptions<'static> = ScanOptions {
        estimator: Estimator::Fast,
        features: false,
        grams: crate::classify::Grams::Off,
        metadata_keys: &[],
    };

    fn rw(body: &str, model: Option<&str>, adapter: Option<&str>) -> Option<String> {
        let b = scan(body.as_bytes(), &OPTS).unwrap();
        plan(body.as_bytes(), &b, model, adapter).map(|p| {
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
}
