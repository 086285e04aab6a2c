//! Route conditions: compiling a spec `Match` into a `Cond` tree (header names lowercased, header
//! and metadata names interned into slots, tenants resolved to ids, regexes built, globs parsed),
//! and evaluating it against one request. Static dispatch over an enum; evaluation borrows and
//! never allocates (except decoding a `model` that holds JSON escapes). `explain` renders why a
//! condition failed, for the decision trace only. This module must never read the body itself.

use std::fmt::Write as _;

use regex::{Regex, RegexBuilder};

use crate::error::CompileError;
use crate::request::{Body, Request, MAX_METADATA_KEYS};
use crate::spec;

/// Largest compiled size of one header regex.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A compiled condition.
#[derive(Debug, Clone)]
pub enum Cond {
    /// Path equals.
    PathExact(Box<str>),
    /// Path starts with.
    PathPrefix(Box<str>),
    /// Method is one of (ASCII case-insensitive).
    Method(Box<[Box<str>]>),
    /// A header test on header slot `slot`.
    Header {
        /// Header slot.
        slot: usize,
        /// Lowercase header name (for the trace).
        name: Box<str>,
        /// The test.
        test: HeaderTest,
    },
    /// The resolved tenant is one of these ids.
    Tenant(Box<[u32]>),
    /// The request's `model` matches one of these globs.
    Model(Box<[Glob]>),
    /// Estimated input tokens in range.
    InputTokens(Bounds),
    /// The request's `max_tokens` in range (absent: false).
    MaxTokens(Bounds),
    /// `stream` equals.
    Stream(bool),
    /// `metadata.<key>` equals.
    Metadata {
        /// Metadata slot.
        slot: usize,
        /// Key (for the trace).
        key: Box<str>,
        /// Expected value.
        value: Box<str>,
    },
    /// Every one holds (empty: true).
    All(Box<[Cond]>),
    /// At least one holds.
    Any(Box<[Cond]>),
    /// Negation.
    Not(Box<Cond>),
}

/// A test on one header value.
#[derive(Debug, Clone)]
pub enum HeaderTest {
    /// Present.
    Present,
    /// Absent.
    Absent,
    /// Equals.
    Equals(Box<str>),
    /// One of.
    OneOf(Box<[Box<str>]>),
    /// Matches (unanchored search).
    Regex(Regex),
}

/// An inclusive integer range compiled from `gt/gte/lt/lte`.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    lo: i64,
    hi: i64,
    spec: spec::Range,
}

impl Bounds {
    fn new(r: spec::Range) -> Self {
        let mut lo = i64::MIN;
        let mut hi = i64::MAX;
        if let Some(v) = r.gt {
            lo = lo.max(v.saturating_add(1));
        }
        if let Some(v) = r.gte {
            lo = lo.max(v);
        }
        if let Some(v) = r.lt {
            hi = hi.min(v.saturating_sub(1));
        }
        if let Some(v) = r.lte {
            hi = hi.min(v);
        }
        Self { lo, hi, spec: r }
    }

    /// Whether `v` is inside.
    #[inline]
    #[must_use]
    pub fn contains(&self, v: i64) -> bool {
        self.lo <= v && v <= self.hi
    }

    fn failed_bound(&self, v: i64) -> String {
        let r = &self.spec;
        let checks = [(r.gt, ">"), (r.gte, ">="), (r.lt, "<"), (r.lte, "<=")];
        for (bound, op) in checks {
            if let Some(b) = bound {
                let ok = match op {
                    ">" => v > b,
                    ">=" => v >= b,
                    "<" => v < b,
                    _ => v <= b,
                };
                if !ok {
                    return format!("{v} not {op} {b}");
                }
            }
        }
        format!("{v} out of range")
    }
}

/// A `*`/`?` glob on a model name; a pattern without wildcards compares exactly.
#[derive(Debug, Clone)]
pub enum Glob {
    /// No wildcard.
    Exact(Box<str>),
    /// Wildcards: `*` any run of characters, `?` exactly one character.
    Pattern(Box<str>),
}

impl Glob {
    /// Parse a pattern.
    #[must_use]
    pub fn new(p: &str) -> Self {
        if p.contains(['*', '?']) {
            Self::Pattern(p.into())
        } else {
            Self::Exact(p.into())
        }
    }

    /// Whether `s` matches. Linear-ish: backtracks only to the last `*`.
    #[inline]
    #[must_use]
    pub fn matches(&self, s: &str) -> bool {
        match self {
            Self::Exact(e) => **e == *s,
            Self::Pattern(p) => wildcard(p.as_bytes(), s.as_bytes()),
        }
    }

    fn text(&self) -> &str {
        match self {
            Self::Exact(s) | Self::Pattern(s) => s,
        }
    }
}

/// Width of the UTF-8 character starting with byte `b` (1 for stray continuation bytes).
fn char_width(b: u8) -> usize {
    match b {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

fn wildcard(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(b'?') => {
                pi += 1;
                si += char_width(s[si]);
            }
            Some(&c) if c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    let next = ss + char_width(s[ss]);
                    star = Some((sp, next));
                    pi = sp + 1;
                    si = next;
                }
                None => return false,
            },
        }
    }
    if si > s.len() {
        return false;
    }
    p[pi.min(p.len())..].iter().all(|&c| c == b'*')
}

/// A request field the router's route index sorts routes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The path.
    Path,
    /// The header in this slot.
    Header(usize),
    /// The body's `model`.
    Model,
    /// The resolved tenant.
    Tenant,
    /// The body's `stream`.
    Stream,
    /// `metadata.<key>` in this slot.
    Metadata(usize),
    /// Estimated input tokens.
    InputTokens,
    /// The body's `max_tokens`.
    MaxTokens,
}

/// One alternative of `Cond::need`: a value, pattern or range of a field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Atom<'c> {
    /// The (decoded) string value equals.
    Str(&'c str),
    /// The field is absent (a header test `present: false`).
    Absent,
    /// The path starts with.
    Prefix(&'c str),
    /// The model matches this wildcard glob.
    Glob(&'c Glob),
    /// The tenant id equals.
    Id(u32),
    /// The flag equals.
    Bool(bool),
    /// The integer is within `lo..=hi`.
    Range(i64, i64),
}

impl PartialEq for Glob {
    fn eq(&self, other: &Self) -> bool {
        self.text() == other.text()
    }
}

impl Atom<'_> {
    /// A single value (not a pattern or a range): sets of these intersect exactly.
    #[must_use]
    pub fn is_discrete(&self) -> bool {
        matches!(self, Self::Str(_) | Self::Absent | Self::Id(_) | Self::Bool(_))
    }
}

/// What conditions are evaluated against: the request, its scanned body and the tenant.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a, 'b> {
    /// The request.
    pub req: &'b Request<'a>,
    /// Its scanned body.
    pub body: &'b Body<'a>,
    /// The resolved tenant id.
    pub tenant: Option<u32>,
    /// Tenant names by id (for the trace).
    pub tenant_names: &'b [Box<str>],
}

impl Cond {
    /// Whether the condition holds. Borrowing only; cost proportional to the tree.
    // NOTE: the leaf tests that are a compare or two are inlined into the caller (the route loop); the rest go
    // through `eval_other`, which needs a stack frame (~25 fewer instructions per simple route, callgrind).
    #[inline]
    #[must_use]
    pub fn eval(&self, f: &Facts<'_, '_>) -> bool {
        match self {
            Self::PathExact(p) => f.req.path == &**p,
            Self::PathPrefix(p) => f.req.path.starts_with(&**p),
            Self::Header {
                slot,
                test: HeaderTest::Equals(e),
                ..
            } => f.req.header(*slot).is_some_and(|v| **e == *v),
            Self::InputTokens(b) => b.contains(i64::from(f.body.est_tokens)),
            Self::MaxTokens(b) => f.body.max_tokens.is_some_and(|v| b.contains(v)),
            Self::Stream(s) => f.body.stream == *s,
            Self::Metadata { slot, value, .. } => match f.body.metadata[*slot] {
                None => false,
                Some(v) if !v.escaped => v.raw == &**value,
                Some(_) => self.eval_other(f),
            },
            _ => self.eval_other(f),
        }
    }

    #[inline(never)]
    fn eval_other(&self, f: &Facts<'_, '_>) -> bool {
        match self {
            Self::PathExact(p) => f.req.path == &**p,
            Self::PathPrefix(p) => f.req.path.starts_with(&**p),
            Self::Method(ms) => ms.iter().any(|m| m.eq_ignore_ascii_case(f.req.method)),
            Self::Header { slot, test, .. } => test.eval(f.req.header(*slot)),
            Self::Tenant(ids) => f.tenant.is_some_and(|t| ids.contains(&t)),
            Self::Model(globs) => f.body.model.is_some_and(|m| {
                if m.escaped {
                    let m = m.decode();
                    globs.iter().any(|g| g.matches(&m))
                } else {
                    globs.iter().any(|g| g.matches(m.raw))
                }
            }),
            Self::InputTokens(b) => b.contains(i64::from(f.body.est_tokens)),
            Self::MaxTokens(b) => f.body.max_tokens.is_some_and(|v| b.contains(v)),
            Self::Stream(s) => f.body.stream == *s,
            Self::Metadata { slot, value, .. } => f.body.metadata[*slot].is_some_and(|v| v.eq_str(value)),
            Self::All(cs) => cs.iter().all(|c| c.eval(f)),
            Self::Any(cs) => cs.iter().any(|c| c.eval(f)),
            Self::Not(c) => !c.eval(f),
        }
    }

    /// The values of `field` for which this condition can hold, as alternatives (it holds for none other); None
    /// when it may hold whatever the field's value (no test on the field, a header presence or regex test, a method,
    /// a `not`). Compile time, for the router's route index: a route whose alternatives the request's value misses
    /// is never evaluated for it. Under `all`, discrete alternatives are intersected (else the first constrained
    /// conjunct is kept, which is necessary on its own); under `any`, united when every branch is constrained.
    #[must_use]
    pub fn need(&self, field: Field) -> Option<Vec<Atom<'_>>> {
        match (self, field) {
            (Self::PathExact(p), Field::Path) => Some(vec![Atom::Str(p)]),
            (Self::PathPrefix(p), Field::Path) => Some(vec![Atom::Prefix(p)]),
            (Self::Header { slot, test, .. }, Field::Header(s)) if *slot == s => match test {
                HeaderTest::Equals(e) => Some(vec![Atom::Str(e)]),
                HeaderTest::OneOf(vs) => Some(vs.iter().map(|v| Atom::Str(v)).collect()),
                HeaderTest::Absent => Some(vec![Atom::Absent]),
                HeaderTest::Present | HeaderTest::Regex(_) => None,
            },
            (Self::Tenant(ids), Field::Tenant) => Some(ids.iter().map(|&t| Atom::Id(t)).collect()),
            (Self::Model(globs), Field::Model) => Some(
                globs
                    .iter()
                    .map(|g| match g {
                        Glob::Exact(s) => Atom::Str(s),
                        Glob::Pattern(_) => Atom::Glob(g),
                    })
                    .collect(),
            ),
            (Self::InputTokens(b), Field::InputTokens) | (Self::MaxTokens(b), Field::MaxTokens) => {
                Some(vec![Atom::Range(b.lo, b.hi)])
            }
            (Self::Stream(v), Field::Stream) => Some(vec![Atom::Bool(*v)]),
            (Self::Metadata { slot, value, .. }, Field::Metadata(s)) if *slot == s => Some(vec![Atom::Str(value)]),
            (Self::All(cs), _) => cs.iter().filter_map(|c| c.need(field)).reduce(|acc, set| {
                if acc.iter().chain(&set).all(Atom::is_discrete) {
                    acc.into_iter().filter(|a| set.contains(a)).collect()
                } else {
                    acc
                }
            }),
            (Self::Any(cs), _) => {
                let mut all = Vec::new();
                for c in cs.iter() {
                    for a in c.need(field)? {
                        if !all.contains(&a) {
                            all.push(a);
                        }
                    }
                }
                Some(all)
            }
            _ => None,
        }
    }

    /// Why the condition does not hold (None when it holds). Trace rendering only; allocates.
    #[must_use]
    pub fn explain(&self, f: &Facts<'_, '_>) -> Option<String> {
        if self.eval(f) {
            return None;
        }
        Some(match self {
            Self::PathExact(p) => format!("path {} is not {p}", f.req.path),
            Self::PathPrefix(p) => format!("path {} does not start with {p}", f.req.path),
            Self::Method(ms) => format!("method {} not in {}", f.req.method, list(ms.iter().map(|m| &**m))),
            Self::Header { slot, name, test } => match (f.req.header(*slot), test) {
                (None, _) => format!("header {name} absent"),
                (Some(_), HeaderTest::Absent) => format!("header {name} present"),
                (Some(v), HeaderTest::Equals(e)) => format!("header {name} `{v}` is not `{e}`"),
                (Some(v), HeaderTest::OneOf(vs)) => {
                    format!("header {name} `{v}` not in {}", list(vs.iter().map(|s| &**s)))
                }
                (Some(v), HeaderTest::Regex(r)) => format!("header {name} `{v}` does not match /{}/", r.as_str()),
                (Some(_), HeaderTest::Present) => format!("header {name} absent"),
            },
            Self::Tenant(ids) => {
                let want = list(ids.iter().map(|&i| name_of(f.tenant_names, i)));
                match f.tenant {
                    Some(t) => format!("tenant {} not in {want}", name_of(f.tenant_names, t)),
                    None => format!("no tenant (wants {want})"),
                }
            }
            Self::Model(globs) => match f.body.model {
                Some(m) => format!(
                    "model `{}` matches none of {}",
                    m.decode(),
                    list(globs.iter().map(Glob::text))
                ),
                None => "the request names no model".to_owned(),
            },
            Self::InputTokens(b) => format!("input_tokens {}", b.failed_bound(i64::from(f.body.est_tokens))),
            Self::MaxTokens(b) => match f.body.max_tokens {
                Some(v) => format!("max_tokens {}", b.failed_bound(v)),
                None => "max_tokens not set".to_owned(),
            },
            Self::Stream(s) => format!("stream is {}", !s),
            Self::Metadata { slot, key, value } => match f.body.metadata[*slot] {
                Some(v) => format!("metadata.{key} `{}` is not `{value}`", v.decode()),
                None => format!("metadata.{key} absent"),
            },
            Self::All(cs) => cs.iter().find_map(|c| c.explain(f)).unwrap_or_default(),
            Self::Any(cs) => {
                let mut s = String::from("none of any[");
                for (i, c) in cs.iter().enumerate() {
                    if i > 0 {
                        s.push_str("; ");
                    }
                    s.push_str(&c.explain(f).unwrap_or_default());
                }
                s.push(']');
                s
            }
            Self::Not(_) => "its `not` condition holds".to_owned(),
        })
    }
}

fn name_of(names: &[Box<str>], id: u32) -> &str {
    names.get(id as usize).map_or("?", |s| s)
}

fn list<'s>(items: impl Iterator<Item = &'s str>) -> String {
    let mut s = String::from("[");
    for (i, it) in items.enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{it}");
    }
    s.push(']');
    s
}

impl HeaderTest {
    #[inline]
    fn eval(&self, v: Option<&str>) -> bool {
        match (self, v) {
            (Self::Absent, v) => v.is_none(),
            (_, None) => false,
            (Self::Present, Some(_)) => true,
            (Self::Equals(e), Some(v)) => **e == *v,
            (Self::OneOf(vs), Some(v)) => vs.iter().any(|e| **e == *v),
            (Self::Regex(r), Some(v)) => r.is_match(v),
        }
    }
}

/// Compile-time tables that conditions intern into.
#[derive(Debug, Default)]
pub struct Interner {
    /// Lowercase header names, by slot.
    pub headers: Vec<Box<str>>,
    /// Metadata keys, by slot.
    pub metadata: Vec<Box<str>>,
    /// Tenant names, by id.
    pub tenants: Vec<Box<str>>,
}

impl Interner {
    /// The slot of a (lowercased) header name, added if new.
    pub fn header(&mut self, name: &str) -> usize {
        let lower = name.to_ascii_lowercase();
        if let Some(i) = self.headers.iter().position(|h| **h == *lower) {
            return i;
        }
        self.headers.push(lower.into());
        self.headers.len() - 1
    }

    fn metadata(&mut self, key: &str, path: &str) -> Result<usize, CompileError> {
        if let Some(i) = self.metadata.iter().position(|h| **h == *key) {
            return Ok(i);
        }
        if self.metadata.len() >= MAX_METADATA_KEYS {
            return Err(CompileError::new(
                path,
                format!("rules may read at most {MAX_METADATA_KEYS} distinct metadata keys"),
            ));
        }
        self.metadata.push(key.into());
        Ok(self.metadata.len() - 1)
    }

    fn tenant(&self, name: &str) -> Option<u32> {
        self.tenants
            .iter()
            .position(|t| **t == *name)
            .and_then(|i| u32::try_from(i).ok())
    }
}

/// Compile one spec `Match` found at config path `path` (e.g. `routes[2].match`). Compile time.
///
/// # Errors
/// A path match with neither or both of exact/prefix, an empty list, an unknown tenant, a bad
/// regex, a header condition with nothing to test, or a range that can never hold.
pub fn compile(m: &spec::Match, path: &str, it: &mut Interner) -> Result<Cond, CompileError> {
    let mut conds = Vec::new();
    if let Some(p) = &m.path {
        conds.push(match p {
            spec::PathSpec::Exact(s) => Cond::PathExact(s.as_str().into()),
            spec::PathSpec::Match(pm) => match (&pm.exact, &pm.prefix) {
                (Some(e), None) => Cond::PathExact(e.as_str().into()),
                (None, Some(p)) => Cond::PathPrefix(p.as_str().into()),
                _ => {
                    return Err(CompileError::new(
                        format!("{path}.path"),
                        "set exactly one of `exact` and `prefix`",
                    ))
                }
            },
        });
    }
    if let Some(ms) = &m.method {
        if ms.is_empty() {
            return Err(CompileError::new(
                format!("{path}.method"),
                "an empty list never matches",
            ));
        }
        conds.push(Cond::Method(ms.iter().map(|s| s.to_ascii_uppercase().into()).collect()));
    }
    if let Some(hs) = &m.headers {
        for (name, h) in hs {
            let hpath = format!("{path}.headers.{name}");
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return Err(CompileError::new(hpath, "not a valid header name"));
            }
            let slot = it.header(name);
            let lname: Box<str> = name.to_ascii_lowercase().into();
            let mut tests = Vec::new();
            match h {
                spec::HeaderSpec::Equals(v) => tests.push(HeaderTest::Equals(v.as_str().into())),
                spec::HeaderSpec::Match(hm) => {
                    match hm.present {
                        Some(true) => tests.push(HeaderTest::Present),
                        Some(false) => tests.push(HeaderTest::Absent),
                        None => {}
                    }
                    if let Some(v) = &hm.equals {
                        tests.push(HeaderTest::Equals(v.as_str().into()));
                    }
                    if let Some(vs) = &hm.one_of {
                        if vs.is_empty() {
                            return Err(CompileError::new(
                                format!("{hpath}.one_of"),
                                "an empty list never matches",
                            ));
                        }
                        tests.push(HeaderTest::OneOf(vs.iter().map(|s| s.as_str().into()).collect()));
                    }
                    if let Some(r) = &hm.regex {
                        let re = RegexBuilder::new(r)
                            .size_limit(REGEX_SIZE_LIMIT)
                            .build()
                            .map_err(|e| CompileError::new(format!("{hpath}.regex"), format!("bad regex: {e}")))?;
                        tests.push(HeaderTest::Regex(re));
                    }
                    if tests.is_empty() {
                        return Err(CompileError::new(hpath, "set one of present, equals, one_of, regex"));
                    }
                    if hm.present == Some(false) && tests.len() > 1 {
                        return Err(CompileError::new(
                            hpath,
                            "`present: false` cannot be combined with a value test",
                        ));
                    }
                }
            }
            conds.extend(tests.into_iter().map(|test| Cond::Header {
                slot,
                name: lname.clone(),
                test,
            }));
        }
    }
    if let Some(ts) = &m.tenant {
        if ts.is_empty() {
            return Err(CompileError::new(
                format!("{path}.tenant"),
                "an empty list never matches",
            ));
        }
        let mut ids = Vec::new();
        for t in ts.iter() {
            ids.push(
                it.tenant(t)
                    .ok_or_else(|| CompileError::new(format!("{path}.tenant"), format!("unknown tenant `{t}`")))?,
            );
        }
        conds.push(Cond::Tenant(ids.into()));
    }
    if let Some(ms) = &m.model {
        if ms.is_empty() {
            return Err(CompileError::new(
                format!("{path}.model"),
                "an empty list never matches",
            ));
        }
        conds.push(Cond::Model(ms.iter().map(|s| Glob::new(s)).collect()));
    }
    if let Some(r) = m.input_tokens {
        conds.push(Cond::InputTokens(range(r, &format!("{path}.input_tokens"))?));
    }
    if let Some(r) = m.max_tokens {
        conds.push(Cond::MaxTokens(range(r, &format!("{path}.max_tokens"))?));
    }
    if let Some(s) = m.stream {
        conds.push(Cond::Stream(s));
    }
    if let Some(md) = &m.metadata {
        for (k, v) in md {
            let slot = it.metadata(k, &format!("{path}.metadata.{k}"))?;
            conds.push(Cond::Metadata {
                slot,
                key: k.as_str().into(),
                value: v.as_str().into(),
            });
        }
    }
    if let Some(all) = &m.all {
        let cs = all
            .iter()
            .enumerate()
            .map(|(i, c)| compile(c, &format!("{path}.all[{i}]"), it))
            .collect::<Result<Box<[_]>, _>>()?;
        conds.push(Cond::All(cs));
    }
    if let Some(any) = &m.any {
        if any.is_empty() {
            return Err(CompileError::new(format!("{path}.any"), "an empty list never matches"));
        }
        let cs = any
            .iter()
            .enumerate()
            .map(|(i, c)| compile(c, &format!("{path}.any[{i}]"), it))
            .collect::<Result<Box<[_]>, _>>()?;
        conds.push(Cond::Any(cs));
    }
    if let Some(n) = &m.not_ {
        conds.push(Cond::Not(Box::new(compile(n, &format!("{path}.not"), it)?)));
    }
    Ok(if conds.len() == 1 {
        conds.remove(0)
    } else {
        Cond::All(conds.into())
    })
}

fn range(r: spec::Range, path: &str) -> Result<Bounds, CompileError> {
    let b = Bounds::new(r);
    if b.lo > b.hi {
        return Err(CompileError::new(path, "this range is empty and never matches"));
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{scan, ScanOptions};
    use crate::tokens::Estimator;

    fn spec_match(json: &str) -> spec::Match {
        serde_json::from_str(json).unwrap()
    }

    fn check(m: &str, method: &str, path: &str, hdr: &[(&str, &str)], body: &str, tenant: Option<u32>) -> bool {
        let mut it = Interner {
            tenants: vec!["acme".into(), "zeta".into()],
            ..Interner::default()
        };
        let c = compile(&spec_match(m), "routes[0].match", &mut it).unwrap();
        let headers: Vec<Option<&str>> = it
            .headers
            .iter()
            .map(|h| hdr.iter().find(|(k, _)| k.eq_ignore_ascii_case(h)).map(|(_, v)| *v))
            .collect();
        let opts = ScanOptions {
            metadata_keys: &it.metadata,
            ..ScanOptions::tokens(Estimator::Fast)
        };
        let b = scan(body.as_bytes(), &opts).unwrap();
        let req = Request {
            method,
            path,
            headers: &headers,
            body: body.as_bytes(),
        };
        let f = Facts {
            req: &req,
            body: &b,
            tenant,
            tenant_names: &it.tenants,
        };
        let r = c.eval(&f);
        assert_eq!(c.explain(&f).is_none(), r);
        r
    }

    #[test]
    fn path_method_headers() {
        assert!(check(r#"{"path":"/v1/x"}"#, "POST", "/v1/x", &[], "{}", None));
        assert!(!check(r#"{"path":"/v1/x"}"#, "POST", "/v1/xy", &[], "{}", None));
        assert!(check(
            r#"{"path":{"prefix":"/v1/"}}"#,
            "POST",
            "/v1/xy",
            &[],
            "{}",
            None
        ));
        assert!(check(r#"{"method":["get","POST"]}"#, "post", "/", &[], "{}", None));
        assert!(!check(r#"{"method":"GET"}"#, "POST", "/", &[], "{}", None));
        assert!(check(
            r#"{"headers":{"X-Tier":"gold"}}"#,
            "POST",
            "/",
            &[("x-tier", "gold")],
            "{}",
            None
        ));
        assert!(!check(r#"{"headers":{"X-Tier":"gold"}}"#, "POST", "/", &[], "{}", None));
        assert!(check(
            r#"{"headers":{"x-a":{"present":false}}}"#,
            "POST",
            "/",
            &[],
            "{}",
            None
        ));
        assert!(check(
            r#"{"headers":{"x-a":{"one_of":["a","b"]}}}"#,
            "P",
            "/",
            &[("x-a", "b")],
            "{}",
            None
        ));
        assert!(check(
            r#"{"headers":{"x-a":{"regex":"^v[0-9]+$"}}}"#,
            "P",
            "/",
            &[("x-a", "v12")],
            "{}",
            None
        ));
        assert!(!check(
            r#"{"headers":{"x-a":{"regex":"^v[0-9]+$"}}}"#,
            "P",
            "/",
            &[("x-a", "vx")],
            "{}",
            None
        ));
    }

    #[test]
    fn body_conditions() {
        let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":300,"metadata":{"team":"ml"}}"#;
        assert!(check(r#"{"model":"gpt-4o*"}"#, "P", "/", &[], body, None));
        assert!(check(r#"{"model":["x","gpt-?o-mini"]}"#, "P", "/", &[], body, None));
        assert!(!check(r#"{"model":"gpt-4"}"#, "P", "/", &[], body, None));
        assert!(check(
            r#"{"max_tokens":{"gte":300,"lt":301}}"#,
            "P",
            "/",
            &[],
            body,
            None
        ));
        assert!(!check(r#"{"max_tokens":{"gt":300}}"#, "P", "/", &[], body, None));
        assert!(!check(r#"{"max_tokens":{"gt":1}}"#, "P", "/", &[], "{}", None));
        assert!(check(r#"{"input_tokens":{"lt":10}}"#, "P", "/", &[], body, None));
        assert!(check(
            r#"{"stream":true,"metadata":{"team":"ml"}}"#,
            "P",
            "/",
            &[],
            body,
            None
        ));
        assert!(!check(r#"{"metadata":{"team":"web"}}"#, "P", "/", &[], body, None));
    }

    #[test]
    fn tenant_and_logic() {
        assert!(check(r#"{"tenant":"zeta"}"#, "P", "/", &[], "{}", Some(1)));
        assert!(!check(r#"{"tenant":"zeta"}"#, "P", "/", &[], "{}", None));
        assert!(check(
            r#"{"any":[{"path":"/a"},{"path":"/b"}]}"#,
            "P",
            "/b",
            &[],
            "{}",
            None
        ));
        assert!(!check(
            r#"{"any":[{"path":"/a"},{"path":"/b"}]}"#,
            "P",
            "/c",
            &[],
            "{}",
            None
        ));
        assert!(check(r#"{"not":{"path":"/a"}}"#, "P", "/c", &[], "{}", None));
        assert!(check(
            r#"{"all":[{"method":"P"},{"not":{"stream":true}}]}"#,
            "P",
            "/c",
            &[],
            "{}",
            None
        ));
        assert!(check("{}", "P", "/", &[], "{}", None));
    }

    #[test]
    fn compile_errors_name_paths() {
        let mut it = Interner::default();
        let e = compile(
            &spec_match(r#"{"headers":{"x-tier":{"regex":"("}}}"#),
            "routes[3].match",
            &mut it,
        );
        assert_eq!(e.unwrap_err().path, "routes[3].match.headers.x-tier.regex");
        let e = compile(
            &spec_match(r#"{"any":[{"tenant":"nope"}]}"#),
            "routes[0].match",
            &mut it,
        );
        assert_eq!(e.unwrap_err().path, "routes[0].match.any[0].tenant");
        let e = compile(&spec_match(r#"{"input_tokens":{"gt":5,"lt":6}}"#), "r", &mut it);
        assert_eq!(e.unwrap_err().path, "r.input_tokens");
        let e = compile(&spec_match(r#"{"path":{}}"#), "r", &mut it);
        assert_eq!(e.unwrap_err().path, "r.path");
    }

    #[test]
    fn globs() {
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("a*b*c").matches("aXXbYYc"));
        assert!(!Glob::new("a*b*c").matches("aXXbYY"));
        assert!(Glob::new("??").matches("éx"));
        assert!(!Glob::new("?").matches("ab"));
        assert!(Glob::new("llama-*-instruct").matches("llama-3-70b-instruct"));
    }
}
