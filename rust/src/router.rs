//! The compiled router: `CompiledRouter::compile` turns spec bytes into immutable tables (models,
//! tenants and their key digests, routes with compiled conditions, splits) once, checking every
//! cross-reference and naming the config path of each mistake; `decide` walks one request through
//! them — tenant, body scan, first matching route, target, tenant rules, body rewrite — and
//! returns a `Decision`. `decide` is pure: no I/O, no clock, no globals, no interior mutability,
//! and no heap allocation on the success path unless a trace is asked for. This module must never
//! touch Python types.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::classify::{self, Scorer};
use crate::error::{CompileError, DecideError};
use crate::request::{scan, Body, JStr, Request, ScanOptions};
use crate::rewrite::{self, Plan};
use crate::rules::{self, Cond, Facts, Interner};
use crate::spec::{self, AdapterField};
use crate::split::{Split, Sticky};
use crate::tokens::Estimator;

mod index;
use index::RouteIndex;

/// Most distinct header names one router may read (the key header included).
pub const MAX_HEADERS: usize = 32;

/// Fewest routes for which `decide` looks the route index up rather than walking the routes in order.
// NOTE: the index's lookups cost about what a dozen simple route checks do: callgrind, 2 KB body, bench_decide's
// route mix, index against walk: 3 routes 17.46k / 17.13k, 5: 17.68k / 17.25k, 8: 17.74k / 17.40k, 12: 17.77k /
// 17.64k, 20: 17.84k / 18.07k, 50: 18.01k / 19.70k.
const INDEX_MIN_ROUTES: usize = 16;

/// A logical model (one upstream pool) as the router hands it out.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Logical name.
    pub name: Box<str>,
    /// The `model` value the upstream expects; None keeps the client's.
    pub upstream_model: Option<Box<str>>,
    /// Where an adapter goes.
    pub adapter_field: AdapterField,
    /// Ask for usage on streams.
    pub stream_usage: bool,
}

#[derive(Debug, Clone)]
struct TenantInfo {
    base: Option<u32>,
    adapter: Option<u32>,
    allowed: Option<Box<[u32]>>,
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Model(u32),
    Split(u32),
    Requested,
    /// `scorer` indexes `CompiledRouter::scorers`; None is the built-in scorer.
    Classify {
        simple: u32,
        complex: u32,
        threshold: f32,
        scorer: Option<u32>,
    },
}

#[derive(Debug, Clone)]
struct RouteInfo {
    cond: Cond,
    target: Target,
}

/// One split variant, numbered globally across all splits.
#[derive(Debug, Clone)]
pub struct VariantInfo {
    /// Variant name.
    pub name: Box<str>,
    model: u32,
    adapter: Option<u32>,
}

#[derive(Debug, Clone)]
struct SplitInfo {
    split: Split,
    first_variant: u32,
}

/// What a request's `model` may name: a pool, and possibly an adapter on it.
#[derive(Debug, Clone, Copy)]
struct NameTarget {
    pool: u32,
    adapter: Option<u32>,
}

/// Hasher for keys that are already uniformly random (digest prefixes): the value is the hash.
#[derive(Default)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Tenant key digests: a map from the first 8 digest bytes to the candidates, each compared in
/// full in constant time. Timing reveals at most which 64-bit digest prefixes exist.
#[derive(Debug, Default)]
struct KeyTable {
    index: HashMap<u64, (u32, u32), BuildHasherDefault<PrefixHasher>>,
    entries: Vec<([u8; 32], u32)>,
}

impl KeyTable {
    fn build(mut entries: Vec<([u8; 32], u32)>) -> Self {
        entries.sort_unstable();
        let mut index: HashMap<u64, (u32, u32), _> = HashMap::default();
        index.reserve(entries.len());
        for (i, (d, _)) in entries.iter().enumerate() {
            let slot = index
                .entry(prefix(d))
                .or_insert((u32::try_from(i).unwrap_or(u32::MAX), 0));
            slot.1 += 1;
        }
        Self { index, entries }
    }

    /// The tenant owning `key`: one SHA-256 (~0.3 µs for a short key), one hash lookup.
    fn lookup(&self, key: &[u8]) -> Option<u32> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        let &(start, n) = self.index.get(&prefix(&digest))?;
        let cands = self.entries.get(start as usize..(start + n) as usize)?;
        let mut found = None;
        for (d, tenant) in cands {
            if digest_eq(d, &digest) {
                found = Some(*tenant);
            }
        }
        found
    }
}

/// Whether two digests are equal, in time independent of where they differ: the XOR of each 8-byte word is OR-ed
/// into one word, which is compared with zero in constant time.
// NOTE: `subtle`'s `[u8]::ct_eq` compares byte by byte, each through an optimization barrier (~0.15k instructions
// per key, callgrind); four words and one barrier say the same.
#[inline]
fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u64;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        if let (Some(x), Some(y)) = (x.first_chunk::<8>(), y.first_chunk::<8>()) {
            diff |= u64::from_le_bytes(*x) ^ u64::from_le_bytes(*y);
        }
    }
    bool::from(diff.ct_eq(&0))
}

fn prefix(d: &[u8; 32]) -> u64 {
    let mut p = [0u8; 8];
    p.copy_from_slice(&d[..8]);
    u64::from_le_bytes(p)
}

/// Outcome of one `decide`. Borrows the router (names, rewrite values) and the body.
#[derive(Debug, Clone)]
pub struct Decision<'a> {
    /// 200, or 401 / 403 / 404 with `error` set.
    pub status: u16,
    /// Message for the client when `status` is not 200.
    pub error: Option<String>,
    /// Matched route index (`route_name`).
    pub route: Option<u32>,
    /// Chosen pool (`models()[i]`).
    pub pool: Option<u32>,
    /// Applied adapter (`adapter_name`).
    pub adapter: Option<u32>,
    /// Chosen split variant (`variants()[i]`).
    pub variant: Option<u32>,
    /// Resolved tenant (`tenant_name`).
    pub tenant: Option<u32>,
    /// The body rewrite, when the body changes.
    pub rewrite: Option<Plan<'a>>,
    /// The request's `model`.
    pub requested_model: Option<JStr<'a>>,
    /// The request's `stream`.
    pub stream: bool,
    /// The rewrite added `stream_options.include_usage` (the client did not ask): the usage chunk
    /// at the end of the stream is for fastroute, not the client.
    pub usage_injected: bool,
    /// The request's `max_completion_tokens` / `max_tokens`.
    pub max_tokens: Option<i64>,
    /// Estimated input tokens.
    pub est_input_tokens: u32,
    /// Complexity score, when a classify route ran.
    pub score: Option<f32>,
    /// The threshold the score was compared with.
    pub threshold: Option<f32>,
}

impl Decision<'_> {
    fn empty() -> Self {
        Self {
            status: 200,
            error: None,
            route: None,
            pool: None,
            adapter: None,
            variant: None,
            tenant: None,
            rewrite: None,
            requested_model: None,
            stream: false,
            usage_injected: false,
            max_tokens: None,
            est_input_tokens: 0,
            score: None,
            threshold: None,
        }
    }

    #[cold]
    fn fail(mut self, status: u16, msg: String, trace: &mut Option<&mut Vec<String>>) -> Self {
        if let Some(t) = trace.as_deref_mut() {
            t.push(format!("answer {status}: {msg}"));
        }
        self.status = status;
        self.error = Some(msg);
        self
    }
}

/// Push a formatted line onto the trace, only when a trace is being collected.
macro_rules! trace {
    ($t:expr, $($arg:tt)*) => {
        if let Some(t) = $t.as_deref_mut() {
            t.push(format!($($arg)*));
        }
    };
}

/// The compiled, immutable router. `Send + Sync`; share it freely.
#[derive(Debug)]
pub struct CompiledRouter {
    models: Vec<ModelInfo>,
    tenants: Vec<TenantInfo>,
    routes: Vec<RouteInfo>,
    /// Which routes can match a request, by field value; None when no route tests a field by value.
    index: Option<RouteIndex>,
    route_names: Vec<Box<str>>,
    route_paths: Vec<Option<Box<str>>>,
    splits: Vec<SplitInfo>,
    variants: Vec<VariantInfo>,
    default: Option<u32>,
    names: HashMap<Box<str>, NameTarget, ahash::RandomState>,
    adapters: Vec<Box<str>>,
    adapter_owner: Vec<Option<u32>>,
    adapter_index: HashMap<Box<str>, u32, ahash::RandomState>,
    /// Whether any adapter belongs to a tenant (else no request needs the ownership check).
    owned_adapters: bool,
    keys: KeyTable,
    bearer: bool,
    allow_anonymous: bool,
    headers: Vec<Box<str>>,
    metadata_keys: Vec<Box<str>>,
    tenant_names: Vec<Box<str>>,
    estimator: Estimator,
    /// Trained classifier models, by the index in `Target::Classify::scorer`.
    scorers: Vec<Scorer>,
    /// Their keys (resolved model file paths), by the same index.
    scorer_keys: Vec<Box<str>>,
}

fn idx(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = char::from(b[2 * i]).to_digit(16)?;
        let lo = char::from(b[2 * i + 1]).to_digit(16)?;
        *o = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

impl CompiledRouter {
    /// Compile spec bytes (`msgspec.json.encode(Config)`). Runs once per config (re)load; cost is
    /// linear in the config, dominated by regex compilation and, for 10k keys, hex decoding.
    ///
    /// # Errors
    /// Invalid JSON or unknown keys (empty path), or any inconsistency, with its config path.
    pub fn compile(spec_bytes: &[u8]) -> Result<Self, CompileError> {
        Self::compile_with(spec_bytes, &[])
    }

    /// `compile`, with the classifier model files the spec's `routes[i].classifier` keys name, as
    /// (key, model JSON) pairs. A route naming a key that is not given, or a model that does not
    /// check out (`Scorer::from_json`), is an error at `routes[i].classifier`.
    ///
    /// # Errors
    /// As `compile`.
    #[expect(
        clippy::too_many_lines,
        reason = "one linear walk over the config, section by section"
    )]
    pub fn compile_with(spec_bytes: &[u8], classifiers: &[(&str, &[u8])]) -> Result<Self, CompileError> {
        let cfg = spec::parse(spec_bytes)?;
        let mut scorers: Vec<Scorer> = Vec::new();
        let mut scorer_keys: Vec<Box<str>> = Vec::new();
        let model_ids: HashMap<&str, u32> = cfg
            .models
            .keys()
            .enumerate()
            .map(|(i, k)| (k.as_str(), idx(i)))
            .collect();
        let model = |name: &str, path: &dyn Fn() -> String| {
            model_ids
                .get(name)
                .copied()
                .ok_or_else(|| CompileError::new(path(), format!("unknown model `{name}`")))
        };

        let mut models = Vec::with_capacity(cfg.models.len());
        for (name, m) in &cfg.models {
            if m.endpoints.is_empty() {
                return Err(CompileError::new(
                    format!("models.{name}.endpoints"),
                    "a model needs at least one endpoint",
                ));
            }
            for (i, f) in m.fallback.iter().enumerate() {
                model(f, &|| format!("models.{name}.fallback[{i}]"))?;
            }
            models.push(ModelInfo {
                name: name.as_str().into(),
                upstream_model: m.upstream_model.as_deref().map(Into::into),
                adapter_field: m.adapter_field,
                stream_usage: m.stream_usage,
            });
        }

        let key_header = cfg.server.key_header.trim().to_ascii_lowercase();
        if key_header.is_empty() {
            return Err(CompileError::new("server.key_header", "must name a header"));
        }
        let mut it = Interner {
            tenants: cfg.tenants.keys().map(|k| k.as_str().into()).collect(),
            ..Interner::default()
        };
        let key_slot = it.header(&key_header);
        debug_assert_eq!(key_slot, 0);

        // Adapters: those pools declare, then tenants' own (each owned by exactly one tenant).
        let mut adapters: Vec<Box<str>> = Vec::new();
        let mut adapter_owner: Vec<Option<u32>> = Vec::new();
        // NOTE: ahash, not SipHash: these are looked up with the request's `model` on every decide (~800
        // instructions less per lookup, callgrind); the keys come from the config, so flooding is not a concern.
        let mut adapter_index: HashMap<Box<str>, u32, ahash::RandomState> = HashMap::default();
        let mut intern_adapter = |name: &str, adapters: &mut Vec<Box<str>>, owner: &mut Vec<Option<u32>>| {
            *adapter_index.entry(name.into()).or_insert_with(|| {
                adapters.push(name.into());
                owner.push(None);
                idx(adapters.len() - 1)
            })
        };
        let mut names: HashMap<Box<str>, NameTarget, ahash::RandomState> = HashMap::default();
        for name in cfg.models.keys() {
            let pool = model_ids[name.as_str()];
            names.insert(name.as_str().into(), NameTarget { pool, adapter: None });
        }
        for (name, m) in &cfg.models {
            let pool = model_ids[name.as_str()];
            for (i, a) in m.aliases.iter().enumerate() {
                if names
                    .insert(a.as_str().into(), NameTarget { pool, adapter: None })
                    .is_some()
                {
                    return Err(CompileError::new(
                        format!("models.{name}.aliases[{i}]"),
                        format!("`{a}` already names another model"),
                    ));
                }
            }
        }
        for (name, m) in &cfg.models {
            let pool = model_ids[name.as_str()];
            if let Some(u) = &m.upstream_model {
                names
                    .entry(u.as_str().into())
                    .or_insert(NameTarget { pool, adapter: None });
            }
            for a in &m.adapters {
                let ai = intern_adapter(a, &mut adapters, &mut adapter_owner);
                names.entry(a.as_str().into()).or_insert(NameTarget {
                    pool,
                    adapter: Some(ai),
                });
            }
        }

        let mut tenants = Vec::with_capacity(cfg.tenants.len());
        let mut key_entries: Vec<([u8; 32], u32)> = Vec::new();
        let mut key_owner: HashMap<[u8; 32], u32> = HashMap::new();
        for (ti, (tname, t)) in cfg.tenants.iter().enumerate() {
            let tid = idx(ti);
            let base = t
                .base
                .as_deref()
                .map(|b| model(b, &|| format!("tenants.{tname}.base")))
                .transpose()?;
            let adapter = match (&t.adapter, base) {
                (None, _) => None,
                (Some(_), None) => {
                    return Err(CompileError::new(
                        format!("tenants.{tname}.adapter"),
                        "an adapter needs a `base` model",
                    ));
                }
                (Some(a), Some(b)) => {
                    let ai = intern_adapter(a, &mut adapters, &mut adapter_owner);
                    if let Some(Some(other)) = adapter_owner.get(ai as usize) {
                        return Err(CompileError::new(
                            format!("tenants.{tname}.adapter"),
                            format!(
                                "adapter `{a}` already belongs to tenant `{}`",
                                it.tenants[*other as usize]
                            ),
                        ));
                    }
                    adapter_owner[ai as usize] = Some(tid);
                    // A tenant's adapter always resolves to its own base.
                    names.insert(
                        a.as_str().into(),
                        NameTarget {
                            pool: b,
                            adapter: Some(ai),
                        },
                    );
                    Some(ai)
                }
            };
            let allowed = t
                .allowed_models
                .as_ref()
                .map(|ms| {
                    ms.iter()
                        .enumerate()
                        .map(|(i, m)| model(m, &|| format!("tenants.{tname}.allowed_models[{i}]")))
                        .collect::<Result<Box<[u32]>, _>>()
                })
                .transpose()?;
            for (i, hex) in t.keys_sha256.iter().enumerate() {
                let path = || format!("tenants.{tname}.keys_sha256[{i}]");
                let d = parse_digest(hex.trim())
                    .ok_or_else(|| CompileError::new(path(), "not a SHA-256 hex digest (64 hex characters)"))?;
                match key_owner.get(&d) {
                    Some(&o) if o != tid => {
                        return Err(CompileError::new(
                            path(),
                            format!("this key also belongs to tenant `{}`", it.tenants[o as usize]),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        key_owner.insert(d, tid);
                        key_entries.push((d, tid));
                    }
                }
            }
            tenants.push(TenantInfo { base, adapter, allowed });
        }

        let mut splits = Vec::with_capacity(cfg.splits.len());
        let mut variants = Vec::new();
        let split_ids: HashMap<&str, u32> = cfg
            .splits
            .keys()
            .enumerate()
            .map(|(i, k)| (k.as_str(), idx(i)))
            .collect();
        for (sname, s) in &cfg.splits {
            let path = format!("splits.{sname}");
            if s.variants.is_empty() {
                return Err(CompileError::new(
                    format!("{path}.variants"),
                    "a split needs at least one variant",
                ));
            }
            let mut sticky = Vec::new();
            if s.sticky.is_empty() {
                return Err(CompileError::new(
                    format!("{path}.sticky"),
                    "name at least one sticky key",
                ));
            }
            for src in s.sticky.iter() {
                sticky.push(match src.as_str() {
                    "tenant" => Sticky::Tenant,
                    "user" => Sticky::User,
                    other => match other.strip_prefix("header:") {
                        Some(h) if !h.trim().is_empty() => Sticky::Header(it.header(h.trim())),
                        _ => {
                            return Err(CompileError::new(
                                format!("{path}.sticky"),
                                format!("`{other}`: use `tenant`, `user` or `header:<name>`"),
                            ));
                        }
                    },
                });
            }
            let first_variant = idx(variants.len());
            let mut weights = Vec::with_capacity(s.variants.len());
            for (vi, v) in s.variants.iter().enumerate() {
                let vpath = format!("{path}.variants[{vi}]");
                if !(v.weight.is_finite() && v.weight > 0.0) {
                    return Err(CompileError::new(
                        format!("{vpath}.weight"),
                        "must be a positive number",
                    ));
                }
                if s.variants[..vi].iter().any(|o| o.name == v.name) {
                    return Err(CompileError::new(
                        format!("{vpath}.name"),
                        format!("duplicate variant `{}`", v.name),
                    ));
                }
                let m = model(&v.to, &|| format!("{vpath}.to"))?;
                let adapter = v
                    .adapter
                    .as_deref()
                    .map(|a| intern_adapter(a, &mut adapters, &mut adapter_owner));
                weights.push(v.weight);
                variants.push(VariantInfo {
                    name: v.name.as_str().into(),
                    model: m,
                    adapter,
                });
            }
            splits.push(SplitInfo {
                split: Split::new(sname, sticky, &weights),
                first_variant,
            });
            if it.headers.len() > MAX_HEADERS {
                return Err(CompileError::new(format!("{path}.sticky"), too_many_headers()));
            }
        }

        let mut routes = Vec::with_capacity(cfg.routes.len());
        let mut route_names: Vec<Box<str>> = Vec::with_capacity(cfg.routes.len());
        let mut route_paths = Vec::with_capacity(cfg.routes.len());
        for (ri, r) in cfg.routes.iter().enumerate() {
            let path = format!("routes[{ri}]");
            if r.name.is_empty() {
                return Err(CompileError::new(format!("{path}.name"), "a route needs a name"));
            }
            if route_names.iter().any(|n| **n == *r.name) {
                return Err(CompileError::new(
                    format!("{path}.name"),
                    format!("duplicate route name `{}`", r.name),
                ));
            }
            let cond = rules::compile(&r.match_, &format!("{path}.match"), &mut it)?;
            if it.headers.len() > MAX_HEADERS {
                return Err(CompileError::new(format!("{path}.match.headers"), too_many_headers()));
            }
            let targets = usize::from(r.to.is_some()) + usize::from(r.split.is_some()) + usize::from(r.requested);
            if targets != 1 {
                return Err(CompileError::new(
                    path,
                    "set exactly one target: `to`, `split` or `requested: true`".to_owned()
                        + if targets == 0 {
                            " (none is set)"
                        } else {
                            " (several are set)"
                        },
                ));
            }
            let target = match (&r.classify, &r.to, &r.split) {
                (Some(spec::Classify::Complexity), Some(spec::To::Classify(ct)), _) => {
                    if !(0.0..=1.0).contains(&r.threshold) {
                        return Err(CompileError::new(format!("{path}.threshold"), "must be within [0, 1]"));
                    }
                    let scorer = match &r.classifier {
                        None => None,
                        Some(key) => Some(match scorer_keys.iter().position(|k| **k == **key) {
                            Some(i) => idx(i),
                            None => {
                                let cpath = || format!("{path}.classifier");
                                let (_, bytes) =
                                    classifiers.iter().find(|(k, _)| *k == key.as_str()).ok_or_else(|| {
                                        CompileError::new(cpath(), format!("model file `{key}` was not loaded"))
                                    })?;
                                let sc = Scorer::from_json(bytes)
                                    .map_err(|e| CompileError::new(cpath(), format!("model file `{key}`: {e}")))?;
                                scorers.push(sc);
                                scorer_keys.push(key.as_str().into());
                                idx(scorers.len() - 1)
                            }
                        }),
                    };
                    Target::Classify {
                        simple: model(&ct.simple, &|| format!("{path}.to.simple"))?,
                        complex: model(&ct.complex, &|| format!("{path}.to.complex"))?,
                        #[expect(clippy::cast_possible_truncation, reason = "a threshold in [0, 1]")]
                        threshold: r.threshold as f32,
                        scorer,
                    }
                }
                (Some(_), _, _) => {
                    return Err(CompileError::new(
                        format!("{path}.to"),
                        "`classify` needs `to: {simple: <model>, complex: <model>}`",
                    ));
                }
                (None, Some(spec::To::Classify(_)), _) => {
                    return Err(CompileError::new(
                        format!("{path}.to"),
                        "`to: {simple, complex}` needs `classify`",
                    ));
                }
                (None, Some(spec::To::Model(m)), _) => Target::Model(model(m, &|| format!("{path}.to"))?),
                (None, None, Some(s)) => Target::Split(
                    *split_ids
                        .get(s.as_str())
                        .ok_or_else(|| CompileError::new(format!("{path}.split"), format!("unknown split `{s}`")))?,
                ),
                (None, None, None) => Target::Requested,
            };
            routes.push(RouteInfo { cond, target });
            route_names.push(r.name.as_str().into());
            route_paths.push(r.upstream_path.as_deref().map(Into::into));
        }
        let default = cfg
            .default
            .as_deref()
            .map(|d| model(d, &|| "default".to_owned()))
            .transpose()?;

        let owned_adapters = adapter_owner.iter().any(Option::is_some);
        let conds: Vec<&Cond> = routes.iter().map(|r| &r.cond).collect();
        let index = RouteIndex::build(&conds, it.headers.len(), it.metadata.len());
        Ok(Self {
            models,
            tenants,
            index,
            routes,
            route_names,
            route_paths,
            splits,
            variants,
            default,
            names,
            adapters,
            adapter_owner,
            adapter_index,
            owned_adapters,
            keys: KeyTable::build(key_entries),
            bearer: key_header == "authorization",
            allow_anonymous: cfg.server.allow_anonymous,
            headers: it.headers,
            metadata_keys: it.metadata,
            tenant_names: it.tenants,
            estimator: match (cfg.server.token_estimator, cfg.server.encoding) {
                (spec::TokenEstimator::Fast, _) => Estimator::Fast,
                (spec::TokenEstimator::Exact, spec::Encoding::O200k) => Estimator::ExactO200k,
                (spec::TokenEstimator::Exact, spec::Encoding::Cl100k) => Estimator::ExactCl100k,
            },
            scorers,
            scorer_keys,
        })
    }

    /// Lowercase names of the headers `decide` reads, by slot; slot 0 is the key header.
    #[must_use]
    pub fn header_names(&self) -> &[Box<str>] {
        &self.headers
    }

    /// The logical models (pools), by id.
    #[must_use]
    pub fn models(&self) -> &[ModelInfo] {
        &self.models
    }

    /// Route names, by index.
    #[must_use]
    pub fn route_names(&self) -> &[Box<str>] {
        &self.route_names
    }

    /// Each route's `upstream_path`, by index.
    #[must_use]
    pub fn route_upstream_paths(&self) -> &[Option<Box<str>>] {
        &self.route_paths
    }

    /// Split variants, by global id.
    #[must_use]
    pub fn variants(&self) -> &[VariantInfo] {
        &self.variants
    }

    /// Adapter names, by id.
    #[must_use]
    pub fn adapters(&self) -> &[Box<str>] {
        &self.adapters
    }

    /// Tenant names, by id.
    #[must_use]
    pub fn tenant_names(&self) -> &[Box<str>] {
        &self.tenant_names
    }

    /// Number of tenant key digests.
    #[must_use]
    pub fn tenant_key_count(&self) -> usize {
        self.keys.entries.len()
    }

    /// The classifier model keys (resolved model file paths) this router loaded, in load order.
    #[must_use]
    pub fn classifier_keys(&self) -> &[Box<str>] {
        &self.scorer_keys
    }

    /// The estimator this router counts tokens with.
    #[must_use]
    pub fn estimator(&self) -> Estimator {
        self.estimator
    }

    /// Decide where one request goes. Pure. Without a trace it performs no heap allocation on
    /// the success path (SHA-256 of the key, one body scan, route evaluation, a rewrite plan);
    /// with `trace` it also appends the human-readable reasons.
    ///
    /// # Errors
    /// The body is not a JSON object, is malformed, or a known field has the wrong type.
    #[inline]
    pub fn decide<'a>(
        &'a self,
        req: &Request<'a>,
        trace: Option<&mut Vec<String>>,
    ) -> Result<Decision<'a>, DecideError> {
        self.decide_scored(req, trace, None)
    }

    /// `decide`, with a classify route's score and threshold given by the caller (the semantic
    /// classifier's, computed outside the core) instead of computed from the body.
    ///
    /// # Errors
    /// As `decide`.
    #[expect(clippy::too_many_lines, reason = "the phases of one decision, in order")]
    pub fn decide_scored<'a>(
        &'a self,
        req: &Request<'a>,
        mut trace: Option<&mut Vec<String>>,
        scored: Option<(f32, f32)>,
    ) -> Result<Decision<'a>, DecideError> {
        let mut d = Decision::empty();

        // Phase 1: the tenant.
        let key = req.header(0).and_then(|v| {
            let v = if self.bearer {
                let b = v.as_bytes();
                if b.len() < 7 || !b[..7].eq_ignore_ascii_case(b"bearer ") {
                    return None;
                }
                &v[7..]
            } else {
                v
            };
            // NOTE: a key that starts and ends with a visible ASCII byte has nothing to trim; `str::trim` looks for
            // Unicode white space at both ends (~50 instructions, callgrind).
            let v = match (v.as_bytes().first(), v.as_bytes().last()) {
                (Some(a), Some(z)) if a.is_ascii_graphic() && z.is_ascii_graphic() => v,
                _ => v.trim(),
            };
            (!v.is_empty()).then_some(v)
        });
        match key {
            Some(k) => match self.keys.lookup(k.as_bytes()) {
                Some(t) => {
                    d.tenant = Some(t);
                    trace!(trace, "tenant {} (key matched)", self.tenant_names[t as usize]);
                }
                None => return Ok(d.fail(401, "invalid API key".into(), &mut trace)),
            },
            None if self.allow_anonymous => trace!(trace, "no API key: anonymous caller"),
            None => return Ok(d.fail(401, "missing API key".into(), &mut trace)),
        }

        // Phase 2: the body.
        let opts = ScanOptions {
            metadata_keys: &self.metadata_keys,
            ..ScanOptions::tokens(self.estimator)
        };
        // NOTE: the scan's result is borrowed where it lies, not moved out of the `Result` (a ~600-byte copy).
        let scanned = scan(req.body, &opts);
        let body = match scanned {
            Ok(ref body) => body,
            Err(e) => return Err(e),
        };
        d.requested_model = body.model;
        d.stream = body.stream;
        d.max_tokens = body.max_tokens;
        d.est_input_tokens = body.est_tokens;
        trace!(
            trace,
            "body: model {}, ~{} input tokens, stream {}",
            body.model
                .map_or_else(|| "(none)".to_owned(), |m| format!("`{}`", m.decode())),
            body.est_tokens,
            body.stream
        );

        // A request may never name another tenant's adapter, whatever route it takes.
        for named in [body.model, body.adapter_id].into_iter().flatten() {
            if let Some(owner) = self.adapter_owner_of(named) {
                if Some(owner) != d.tenant {
                    return Ok(d.fail(
                        403,
                        format!("model `{}` is not available to this caller", named.decode()),
                        &mut trace,
                    ));
                }
            }
        }

        // Phase 3: the first matching route.
        let facts = Facts {
            req,
            body,
            tenant: d.tenant,
            tenant_names: &self.tenant_names,
        };
        let matched = if trace.is_some() {
            // The trace explains every route in order, those the route index would skip included.
            let mut matched = None;
            for (i, r) in self.routes.iter().enumerate() {
                match r.cond.explain(&facts) {
                    None => {
                        trace!(trace, "route {} matched", self.route_names[i]);
                        matched = Some(i);
                        break;
                    }
                    Some(why) => trace!(trace, "route {} skipped: {why}", self.route_names[i]),
                }
            }
            matched
        } else {
            self.first_match(&facts)
        };

        // Phase 4: the target.
        let mut adapter = None;
        let pool = match matched {
            None => match self.default {
                Some(m) => {
                    trace!(
                        trace,
                        "no route matched: default model {}",
                        self.models[m as usize].name
                    );
                    m
                }
                None => return Ok(d.fail(404, "no route matched this request".into(), &mut trace)),
            },
            Some(i) => {
                d.route = Some(idx(i));
                match self.routes[i].target {
                    Target::Model(m) => {
                        trace!(trace, "target: model {}", self.models[m as usize].name);
                        m
                    }
                    Target::Split(s) => {
                        let (v, bucket, source) = self.pick_variant(&self.splits[s as usize], req, body, d.tenant);
                        let vi = &self.variants[v as usize];
                        d.variant = Some(v);
                        adapter = vi.adapter;
                        trace!(
                            trace,
                            "split {} → variant {} (bucket {bucket:.3} by {source}) → model {}",
                            self.splits[s as usize].split.name,
                            vi.name,
                            self.models[vi.model as usize].name
                        );
                        vi.model
                    }
                    Target::Requested => {
                        let Some(m) = body.model else {
                            return Err(DecideError::field("model", "`model` is required"));
                        };
                        let name = m.decode();
                        match self.names.get(&*name) {
                            Some(nt) => {
                                adapter = nt.adapter;
                                trace!(
                                    trace,
                                    "requested model `{name}` → model {}",
                                    self.models[nt.pool as usize].name
                                );
                                nt.pool
                            }
                            None => return Ok(d.fail(404, format!("model `{name}` does not exist"), &mut trace)),
                        }
                    }
                    Target::Classify {
                        simple,
                        complex,
                        threshold,
                        scorer,
                    } => {
                        let scorer = scorer.map(|s| &self.scorers[s as usize]);
                        let (score, threshold, by) = match scored {
                            Some((s, t)) => (s, t, "semantic "),
                            None => (classify_score(req.body, &opts, scorer, body.est_tokens)?, threshold, ""),
                        };
                        d.score = Some(score);
                        d.threshold = Some(threshold);
                        let (m, op, which) = if score >= threshold {
                            (complex, ">=", "complex")
                        } else {
                            (simple, "<", "simple")
                        };
                        trace!(
                            trace,
                            "classify complexity: {by}score {score:.4} {op} threshold {threshold:.4} → {which} (model {}; \
                             classifier {})",
                            self.models[m as usize].name,
                            if scored.is_some() { "semantic" } else { scorer.map_or("built-in", |_| "trained") }
                        );
                        m
                    }
                }
            }
        };
        d.pool = Some(pool);

        // Phase 5: tenant rules.
        if let Some(t) = d.tenant {
            let ti = &self.tenants[t as usize];
            if let Some(allowed) = &ti.allowed {
                if !allowed.contains(&pool) {
                    let msg = format!(
                        "tenant `{}` may not use model `{}`",
                        self.tenant_names[t as usize], self.models[pool as usize].name
                    );
                    return Ok(d.fail(403, msg, &mut trace));
                }
            }
            if adapter.is_none() && ti.base == Some(pool) {
                if let Some(a) = ti.adapter {
                    adapter = Some(a);
                    trace!(trace, "tenant adapter {} on base model", self.adapters[a as usize]);
                }
            }
        }
        if let Some(a) = adapter {
            if let Some(owner) = self.adapter_owner[a as usize] {
                if Some(owner) != d.tenant {
                    let msg = format!(
                        "adapter `{}` is not available to this caller",
                        self.adapters[a as usize]
                    );
                    return Ok(d.fail(403, msg, &mut trace));
                }
            }
        }
        d.adapter = adapter;

        // Phase 6: the body rewrite.
        let info = &self.models[pool as usize];
        let adapter_name = adapter.map(|a| &*self.adapters[a as usize]);
        let (model_value, adapter_id) = match (adapter_name, info.adapter_field) {
            (Some(a), AdapterField::Model) => (Some(a), None),
            (a, _) => (info.upstream_model.as_deref(), a),
        };
        let usage = body.stream && info.stream_usage && !body.stream_options.is_some_and(|so| so.include_usage);
        d.rewrite = rewrite::plan(req.body, body, model_value, adapter_id, usage);
        d.usage_injected = usage;
        if trace.is_some() {
            if usage {
                trace!(
                    trace,
                    "stream: asking the upstream for usage (stream_options.include_usage)"
                );
            }
            match (&d.rewrite, model_value, adapter_id) {
                (None, _, _) => trace!(trace, "body unchanged"),
                (Some(_), m, a) => trace!(
                    trace,
                    "body rewritten: model → {}{}",
                    m.map_or_else(|| "(unchanged)".to_owned(), |m| format!("`{m}`")),
                    a.map_or_else(String::new, |a| format!(", adapter_id → `{a}`"))
                ),
            }
        }
        Ok(d)
    }

    /// The first route whose condition holds, evaluating only the route index's candidates (for a router of
    /// `INDEX_MIN_ROUTES` routes or more; fewer are walked in order).
    #[inline]
    fn first_match(&self, facts: &Facts<'_, '_>) -> Option<usize> {
        match &self.index {
            Some(index) if self.routes.len() >= INDEX_MIN_ROUTES => {
                index.first(facts, |i| self.routes[i].cond.eval(facts))
            }
            _ => self.routes.iter().position(|r| r.cond.eval(facts)),
        }
    }

    /// The first route whose condition holds, evaluating every route: what `first_match` must equal.
    #[cfg(test)]
    fn first_match_linear(&self, facts: &Facts<'_, '_>) -> Option<usize> {
        self.routes.iter().position(|r| r.cond.eval(facts))
    }

    fn adapter_owner_of(&self, name: JStr<'_>) -> Option<u32> {
        if !self.owned_adapters {
            return None;
        }
        let ai = *self.adapter_index.get(&*name.decode())?;
        self.adapter_owner[ai as usize]
    }

    /// The variant for this request: the first sticky source present, else the body bytes.
    fn pick_variant(
        &self,
        s: &SplitInfo,
        req: &Request<'_>,
        body: &Body<'_>,
        tenant: Option<u32>,
    ) -> (u32, f64, &'static str) {
        let mut key: Option<(&[u8], &'static str)> = None;
        for src in &s.split.sticky {
            key = match src {
                Sticky::Header(slot) => req.header(*slot).map(|v| (v.as_bytes(), "header")),
                Sticky::Tenant => tenant.map(|t| (self.tenant_names[t as usize].as_bytes(), "tenant")),
                Sticky::User => body.user.map(|u| (u.raw.as_bytes(), "user")),
            };
            if key.is_some() {
                break;
            }
        }
        let (k, source) = key.unwrap_or((req.body, "body hash"));
        let (v, bucket) = s.split.pick(k);
        (s.first_variant + idx(v), bucket, source)
    }
}

/// The complexity score of a body whose token estimate is known: the feature pass over the body, then the
/// trained `scorer` (None: the built-in weights). `decide` and `fastroute eval` both score through here.
///
/// # Errors
/// The body does not scan (as `scan`).
pub fn classify_score(
    body: &[u8],
    opts: &ScanOptions<'_>,
    scorer: Option<&Scorer>,
    est_tokens: u32,
) -> Result<f32, DecideError> {
    // NOTE: features are counted only here, by a second pass over the body, so requests that never reach a
    // classify route do not pay for them.
    let grams = scorer.map_or(classify::Grams::Off, Scorer::grams);
    let features = scan(
        body,
        &ScanOptions {
            features: true,
            grams,
            ..*opts
        },
    )?
    .features;
    Ok(match scorer {
        Some(s) => s.score(&features, est_tokens),
        None => classify::score_builtin(&features, est_tokens),
    })
}

/// A body's complexity score outside a router: the token pass, then `classify_score` (what `decide` does at a
/// classify route). For `fastroute eval`.
///
/// # Errors
/// The body does not scan.
pub fn score_body(body: &[u8], scorer: Option<&Scorer>, estimator: Estimator) -> Result<f32, DecideError> {
    let opts = ScanOptions::tokens(estimator);
    let tokens = scan(body, &opts)?.est_tokens;
    classify_score(body, &opts, scorer, tokens)
}

/// A body's dense feature vector and the n-gram buckets it hits (masked to `hash_bits`), exactly as
/// `classify_score` sees them. For `fastroute train`; allocates.
///
/// # Errors
/// The body does not scan.
pub fn body_features(
    body: &[u8],
    hash_bits: u32,
    estimator: Estimator,
) -> Result<([f32; classify::DENSE], Vec<u32>), DecideError> {
    let opts = ScanOptions::tokens(estimator);
    let tokens = scan(body, &opts)?.est_tokens;
    let out = std::cell::RefCell::new(Vec::new());
    let mask = 1u32.checked_shl(hash_bits).map_or(u32::MAX, |n| n - 1);
    let features = scan(
        body,
        &ScanOptions {
            features: true,
            grams: classify::Grams::Collect(&out, mask),
            ..opts
        },
    )?
    .features;
    Ok((features.dense(tokens), out.into_inner()))
}

#[cold]
fn too_many_headers() -> String {
    format!("rules may read at most {MAX_HEADERS} distinct headers")
}

#[cfg(test)]
mod tests;
