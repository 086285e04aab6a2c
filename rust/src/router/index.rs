//! The route index: which routes can match a request, as a bitset, found by a few table lookups instead of
//! evaluating every route in turn. For each request field some route tests by value (path, a header, `model`,
//! tenant, `stream`, a metadata key, a token count), compile time builds a table from the field's value to the
//! bitset of routes whose condition can hold for it (`Cond::need`; a route not testing the field is in every
//! bitset). `decide` ANDs one bitset per field and evaluates only the routes left, lowest first, in full: each
//! bitset is a necessary condition, so the first of those that holds is the first of all routes that holds.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::rules::{Atom, Cond, Facts, Field, Glob};

/// Most 64-route words the index handles (1,024 routes); a router with more routes walks them in order.
pub const MAX_WORDS: usize = 16;

type Bits = Box<[u64]>;

/// Bitsets of routes, by field; see the module comment.
#[derive(Debug)]
pub struct RouteIndex {
    words: usize,
    fields: Box<[FieldIndex]>,
}

#[derive(Debug)]
struct FieldIndex {
    field: Field,
    table: Table,
}

#[derive(Debug)]
enum Table {
    /// String fields. `exact` holds every value some route names, patterns that match it included; a value it
    /// lacks gets `other` plus the routes of each pattern it matches; a missing field gets `absent`.
    Str {
        exact: HashMap<Box<str>, Bits, ahash::RandomState>,
        other: Bits,
        absent: Bits,
        patterns: Box<[(Pattern, Bits)]>,
    },
    Id {
        by_id: HashMap<u32, Bits, ahash::RandomState>,
        other: Bits,
        absent: Bits,
    },
    Bool {
        yes: Bits,
        no: Bits,
    },
    /// `sets[k]` holds for every value in `starts[k]..starts[k + 1]` (`starts[0]` is `i64::MIN`).
    Range {
        starts: Box<[i64]>,
        sets: Box<[Bits]>,
        absent: Bits,
    },
}

#[derive(Debug)]
enum Pattern {
    Prefix(Box<str>),
    Glob(Glob),
}

impl Pattern {
    fn matches(&self, v: &str) -> bool {
        match self {
            Self::Prefix(p) => v.starts_with(&**p),
            Self::Glob(g) => g.matches(v),
        }
    }
}

/// A bitset builder of `words` words.
struct Set {
    words: usize,
}

impl Set {
    fn of(&self, routes: impl IntoIterator<Item = usize>) -> Bits {
        let mut b = vec![0u64; self.words].into_boxed_slice();
        for r in routes {
            b[r / 64] |= 1 << (r % 64);
        }
        b
    }
}

fn atom_holds(a: &Atom<'_>, v: &str) -> bool {
    match a {
        Atom::Str(s) => *s == v,
        Atom::Prefix(p) => v.starts_with(p),
        Atom::Glob(g) => g.matches(v),
        _ => false,
    }
}

impl RouteIndex {
    /// The index of `conds` (the routes' conditions, in order), or None when no route tests a field by value or
    /// there are more than `MAX_WORDS * 64` routes.
    pub fn build(conds: &[&Cond], headers: usize, metadata: usize) -> Option<Self> {
        let words = conds.len().div_ceil(64);
        if words == 0 || words > MAX_WORDS {
            return None;
        }
        let set = Set { words };
        let mut candidates = vec![
            Field::Path,
            Field::Model,
            Field::Tenant,
            Field::Stream,
            Field::InputTokens,
            Field::MaxTokens,
        ];
        candidates.extend((0..headers).map(Field::Header));
        candidates.extend((0..metadata).map(Field::Metadata));
        let mut fields = Vec::new();
        for field in candidates {
            let needs: Vec<Option<Vec<Atom<'_>>>> = conds.iter().map(|c| c.need(field)).collect();
            if needs.iter().all(Option::is_none) {
                continue;
            }
            let free: Vec<usize> = (0..conds.len()).filter(|&r| needs[r].is_none()).collect();
            // The routes free of the field plus those whose alternatives `holds` accepts.
            let with = |holds: &dyn Fn(&Atom<'_>) -> bool| {
                let hit = needs
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| n.as_ref().is_some_and(|atoms| atoms.iter().any(holds)))
                    .map(|(r, _)| r);
                set.of(free.iter().copied().chain(hit))
            };
            let atoms = || needs.iter().flatten().flatten();
            let table = match field {
                Field::Path | Field::Header(_) | Field::Model | Field::Metadata(_) => {
                    let mut exact: HashMap<Box<str>, Bits, ahash::RandomState> = HashMap::default();
                    let mut patterns: Vec<(Pattern, Bits)> = Vec::new();
                    for a in atoms() {
                        match *a {
                            Atom::Str(v) if !exact.contains_key(v) => {
                                exact.insert(v.into(), with(&|x| atom_holds(x, v)));
                            }
                            Atom::Prefix(p)
                                if !patterns
                                    .iter()
                                    .any(|(q, _)| matches!(q, Pattern::Prefix(q) if **q == *p)) =>
                            {
                                patterns.push((Pattern::Prefix(p.into()), with(&|x| *x == Atom::Prefix(p))));
                            }
                            Atom::Glob(g) if !patterns.iter().any(|(q, _)| matches!(q, Pattern::Glob(q) if q == g)) => {
                                patterns.push((Pattern::Glob(g.clone()), with(&|x| *x == Atom::Glob(g))));
                            }
                            _ => {}
                        }
                    }
                    Table::Str {
                        exact,
                        other: set.of(free.iter().copied()),
                        absent: with(&|x| *x == Atom::Absent),
                        patterns: patterns.into(),
                    }
                }
                Field::Tenant => {
                    let mut by_id: HashMap<u32, Bits, ahash::RandomState> = HashMap::default();
                    for a in atoms() {
                        if let Atom::Id(t) = *a {
                            by_id.entry(t).or_insert_with(|| with(&|x| *x == Atom::Id(t)));
                        }
                    }
                    Table::Id {
                        by_id,
                        other: set.of(free.iter().copied()),
                        absent: set.of(free.iter().copied()),
                    }
                }
                Field::Stream => Table::Bool {
                    yes: with(&|x| *x == Atom::Bool(true)),
                    no: with(&|x| *x == Atom::Bool(false)),
                },
                Field::InputTokens | Field::MaxTokens => {
                    let mut starts = vec![i64::MIN];
                    for a in atoms() {
                        if let Atom::Range(lo, hi) = *a {
                            starts.push(lo);
                            if let Some(next) = hi.checked_add(1) {
                                starts.push(next);
                            }
                        }
                    }
                    starts.sort_unstable();
                    starts.dedup();
                    // Every bound is a start, so each interval's first value stands for all of it.
                    let sets = starts
                        .iter()
                        .map(|&s| with(&|x| matches!(*x, Atom::Range(lo, hi) if lo <= s && s <= hi)))
                        .collect();
                    Table::Range {
                        starts: starts.into(),
                        sets,
                        absent: set.of(free.iter().copied()),
                    }
                }
            };
            fields.push(FieldIndex { field, table });
        }
        if fields.is_empty() {
            return None;
        }
        Some(Self {
            words,
            fields: fields.into(),
        })
    }

    /// The routes that can match: the AND of each field's bitset for the request's value.
    #[inline]
    pub fn candidates(&self, f: &Facts<'_, '_>, out: &mut [u64; MAX_WORDS]) {
        let acc = &mut out[..self.words];
        acc.fill(u64::MAX);
        for fi in &*self.fields {
            fi.and_into(acc, f);
        }
    }

    /// The first route, in order, among the candidates for which `holds` is true.
    #[inline]
    pub fn first(&self, f: &Facts<'_, '_>, mut holds: impl FnMut(usize) -> bool) -> Option<usize> {
        let mut acc = [0u64; MAX_WORDS];
        self.candidates(f, &mut acc);
        for (w, &word) in acc[..self.words].iter().enumerate() {
            let mut b = word;
            while b != 0 {
                let r = w * 64 + b.trailing_zeros() as usize;
                if holds(r) {
                    return Some(r);
                }
                b &= b - 1;
            }
        }
        None
    }
}

#[inline]
fn and(acc: &mut [u64], b: &[u64]) {
    for (a, b) in acc.iter_mut().zip(b) {
        *a &= *b;
    }
}

impl FieldIndex {
    #[inline]
    fn and_into(&self, acc: &mut [u64], f: &Facts<'_, '_>) {
        match &self.table {
            Table::Str {
                exact,
                other,
                absent,
                patterns,
            } => {
                let v: Option<Cow<'_, str>> = match self.field {
                    Field::Path => Some(Cow::Borrowed(f.req.path)),
                    Field::Header(slot) => f.req.header(slot).map(Cow::Borrowed),
                    Field::Model => f.body.model.map(|m| m.decode()),
                    Field::Metadata(slot) => f.body.metadata[slot].map(|m| m.decode()),
                    _ => None,
                };
                match v {
                    None => and(acc, absent),
                    Some(v) => match exact.get(&*v) {
                        Some(b) => and(acc, b),
                        None if patterns.is_empty() => and(acc, other),
                        None => {
                            let mut m = [0u64; MAX_WORDS];
                            let m = &mut m[..acc.len()];
                            m.copy_from_slice(other);
                            for (p, b) in &**patterns {
                                if p.matches(&v) {
                                    for (m, b) in m.iter_mut().zip(b.iter()) {
                                        *m |= *b;
                                    }
                                }
                            }
                            and(acc, m);
                        }
                    },
                }
            }
            Table::Id { by_id, other, absent } => match f.tenant {
                None => and(acc, absent),
                Some(t) => and(acc, by_id.get(&t).unwrap_or(other)),
            },
            Table::Bool { yes, no } => and(acc, if f.body.stream { yes } else { no }),
            Table::Range { starts, sets, absent } => {
                let v = match self.field {
                    Field::InputTokens => Some(i64::from(f.body.est_tokens)),
                    _ => f.body.max_tokens,
                };
                match v {
                    None => and(acc, absent),
                    Some(v) => {
                        let k = starts.partition_point(|&s| s <= v).saturating_sub(1);
                        and(acc, &sets[k]);
                    }
                }
            }
        }
    }
}
