//! The wire format that `Router.compile` reads: a serde mirror of `python/fastroute/config.py`,
//! field for field and key for key (unknown keys rejected). It only describes the shape; every
//! check that needs more than one field (cross-references, regexes, weights) lives in
//! `router.rs` and `rules.rs`. This module must never hold runtime state.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::CompileError;

/// Parse spec bytes (`msgspec.json.encode(Config)`). Runs once per compile.
///
/// # Errors
/// The bytes are not JSON of the `Config` shape.
pub fn parse(spec: &[u8]) -> Result<Config, CompileError> {
    serde_json::from_slice(spec).map_err(|e| CompileError::new("", format!("invalid spec: {e}")))
}

/// One value or a list of them (`method: GET` or `method: [GET, POST]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values as a slice-like iterator.
    pub fn iter(&self) -> impl Iterator<Item = &String> {
        match self {
            Self::One(s) => std::slice::from_ref(s).iter(),
            Self::Many(v) => v.iter(),
        }
    }

    /// True when this is a list of one or more values, or a single value.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Many(v) if v.is_empty())
    }
}

/// Upstream timeouts in seconds (used by the Python layers; carried here for the mirror).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Connect timeout.
    pub connect: f64,
    /// Time to the first byte of the answer.
    pub first_byte: f64,
    /// Longest silence between two streamed chunks.
    pub idle: f64,
    /// Whole request.
    pub total: f64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: 2.0,
            first_byte: 60.0,
            idle: 60.0,
            total: 600.0,
        }
    }
}

/// `max_body_bytes`: Python resolves size strings to an int, but both are accepted.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Size {
    /// Bytes.
    Bytes(u64),
    /// A size string such as "4MiB" (resolved by Python; unused here).
    Text(String),
}

/// Which token estimator the router uses.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TokenEstimator {
    /// The byte-class heuristic.
    #[default]
    Fast,
    /// A real BPE.
    Exact,
}

/// The BPE used by the exact estimator.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum Encoding {
    /// o200k_base (GPT-4o family).
    #[default]
    #[serde(rename = "o200k_base")]
    O200k,
    /// cl100k_base (GPT-4 / 3.5 family).
    #[serde(rename = "cl100k_base")]
    Cl100k,
}

/// `server:`.
// Python (msgspec) is the schema's authority and rejects unknown keys with the file and line; the
// sections the core does not use (resilience, admin, limits, ...) may carry keys this side ignores.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Server {
    /// Listen address.
    pub listen: String,
    /// Worker processes.
    pub workers: u32,
    /// Largest accepted body.
    pub max_body_bytes: Size,
    /// Header holding the tenant key (`authorization` means `Bearer <key>`).
    pub key_header: String,
    /// Serve key-less requests as the anonymous caller.
    pub allow_anonymous: bool,
    /// Fast or exact token estimate.
    pub token_estimator: TokenEstimator,
    /// BPE for the exact estimate.
    pub encoding: Encoding,
    /// Default upstream timeouts.
    pub timeouts: Timeouts,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            workers: 1,
            max_body_bytes: Size::Bytes(4 * 1024 * 1024),
            key_header: "authorization".into(),
            allow_anonymous: false,
            token_estimator: TokenEstimator::Fast,
            encoding: Encoding::O200k,
            timeouts: Timeouts::default(),
        }
    }
}

/// Prices in USD.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Price {
    /// Per 1k input tokens.
    pub input_per_1k: f64,
    /// Per 1k output tokens.
    pub output_per_1k: f64,
    /// Per request.
    pub per_request: f64,
}

/// An endpoint with a weight.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Base URL.
    pub url: String,
    /// Load-balancing weight.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// `endpoints: [str | Endpoint]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Endpoint {
    /// Just a URL.
    Url(String),
    /// A URL and weight.
    Full(EndpointSpec),
}

/// Where a LoRA adapter goes in the upstream body.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdapterField {
    /// The adapter name replaces `model` (vLLM, OpenAI-compatible servers).
    #[default]
    Model,
    /// `model` stays upstream_model and `adapter_id` is added (LoRAX).
    AdapterId,
}

/// `models.<name>`: a logical model, one upstream pool. Keys the core does not use are ignored (see `Server`).
#[derive(Debug, Clone, Deserialize)]
pub struct Model {
    /// Upstream endpoints.
    pub endpoints: Vec<Endpoint>,
    /// The `model` value the upstream expects; None keeps the client's.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Extra names a request may use for this pool.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Upstream key (Python layers only).
    #[serde(default)]
    pub api_key: Option<String>,
    /// Env var holding the upstream key (Python layers only).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Where an adapter goes in the body.
    #[serde(default)]
    pub adapter_field: AdapterField,
    /// Adapters served by this pool.
    #[serde(default)]
    pub adapters: Vec<String>,
    /// Prices.
    #[serde(default)]
    pub price: Price,
    /// Fallback models, in order.
    #[serde(default)]
    pub fallback: Vec<String>,
    /// Per-pool timeouts.
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// Ask the upstream for usage on streams (`stream_options.include_usage`).
    #[serde(default = "yes")]
    pub stream_usage: bool,
}

const fn yes() -> bool {
    true
}

/// `tenants.<name>`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tenant {
    /// Hex SHA-256 digests of the tenant's keys.
    pub keys_sha256: Vec<String>,
    /// Env vars with clear keys (resolved by Python into `keys_sha256`).
    pub keys_env: Vec<String>,
    /// File of clear keys (resolved by Python into `keys_sha256`).
    pub keys_file: Option<String>,
    /// The model the adapter sits on.
    pub base: Option<String>,
    /// The tenant's adapter.
    pub adapter: Option<String>,
    /// Allowed models; None means all.
    pub allowed_models: Option<Vec<String>>,
    /// Request, token and spend limits (Python layers only).
    pub limits: serde::de::IgnoredAny,
}

/// An integer range; every bound set must hold.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Range {
    /// Greater than.
    pub gt: Option<i64>,
    /// Greater than or equal.
    pub gte: Option<i64>,
    /// Less than.
    pub lt: Option<i64>,
    /// Less than or equal.
    pub lte: Option<i64>,
}

/// `path: {exact | prefix}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathMatch {
    /// Whole path.
    pub exact: Option<String>,
    /// Path prefix.
    pub prefix: Option<String>,
}

/// `path: str | PathMatch`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PathSpec {
    /// Exact.
    Exact(String),
    /// Exact or prefix.
    Match(PathMatch),
}

/// A header condition.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderMatch {
    /// Must be present (true) or absent (false).
    pub present: Option<bool>,
    /// Value equals.
    pub equals: Option<String>,
    /// Value is one of.
    pub one_of: Option<Vec<String>>,
    /// Value matches (unanchored search).
    pub regex: Option<String>,
}

/// `headers: {name: str | HeaderMatch}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum HeaderSpec {
    /// Equals.
    Equals(String),
    /// Any condition.
    Match(HeaderMatch),
}

/// Conditions on a request (AND of every field set).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Match {
    /// Path.
    pub path: Option<PathSpec>,
    /// HTTP method(s).
    pub method: Option<OneOrMany>,
    /// Header conditions by name.
    pub headers: Option<BTreeMap<String, HeaderSpec>>,
    /// Tenant name(s).
    pub tenant: Option<OneOrMany>,
    /// Globs on the request's `model`.
    pub model: Option<OneOrMany>,
    /// Estimated input tokens.
    pub input_tokens: Option<Range>,
    /// The request's `max_tokens` / `max_completion_tokens`.
    pub max_tokens: Option<Range>,
    /// The request's `stream`.
    pub stream: Option<bool>,
    /// `metadata.<key>` equals.
    pub metadata: Option<BTreeMap<String, String>>,
    /// All of.
    pub all: Option<Vec<Match>>,
    /// Any of.
    pub any: Option<Vec<Match>>,
    /// Not.
    #[serde(rename = "not")]
    pub not_: Option<Box<Match>>,
}

/// `to: {simple, complex}` of a classify route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyTargets {
    /// Model for score < threshold.
    pub simple: String,
    /// Model for score >= threshold.
    pub complex: String,
}

/// `to: str | ClassifyTargets`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum To {
    /// A model.
    Model(String),
    /// Classify targets.
    Classify(ClassifyTargets),
}

/// The classifiers a route may ask for.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Classify {
    /// `classify.rs`'s complexity score.
    Complexity,
}

/// `routes[i]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Route name.
    pub name: String,
    /// Conditions.
    #[serde(default, rename = "match")]
    pub match_: Match,
    /// Target model or classify targets.
    #[serde(default)]
    pub to: Option<To>,
    /// Target split.
    #[serde(default)]
    pub split: Option<String>,
    /// Target: the request's own model.
    #[serde(default)]
    pub requested: bool,
    /// Classifier.
    #[serde(default)]
    pub classify: Option<Classify>,
    /// Classify threshold (Python resolves `target_share` into it).
    #[serde(default = "half")]
    pub threshold: f64,
    /// Classifier model key: the model file's resolved path, handed to `compile` with its bytes;
    /// None keeps the built-in weights.
    #[serde(default)]
    pub classifier: Option<String>,
    /// Share of requests meant for `to.complex` (calibrated into `threshold` by Python).
    #[serde(default)]
    pub target_share: Option<f64>,
    /// Path sent upstream.
    #[serde(default)]
    pub upstream_path: Option<String>,
    /// The semantic classifier's settings: read by Python (`fastroute.semantic`), ignored here.
    #[serde(default)]
    pub semantic: Option<serde::de::IgnoredAny>,
}

fn half() -> f64 {
    0.5
}

/// `splits.<name>.variants[i]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Variant name.
    pub name: String,
    /// Model.
    pub to: String,
    /// Weight (> 0).
    pub weight: f64,
    /// Adapter override.
    #[serde(default)]
    pub adapter: Option<String>,
}

/// `splits.<name>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    /// Sticky key source(s).
    #[serde(default = "tenant_sticky")]
    pub sticky: OneOrMany,
    /// Variants.
    #[serde(default)]
    pub variants: Vec<Variant>,
}

fn tenant_sticky() -> OneOrMany {
    OneOrMany::One("tenant".into())
}

/// The whole config. Top-level sections the core does not use are ignored (see `Server`).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Logical models.
    pub models: BTreeMap<String, Model>,
    /// Server settings.
    #[serde(default)]
    pub server: Server,
    /// Tenants.
    #[serde(default)]
    pub tenants: BTreeMap<String, Tenant>,
    /// Routes, first match wins.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Default model.
    #[serde(default)]
    pub default: Option<String>,
    /// Splits.
    #[serde(default)]
    pub splits: BTreeMap<String, Split>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_msgspec_style_nulls_and_unions() {
        let cfg = parse(
            br#"{"models":{"a":{"endpoints":["http://x",{"url":"http://y","weight":2.0}],"upstream_model":null,
            "aliases":[],"api_key":null,"api_key_env":null,"adapter_field":"adapter_id","adapters":[],
            "price":{"input_per_1k":0.0,"output_per_1k":0.0,"per_request":0.0},"fallback":[],"timeouts":null}},
            "server":{"listen":"x","workers":1,"max_body_bytes":"4MiB","key_header":"authorization",
            "allow_anonymous":false,"token_estimator":"fast","encoding":"cl100k_base",
            "timeouts":{"connect":1,"first_byte":2,"idle":3,"total":4}},
            "tenants":{},"routes":[{"name":"r","match":{"path":{"exact":null,"prefix":"/v1"},"method":["GET"],
            "headers":{"x":"y","z":{"present":true,"equals":null,"one_of":null,"regex":null}},"tenant":null,
            "model":"gpt-*","input_tokens":null,"max_tokens":null,"stream":null,"metadata":null,"all":null,
            "any":null,"not":{"stream":true}},"to":{"simple":"a","complex":"a"},"split":null,"requested":false,
            "classify":"complexity","threshold":0.5,"upstream_path":null}],"default":null,"splits":{}}"#,
        )
        .unwrap();
        assert_eq!(cfg.server.encoding, Encoding::Cl100k);
        assert!(matches!(cfg.routes[0].to, Some(To::Classify(_))));
        assert!(cfg.routes[0].match_.not_.is_some());
    }

    #[test]
    fn rejects_unknown_keys_where_the_core_reads_them() {
        // top level, server and models: Python validates them; sections the core ignores pass through
        assert!(parse(br#"{"models":{},"admin":{"listen":"127.0.0.1:9090"}}"#).is_ok());
        assert!(parse(br#"{"models":{},"routes":[{"name":"r","bogus":1}]}"#).is_err());
        assert!(parse(br#"{"models":{},"routes":[{"name":"r","match":{"tokens":1}}]}"#).is_err());
    }
}
