//! The binding layer of fastroute's decision core: pyclasses, argument extraction and error
//! mapping only. It turns Python arguments into a borrowed `request::Request`, hands Python
//! strings created at compile time back by refcount, and maps core errors to
//! `fastroute.errors`. No routing logic lives here, and no other file imports pyo3.

use std::io::Write as _;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

pub mod classify;
pub mod error;
pub mod http;
pub mod request;
pub mod rewrite;
pub mod router;
pub mod rules;
pub mod spec;
pub mod split;
pub mod tokens;

use crate::classify::Scorer;
use crate::error::{CompileError, DecideError};
use crate::request::Request;
use crate::router::{CompiledRouter, MAX_HEADERS};
use crate::tokens::Estimator;

pyo3::import_exception!(fastroute.errors, ConfigError);
pyo3::import_exception!(fastroute.errors, RequestError);

#[cold]
fn config_error(py: Python<'_>, e: CompileError) -> PyErr {
    let kwargs = PyDict::new(py);
    let path = (!e.path.is_empty()).then_some(e.path);
    if let Err(err) = kwargs.set_item("path", path) {
        return err;
    }
    match py.get_type::<ConfigError>().call((e.msg,), Some(&kwargs)) {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

#[cold]
fn request_error(py: Python<'_>, e: DecideError) -> PyErr {
    let kwargs = PyDict::new(py);
    if let Err(err) = kwargs.set_item("param", e.param) {
        return err;
    }
    match py.get_type::<RequestError>().call((&*e.msg,), Some(&kwargs)) {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

/// Python strings for every name a decision can hand out, created once per compile.
struct Names {
    headers: Vec<Py<PyString>>,
    routes: Vec<Py<PyString>>,
    route_paths: Vec<Option<Py<PyString>>>,
    models: Vec<Py<PyString>>,
    upstream_models: Vec<Option<Py<PyString>>>,
    adapters: Vec<Py<PyString>>,
    variants: Vec<Py<PyString>>,
    tenants: Vec<Py<PyString>>,
    get: Py<PyString>,
}

fn strs<'a>(py: Python<'_>, items: impl Iterator<Item = &'a str>) -> Vec<Py<PyString>> {
    items.map(|s| PyString::intern(py, s).unbind()).collect()
}

fn pick(names: &[Py<PyString>], py: Python<'_>, i: Option<u32>) -> Option<Py<PyString>> {
    i.and_then(|i| names.get(i as usize)).map(|s| s.clone_ref(py))
}

/// Compiled routes, tenants and splits. Immutable: compile a new one to change anything.
#[pyclass(frozen, module = "fastroute._core")]
struct Router {
    core: CompiledRouter,
    names: Names,
}

/// A router reading at most this many headers fetches them into arrays of this length (the common case: the key
/// header and a few rule headers), so a decide does not fill and drop `MAX_HEADERS`-long arrays.
const FEW_HEADERS: usize = 4;

impl Router {
    /// Call `headers.get(name)` for each header the router reads, and nothing else; `f` gets their values by slot.
    // NOTE: the values live in arrays on this frame, sized for the router (FEW_HEADERS or MAX_HEADERS), and are
    // lent to `f`: returning the arrays copied 256 + 512 bytes and filled and dropped 32 slots (~0.5k instructions
    // per decide, callgrind).
    #[inline]
    fn with_headers<R>(&self, headers: &Bound<'_, PyAny>, f: impl FnOnce(&[Option<&str>]) -> R) -> PyResult<R> {
        if self.names.headers.len() <= FEW_HEADERS {
            self.with_headers_in::<FEW_HEADERS, R>(headers, f)
        } else {
            self.with_headers_in::<MAX_HEADERS, R>(headers, f)
        }
    }

    #[inline]
    fn with_headers_in<const N: usize, R>(
        &self,
        headers: &Bound<'_, PyAny>,
        f: impl FnOnce(&[Option<&str>]) -> R,
    ) -> PyResult<R> {
        let py = headers.py();
        let names = &self.names.headers[..self.names.headers.len().min(N)];
        let mut objs: [Option<Bound<'_, PyString>>; N] = [const { None }; N];
        let dict = headers.cast_exact::<PyDict>().ok();
        for (slot, name) in objs.iter_mut().zip(names) {
            let name = name.bind(py);
            let v = match dict {
                Some(d) => d.get_item(name)?,
                None => Some(headers.call_method1(self.names.get.bind(py), (name,))?),
            };
            *slot = v.and_then(|v| v.cast_into::<PyString>().ok());
        }
        let mut values: [Option<&str>; N] = [None; N];
        for (v, o) in values.iter_mut().zip(&objs) {
            if let Some(s) = o {
                *v = Some(s.to_str()?);
            }
        }
        Ok(f(&values[..names.len()]))
    }

    fn run<'a>(
        &'a self,
        method: &'a str,
        path: &'a str,
        values: &'a [Option<&'a str>],
        body: &'a [u8],
        trace: Option<&mut Vec<String>>,
        scored: Option<(f32, f32)>,
    ) -> Result<router::Decision<'a>, DecideError> {
        let req = Request {
            method,
            path,
            headers: values,
            body,
        };
        self.core.decide_scored(&req, trace, scored)
    }

    /// `decide` and `decide_scored`: one decision, and the `Decision` object built from it.
    fn decide_with(
        slf: &Bound<'_, Self>,
        method: &Bound<'_, PyString>,
        path: &Bound<'_, PyString>,
        headers: &Bound<'_, PyAny>,
        body: &Bound<'_, PyBytes>,
        scored: Option<(f32, f32)>,
    ) -> PyResult<Decision> {
        let this = slf.get();
        let (method_s, path_s) = (method.to_str()?, path.to_str()?);
        this.with_headers(headers, |values| {
            Self::build(
                slf,
                method,
                path,
                headers,
                body,
                scored,
                this.run(method_s, path_s, values, body.as_bytes(), None, scored),
            )
        })?
    }

    /// The `Decision` object of one core decision.
    fn build(
        slf: &Bound<'_, Self>,
        method: &Bound<'_, PyString>,
        path: &Bound<'_, PyString>,
        headers: &Bound<'_, PyAny>,
        body: &Bound<'_, PyBytes>,
        scored: Option<(f32, f32)>,
        decided: Result<router::Decision<'_>, DecideError>,
    ) -> PyResult<Decision> {
        let py = slf.py();
        let raw = body.as_bytes();
        let d = decided.map_err(|e| request_error(py, e))?;
        // NOTE: names are kept as indices and the requested model as its place in the body; the getters make the
        // Python strings from the router's (one reference taken per read), so a decision builds and drops no
        // string it is not asked for.
        let requested_model = d.requested_model.map(|m| ModelText {
            start: m.raw.as_ptr().addr().wrapping_sub(raw.as_ptr().addr()),
            len: m.raw.len(),
            escaped: m.escaped,
        });
        let new_body = match &d.rewrite {
            Some(plan) => Some(rewritten_body(py, plan, raw)?.unbind()),
            None => None,
        };
        Ok(Decision {
            status: d.status,
            error: d.error.as_deref().map(|e| PyString::new(py, e).unbind()),
            route: d.route,
            pool: d.pool,
            adapter: d.adapter,
            variant: d.variant,
            tenant: d.tenant,
            body: new_body,
            requested_model,
            stream: d.stream,
            usage_injected: d.usage_injected,
            max_tokens: d.max_tokens,
            est_input_tokens: d.est_input_tokens,
            score: d.score.map(f64::from),
            threshold: d.threshold.map(f64::from),
            source: Source {
                router: slf.clone().unbind(),
                method: method.clone().unbind(),
                path: path.clone().unbind(),
                headers: headers.clone().unbind(),
                body: body.clone().unbind(),
                scored,
            },
            reasons: PyOnceLock::new(),
        })
    }
}

/// The rewritten body as a new `bytes`, written once, straight into the object's buffer.
// NOTE: `PyBytes::new_with` zeroes the buffer before the plan overwrites every byte, and writing into a scratch
// buffer then `PyBytes::new` copies the body twice; here each byte is written once (one 2 KB copy less per decide:
// memcpy 1.02k -> 0.79k instructions, callgrind).
#[allow(unsafe_code)]
fn rewritten_body<'py>(py: Python<'py>, plan: &rewrite::Plan<'_>, raw: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let n = plan.len();
    let size = pyo3::ffi::Py_ssize_t::try_from(n)
        .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("the rewritten body is too large"))?;
    // SAFETY: with a null source, `PyBytes_FromStringAndSize` returns a new bytes object of `size` bytes whose buffer
    // is left for the caller to fill (or null with an exception set, which `from_owned_ptr_or_err` returns).
    let obj =
        unsafe { Bound::from_owned_ptr_or_err(py, pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), size))? };
    // SAFETY: `obj` is a bytes object; its buffer holds `n` bytes (plus a terminating NUL) and nothing else sees it
    // until we return.
    let buf: *mut u8 = unsafe { pyo3::ffi::PyBytes_AsString(obj.as_ptr()) }.cast();
    if buf.is_null() {
        return Err(PyErr::fetch(py));
    }
    let mut at = 0usize;
    plan.write_with(raw, |piece| {
        let end = at + piece.len();
        if end <= n {
            // SAFETY: `[at, end)` lies within the `n`-byte buffer, which does not overlap `piece` (a new object).
            unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), buf.add(at), piece.len()) };
        }
        at = end;
    });
    if at != n {
        // Never: `plan.len()` is the sum of the pieces. Leave no byte unwritten, and say so.
        // SAFETY: `[at.min(n), n)` lies within the buffer.
        unsafe { std::ptr::write_bytes(buf.add(at.min(n)), 0, n - at.min(n)) };
        return Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
            "internal error: the body rewrite wrote {at} bytes for a plan of {n}"
        )));
    }
    Ok(obj.cast_into::<PyBytes>()?)
}

#[pymethods]
impl Router {
    /// Compile a validated config, given as the JSON bytes of `fastroute.config.Config`, with the
    /// classifier model files its classify routes name (`{routes[i].classifier: model JSON bytes}`).
    #[staticmethod]
    #[pyo3(signature = (spec, classifiers = None))]
    fn compile(py: Python<'_>, spec: &[u8], classifiers: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut held: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(c) = classifiers {
            for (k, v) in c.iter() {
                held.push((k.extract::<String>()?, v.extract::<Vec<u8>>()?));
            }
        }
        let pairs: Vec<(&str, &[u8])> = held.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        let core = CompiledRouter::compile_with(spec, &pairs).map_err(|e| config_error(py, e))?;
        let models = core.models();
        let names = Names {
            headers: strs(py, core.header_names().iter().map(|s| &**s)),
            routes: strs(py, core.route_names().iter().map(|s| &**s)),
            route_paths: core
                .route_upstream_paths()
                .iter()
                .map(|p| p.as_deref().map(|s| PyString::intern(py, s).unbind()))
                .collect(),
            models: strs(py, models.iter().map(|m| &*m.name)),
            upstream_models: models
                .iter()
                .map(|m| m.upstream_model.as_deref().map(|s| PyString::intern(py, s).unbind()))
                .collect(),
            adapters: strs(py, core.adapters().iter().map(|s| &**s)),
            variants: strs(py, core.variants().iter().map(|v| &*v.name)),
            tenants: strs(py, core.tenant_names().iter().map(|s| &**s)),
            get: PyString::intern(py, "get").unbind(),
        };
        Ok(Self { core, names })
    }

    /// Decide where one request goes. Reads only the headers the rules name.
    fn decide(
        slf: &Bound<'_, Self>,
        method: &Bound<'_, PyString>,
        path: &Bound<'_, PyString>,
        headers: &Bound<'_, PyAny>,
        body: &Bound<'_, PyBytes>,
    ) -> PyResult<Decision> {
        Self::decide_with(slf, method, path, headers, body, None)
    }

    /// `decide`, with a classify route's score and threshold computed by the caller (the semantic
    /// classifier) instead of the core. A method of its own so that `decide` keeps the plain four-argument
    /// call: an optional argument there cost ~0.7k instructions per call (callgrind, 2 KB / 50 routes: 22.9k -> 22.2k).
    fn decide_scored(
        slf: &Bound<'_, Self>,
        method: &Bound<'_, PyString>,
        path: &Bound<'_, PyString>,
        headers: &Bound<'_, PyAny>,
        body: &Bound<'_, PyBytes>,
        score: f32,
        threshold: f32,
    ) -> PyResult<Decision> {
        Self::decide_with(slf, method, path, headers, body, Some((score, threshold)))
    }

    /// Number of routes.
    #[getter]
    fn route_count(&self) -> usize {
        self.core.route_names().len()
    }

    /// Number of tenant key digests.
    #[getter]
    fn tenant_key_count(&self) -> usize {
        self.core.tenant_key_count()
    }

    /// The classifier model keys (resolved model file paths) this router loaded.
    #[getter]
    fn classifier_keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.core.classifier_keys().iter().map(|k| &**k))
    }

    /// The lowercase header names decide() may read (the key header first).
    #[getter]
    fn header_names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.names.headers.iter().map(|h| h.bind(py)))
    }
}

/// What a decision was made from, kept so the trace can be rendered on first access.
struct Source {
    router: Py<Router>,
    method: Py<PyString>,
    path: Py<PyString>,
    headers: Py<PyAny>,
    body: Py<PyBytes>,
    scored: Option<(f32, f32)>,
}

/// Where the request's `model` text sits in the request body (between the quotes).
#[derive(Clone, Copy)]
struct ModelText {
    start: usize,
    len: usize,
    escaped: bool,
}

/// The outcome of one `decide` call. Frozen.
#[pyclass(frozen, freelist = 64, module = "fastroute._core")]
struct Decision {
    #[pyo3(get)]
    status: u16,
    #[pyo3(get)]
    error: Option<Py<PyString>>,
    route: Option<u32>,
    pool: Option<u32>,
    adapter: Option<u32>,
    variant: Option<u32>,
    tenant: Option<u32>,
    #[pyo3(get)]
    body: Option<Py<PyBytes>>,
    requested_model: Option<ModelText>,
    #[pyo3(get)]
    stream: bool,
    #[pyo3(get)]
    usage_injected: bool,
    #[pyo3(get)]
    max_tokens: Option<i64>,
    #[pyo3(get)]
    est_input_tokens: u32,
    #[pyo3(get)]
    score: Option<f64>,
    #[pyo3(get)]
    threshold: Option<f64>,
    source: Source,
    reasons: PyOnceLock<Py<PyTuple>>,
}

impl Decision {
    fn names(&self) -> &Names {
        &self.source.router.get().names
    }
}

#[pymethods]
impl Decision {
    /// The matched route's name.
    #[getter]
    fn route(&self, py: Python<'_>) -> Option<Py<PyString>> {
        pick(&self.names().routes, py, self.route)
    }

    /// The chosen pool (logical model).
    #[getter]
    fn pool(&self, py: Python<'_>) -> Option<Py<PyString>> {
        pick(&self.names().models, py, self.pool)
    }

    /// The applied adapter.
    #[getter]
    fn adapter(&self, py: Python<'_>) -> Option<Py<PyString>> {
        pick(&self.names().adapters, py, self.adapter)
    }

    /// The chosen split variant.
    #[getter]
    fn variant(&self, py: Python<'_>) -> Option<Py<PyString>> {
        pick(&self.names().variants, py, self.variant)
    }

    /// The resolved tenant.
    #[getter]
    fn tenant(&self, py: Python<'_>) -> Option<Py<PyString>> {
        pick(&self.names().tenants, py, self.tenant)
    }

    /// The matched route's `upstream_path`.
    #[getter]
    fn upstream_path(&self, py: Python<'_>) -> Option<Py<PyString>> {
        let r = self.route?;
        self.names()
            .route_paths
            .get(r as usize)?
            .as_ref()
            .map(|p| p.clone_ref(py))
    }

    /// The request's `model`, decoded (made from the body on each read).
    #[getter]
    fn requested_model<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyString>>> {
        let Some(m) = self.requested_model else {
            return Ok(None);
        };
        let body = self.source.body.bind(py).as_bytes();
        let raw = body
            .get(m.start..m.start + m.len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("internal error: the model text moved"))?;
        let text = request::JStr {
            raw,
            escaped: m.escaped,
        }
        .decode();
        Ok(Some(PyString::new(py, &text)))
    }

    /// The `model` the upstream sees: the pool's `upstream_model`, else the request's own.
    #[getter]
    fn upstream_model<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyString>>> {
        let Some(p) = self.pool else {
            return Ok(None);
        };
        match self.names().upstream_models.get(p as usize) {
            Some(Some(u)) => Ok(Some(u.bind(py).clone())),
            _ => self.requested_model(py),
        }
    }

    /// The trace `explain` prints. Rendered on first access by deciding again, with tracing on,
    /// from the same inputs (`decide` is pure, so the outcome is the same).
    #[getter]
    fn reasons<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let t = self.reasons.get_or_try_init(py, || -> PyResult<Py<PyTuple>> {
            let s = &self.source;
            let router = s.router.get();
            let headers = s.headers.bind(py);
            let mut lines = Vec::new();
            let method = s.method.bind(py).to_str()?;
            let path = s.path.bind(py).to_str()?;
            let body = s.body.bind(py).as_bytes();
            router.with_headers(headers, |values| {
                if let Err(e) = router.run(method, path, values, body, Some(&mut lines), s.scored) {
                    lines.push(format!("request error: {e}"));
                }
            })?;
            Ok(PyTuple::new(py, lines)?.unbind())
        })?;
        Ok(t.bind(py).clone())
    }

    /// Every field as a plain dict (what `explain` prints), body as text or None.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("status", self.status)?;
        d.set_item("error", &self.error)?;
        d.set_item("route", self.route(py))?;
        d.set_item("pool", self.pool(py))?;
        d.set_item("upstream_model", self.upstream_model(py)?)?;
        d.set_item("adapter", self.adapter(py))?;
        d.set_item("variant", self.variant(py))?;
        d.set_item("tenant", self.tenant(py))?;
        d.set_item("upstream_path", self.upstream_path(py))?;
        let body = self
            .body
            .as_ref()
            .map(|b| String::from_utf8_lossy(b.bind(py).as_bytes()).into_owned());
        d.set_item("body", body)?;
        d.set_item("requested_model", self.requested_model(py)?)?;
        d.set_item("stream", self.stream)?;
        d.set_item("usage_injected", self.usage_injected)?;
        d.set_item("max_tokens", self.max_tokens)?;
        d.set_item("est_input_tokens", self.est_input_tokens)?;
        d.set_item("score", self.score)?;
        d.set_item("threshold", self.threshold)?;
        d.set_item("reasons", PyList::new(py, self.reasons(py)?.iter())?)?;
        Ok(d)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let s =
            |o: Option<Py<PyString>>| o.map_or_else(|| "None".to_owned(), |v| format!("{:?}", v.bind(py).to_string()));
        Ok(format!(
            "Decision(status={}, route={}, pool={}, upstream_model={}, adapter={}, variant={}, tenant={}, est_input_tokens={})",
            self.status,
            s(self.route(py)),
            s(self.pool(py)),
            s(self.upstream_model(py)?.map(Bound::unbind)),
            s(self.adapter(py)),
            s(self.variant(py)),
            s(self.tenant(py)),
            self.est_input_tokens
        ))
    }
}

/// A trained complexity classifier, loaded from model file JSON: scores bodies exactly as a router's
/// classify route does (fast token estimate). For `fastroute eval`.
#[pyclass(frozen, module = "fastroute._core")]
struct Classifier {
    scorer: Scorer,
}

#[pymethods]
impl Classifier {
    /// Check and load a model file's JSON; ValueError says what is wrong.
    #[staticmethod]
    fn load(model: &[u8]) -> PyResult<Self> {
        let scorer = Scorer::from_json(model).map_err(pyo3::exceptions::PyValueError::new_err)?;
        Ok(Self { scorer })
    }

    /// log2 of the n-gram table length.
    #[getter]
    fn hash_bits(&self) -> u32 {
        self.scorer.hash_bits()
    }

    /// The score in [0, 1] of each request body (JSON bytes), in order.
    fn score_many(&self, py: Python<'_>, bodies: Vec<Vec<u8>>) -> PyResult<Vec<f32>> {
        bodies
            .iter()
            .map(|b| router::score_body(b, Some(&self.scorer), Estimator::Fast).map_err(|e| request_error(py, e)))
            .collect()
    }
}

/// The built-in (untrained) complexity score of one request body.
#[pyfunction]
fn builtin_score(py: Python<'_>, body: &[u8]) -> PyResult<f32> {
    router::score_body(body, None, Estimator::Fast).map_err(|e| request_error(py, e))
}

/// The dense features (in `classifier_feature_names()` order) and the n-gram buckets hit, of each request
/// body: what a trained classifier weighs. For `fastroute train`.
#[pyfunction]
fn classifier_features(py: Python<'_>, bodies: Vec<Vec<u8>>, hash_bits: u32) -> PyResult<Vec<(Vec<f32>, Vec<u32>)>> {
    if !classify::HASH_BITS.contains(&hash_bits) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "hash_bits must be within {}..={}",
            classify::HASH_BITS.start(),
            classify::HASH_BITS.end()
        )));
    }
    bodies
        .iter()
        .map(|b| {
            router::body_features(b, hash_bits, Estimator::Fast)
                .map(|(x, grams)| (x.to_vec(), grams))
                .map_err(|e| request_error(py, e))
        })
        .collect()
}

/// The names of the dense classifier features, in order; and the model format and version this build reads.
#[pyfunction]
fn classifier_feature_names() -> (Vec<&'static str>, &'static str, u32) {
    (
        classify::DENSE_FEATURES.to_vec(),
        classify::MODEL_FORMAT,
        classify::MODEL_VERSION,
    )
}

/// Does nothing: the baseline for timing the Python→Rust crossing.
#[pyfunction]
fn noop() {}

/// Tokens in `text`: the fast estimate, or the exact BPE count when `exact`.
#[pyfunction]
#[pyo3(signature = (text, exact = false, encoding = "o200k_base"))]
fn estimate_tokens(text: &Bound<'_, PyAny>, exact: bool, encoding: &str) -> PyResult<u32> {
    let estimator = match (exact, encoding) {
        (false, _) => Estimator::Fast,
        (true, "o200k_base") => Estimator::ExactO200k,
        (true, "cl100k_base") => Estimator::ExactCl100k,
        (true, other) => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "unknown encoding `{other}`: use o200k_base or cl100k_base"
            )));
        }
    };
    if let Ok(s) = text.cast::<PyString>() {
        Ok(estimator.count(s.to_str()?.as_bytes()))
    } else if let Ok(b) = text.cast::<PyBytes>() {
        Ok(estimator.count(b.as_bytes()))
    } else {
        Err(pyo3::exceptions::PyTypeError::new_err("text must be str or bytes"))
    }
}

/// The bucket in [0, 1) of `key` for the experiment (or split) `salt`: fastroute-split-v1, the pinned
/// hash splits use, so every process and replica puts the same key in the same bucket.
#[pyfunction]
fn bucket(salt: &str, key: &str) -> f64 {
    split::unit_bucket(salt.as_bytes(), key.as_bytes())
}

fn scan_plain(body: &[u8]) -> Result<request::Body<'_>, DecideError> {
    request::scan(body, &request::ScanOptions::tokens(Estimator::Fast))
}

/// `body` with its `model` set to `model` and/or its `adapter_id` to `adapter_id` (None: unchanged).
/// Every other byte is kept; the same bytes object comes back when nothing changes.
#[pyfunction]
#[pyo3(signature = (body, model = None, adapter_id = None))]
fn rewrite_body<'py>(
    body: &Bound<'py, PyBytes>,
    model: Option<&str>,
    adapter_id: Option<&str>,
) -> PyResult<Bound<'py, PyBytes>> {
    let py = body.py();
    let raw = body.as_bytes();
    let scanned = scan_plain(raw).map_err(|e| request_error(py, e))?;
    match rewrite::plan(raw, &scanned, model, adapter_id, false) {
        Some(plan) => rewritten_body(py, &plan, raw),
        None => Ok(body.clone()),
    }
}

/// The body's `user` field as written between the quotes (escapes kept), or None.
#[pyfunction]
fn body_user(py: Python<'_>, body: &[u8]) -> PyResult<Option<String>> {
    let scanned = scan_plain(body).map_err(|e| request_error(py, e))?;
    Ok(scanned.user.map(|u| u.raw.to_owned()))
}

// ------------------------------------------------------------------------------------------------
// HTTP/1.x heads and chunked bodies (crate::http) for the native server and the upstream client:
// one call per head instead of a Python callback per header.
// ------------------------------------------------------------------------------------------------

pyo3::create_exception!(
    fastroute._core,
    HttpError,
    pyo3::exceptions::PyValueError,
    "Malformed HTTP: not HTTP/1.x, or framed ambiguously (answer 400)."
);
pyo3::create_exception!(
    fastroute._core,
    HeadTooLarge,
    HttpError,
    "A head longer than allowed or with too many header lines (answer 431)."
);

#[cold]
fn http_error(e: http::HttpError) -> PyErr {
    match e {
        http::HttpError::TooLarge => HeadTooLarge::new_err(e.message()),
        http::HttpError::Malformed(m) => HttpError::new_err(m),
    }
}

/// The most header lines a head may have before the limit the caller gives cuts in.
const HTTP_SLOTS: usize = 256;

/// Strings most heads carry, made once: methods, versions, then lower-case header names (a dict key
/// that is already a Python string, hash cached, costs no allocation).
const HTTP_WORDS: [&str; 31] = [
    "GET",
    "POST",
    "HEAD",
    "PUT",
    "DELETE",
    "OPTIONS",
    "PATCH",
    "1.1",
    "1.0", // methods, versions
    "host",
    "content-type",
    "content-length",
    "authorization",
    "accept",
    "user-agent",
    "connection",
    "transfer-encoding",
    "expect",
    "x-request-id",
    "content-encoding",
    "accept-encoding",
    "date",
    "server",
    "cache-control",
    "traceparent",
    "x-api-key",
    "keep-alive",
    "accept-language",
    "origin",
    "referer",
    "retry-after",
];
const HTTP_N_METHODS: usize = 7;
static HTTP_STRS: PyOnceLock<Vec<Py<PyString>>> = PyOnceLock::new();

fn http_word<'py>(py: Python<'py>, i: usize) -> Option<Bound<'py, PyString>> {
    let words = HTTP_STRS.get_or_init(py, || strs(py, HTTP_WORDS.iter().copied()));
    words.get(i).map(|s| s.bind(py).clone())
}

/// Bytes as a latin-1 string (what HTTP heads are, byte for byte).
// NOTE: CPython's latin-1 decoder (a max-char scan and one copy) instead of a UTF-8 check here and CPython's UTF-8
// decoder after it: 396 -> ~150 instructions a string, ~10 strings a proxied request (callgrind).
#[allow(unsafe_code)]
fn latin1<'py>(py: Python<'py>, b: &[u8]) -> Bound<'py, PyString> {
    let made = pyo3::ffi::Py_ssize_t::try_from(b.len()).ok().and_then(|n| {
        // SAFETY: `b` is valid for `n` bytes; latin-1 decodes every byte sequence, so only a failed allocation
        // returns null (with an exception set, dropped here: the fallback below allocates again and reports it).
        let obj = unsafe { pyo3::ffi::PyUnicode_DecodeLatin1(b.as_ptr().cast(), n, std::ptr::null()) };
        // SAFETY: `obj` is a new reference to a str, or null.
        unsafe { Bound::from_owned_ptr_or_opt(py, obj) }
    });
    match made {
        Some(s) => s.cast_into::<PyString>().unwrap_or_else(|_| PyString::new(py, "")),
        None => {
            let _ = PyErr::take(py);
            PyString::new(py, &b.iter().map(|&c| char::from(c)).collect::<String>())
        }
    }
}

fn header_name<'py>(py: Python<'py>, name: &str) -> Bound<'py, PyString> {
    let mut buf = [0u8; 32];
    let Some(low) = buf.get_mut(..name.len()) else {
        return PyString::new(py, &name.to_ascii_lowercase());
    };
    low.copy_from_slice(name.as_bytes());
    low.make_ascii_lowercase();
    if let Some(i) = HTTP_WORDS[HTTP_N_METHODS + 2..]
        .iter()
        .position(|w| w.as_bytes() == low)
    {
        if let Some(s) = http_word(py, HTTP_N_METHODS + 2 + i) {
            return s;
        }
    }
    latin1(py, low)
}

fn http_version(py: Python<'_>, minor: u8) -> Bound<'_, PyString> {
    let i = HTTP_N_METHODS + usize::from(minor == 0);
    http_word(py, i).unwrap_or_else(|| PyString::new(py, if minor == 0 { "1.0" } else { "1.1" }))
}

/// The request head at `buf[start:]`: None until it is complete, else
/// (end, method, path, query, version, headers, content_length or -1, chunked, keep_alive, upgrade);
/// headers: lower-case names, the first value of each.
#[pyfunction]
#[pyo3(signature = (buf, start = 0, max_len = 65536, max_headers = HTTP_SLOTS))]
fn parse_request_head<'py>(
    py: Python<'py>,
    buf: &[u8],
    start: usize,
    max_len: usize,
    max_headers: usize,
) -> PyResult<Option<Bound<'py, PyTuple>>> {
    let mut slots = http::Slots::<HTTP_SLOTS>::new();
    let Some(h) = http::parse_request(buf, start, max_len, slots.take(max_headers)).map_err(http_error)? else {
        return Ok(None);
    };
    let method = match HTTP_WORDS[..HTTP_N_METHODS].iter().position(|m| *m == h.method) {
        Some(i) => http_word(py, i).unwrap_or_else(|| PyString::new(py, h.method)),
        None => PyString::new(py, h.method),
    };
    let (path, query) = match memchr::memchr(b'?', h.target) {
        Some(q) => (&h.target[..q], &h.target[q + 1..]),
        None => (h.target, &b""[..]),
    };
    let headers = PyDict::new(py);
    // in reverse, so that the first value of a repeated name is the one left (no lookup before each insert)
    for x in h.headers.iter().rev() {
        headers.set_item(header_name(py, x.name), latin1(py, x.value))?;
    }
    let f = h.framing;
    let cl = f.content_length.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    (
        start + h.len,
        method,
        latin1(py, path),
        latin1(py, query),
        http_version(py, h.minor),
        headers,
        cl,
        f.chunked,
        f.keep_alive,
        f.upgrade,
    )
        .into_pyobject(py)
        .map(Some)
}

/// A fixed set of header names, matched without regard to case; made once (e.g. the headers never relayed).
#[pyclass(frozen, module = "fastroute._core")]
struct HeaderNames {
    names: Vec<Vec<u8>>,
}

#[pymethods]
impl HeaderNames {
    #[new]
    fn new(names: Vec<String>) -> Self {
        Self {
            names: names.into_iter().map(|n| n.to_ascii_lowercase().into_bytes()).collect(),
        }
    }

    fn __contains__(&self, name: &str) -> bool {
        self.has(name.as_bytes())
    }

    fn __len__(&self) -> usize {
        self.names.len()
    }
}

impl HeaderNames {
    fn has(&self, name: &[u8]) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// The response head at `buf[start:]`: None until it is complete, else
/// (end, status, headers or None, content_length or -1, chunked, keep_alive, content_type, content_encoding);
/// headers (when the status is at least `headers_from`; 0: always, the default 1000: never): every header as
/// (lower-case name, value), in order, but those named in `drop`.
#[pyfunction]
#[pyo3(signature = (buf, start = 0, headers_from = 1000, max_len = 65536, max_headers = HTTP_SLOTS, drop = None))]
fn parse_response_head<'py>(
    py: Python<'py>,
    buf: &[u8],
    start: usize,
    headers_from: u16,
    max_len: usize,
    max_headers: usize,
    drop: Option<PyRef<'py, HeaderNames>>,
) -> PyResult<Option<Bound<'py, PyTuple>>> {
    let mut slots = http::Slots::<HTTP_SLOTS>::new();
    let Some(h) = http::parse_response(buf, start, max_len, slots.take(max_headers)).map_err(http_error)? else {
        return Ok(None);
    };
    let headers = if h.status >= headers_from {
        let list = PyList::empty(py);
        for x in h.headers {
            if drop.as_ref().is_some_and(|d| d.has(x.name.as_bytes())) {
                continue;
            }
            list.append((header_name(py, x.name), latin1(py, x.value)))?;
        }
        Some(list)
    } else {
        None
    };
    let f = h.framing;
    let value = |i: Option<usize>| i.and_then(|i| h.headers.get(i)).map(|x| latin1(py, x.value));
    let cl = f.content_length.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    (
        start + h.len,
        h.status,
        headers,
        cl,
        f.chunked,
        f.keep_alive,
        value(f.content_type),
        value(f.content_encoding),
    )
        .into_pyobject(py)
        .map(Some)
}

/// The fast lane's way back, in one step: a whole `200` answer at `buf[start:]`, framed by its content-length
/// and ending exactly at the end of `buf`, made into the client's answer: our status line, the upstream's
/// content-type and content-encoding (all a success relays), `block` (headers rendered beforehand), the
/// overhead header, content-length, the body. Returns (answer, where the body starts in `buf`, keep-alive),
/// or None for anything else (another status, chunked, an incomplete or a longer read, a malformed head):
/// the caller then parses the same bytes the general way, which also reports what is wrong.
#[pyfunction]
#[pyo3(signature = (buf, start, block, overhead_us, max_len = 65536, max_headers = HTTP_SLOTS))]
fn relay_answer<'py>(
    py: Python<'py>,
    buf: &[u8],
    start: usize,
    block: &[u8],
    overhead_us: u64,
    max_len: usize,
    max_headers: usize,
) -> Option<(Bound<'py, PyBytes>, usize, bool)> {
    let mut slots = http::Slots::<HTTP_SLOTS>::new();
    let h = http::parse_response(buf, start, max_len, slots.take(max_headers)).ok()??;
    let f = h.framing;
    let at = start + h.len;
    let n = usize::try_from(f.content_length?).ok()?;
    if h.status != 200 || f.chunked || f.other_coding || buf.len().checked_sub(at)? != n {
        return None;
    }
    let mut out = Vec::with_capacity(block.len() + 256 + n);
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    for (name, i) in [
        (&b"content-type: "[..], f.content_type),
        (b"content-encoding: ", f.content_encoding),
    ] {
        if let Some(x) = i.and_then(|i| h.headers.get(i)) {
            out.extend_from_slice(name);
            out.extend_from_slice(x.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(block);
    write!(
        out,
        "x-fastroute-overhead-us: {overhead_us}\r\ncontent-length: {n}\r\n\r\n"
    )
    .ok()?;
    out.extend_from_slice(buf.get(at..)?);
    Some((PyBytes::new(py, &out), at, f.keep_alive))
}

/// `name: value\r\n` for each (name, value) of `headers`; false if one has a character beyond latin-1 (then
/// what was written is incomplete).
fn write_headers(out: &mut Vec<u8>, headers: &Bound<'_, PyAny>, utf8: bool) -> PyResult<bool> {
    let mut ok = true;
    let mut put = |out: &mut Vec<u8>, s: &str| {
        if utf8 || s.is_ascii() {
            out.extend_from_slice(s.as_bytes());
        } else {
            for c in s.chars() {
                match u8::try_from(u32::from(c)) {
                    Ok(b) => out.push(b),
                    Err(_) => ok = false,
                }
            }
        }
    };
    let mut one = |out: &mut Vec<u8>, item: &Bound<'_, PyAny>| -> PyResult<()> {
        // NOTE: a pair's items read in place when it is a 2-tuple of str (always, from fastroute), instead of
        // extracted into a new pair: ~1k fewer instructions for the ~11 headers of a proxied request (callgrind)
        let pair = item.cast::<PyTuple>().ok().filter(|t| t.len() == 2);
        let kv = pair.and_then(|t| Some((t.get_borrowed_item(0).ok()?, t.get_borrowed_item(1).ok()?)));
        let (k, v): (Bound<'_, PyString>, Bound<'_, PyString>) = match kv {
            Some((k, v)) => match (k.cast::<PyString>(), v.cast::<PyString>()) {
                (Ok(k), Ok(v)) => (k.to_owned(), v.to_owned()),
                _ => item.extract()?,
            },
            None => item.extract()?,
        };
        put(out, k.to_str()?);
        out.extend_from_slice(b": ");
        put(out, v.to_str()?);
        out.extend_from_slice(b"\r\n");
        Ok(())
    };
    if let Ok(list) = headers.cast::<PyList>() {
        for item in list.iter() {
            one(out, &item)?;
        }
    } else {
        for item in headers.try_iter()? {
            one(out, &item?)?;
        }
    }
    Ok(ok)
}

/// `first`, then `name: value\r\n` for each header, then `last`, `body` and `tail`, as one bytes object: an
/// HTTP head (and body) in one write. Names and values are encoded as latin-1 (or, when one has a character
/// beyond it, all of them as UTF-8); with `utf8`, as UTF-8.
#[pyfunction]
#[pyo3(signature = (first, headers, last, body = None, tail = None, utf8 = false))]
fn head_bytes<'py>(
    py: Python<'py>,
    first: &[u8],
    headers: &Bound<'py, PyAny>,
    last: &[u8],
    body: Option<&Bound<'py, PyAny>>,
    tail: Option<&[u8]>,
    utf8: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    let copied; // a body that is another bytes-like object (bytearray, memoryview)
    let body: &[u8] = match body {
        None => b"",
        Some(b) => match b.cast::<PyBytes>() {
            Ok(b) => b.as_bytes(),
            Err(_) => {
                copied = pyo3::buffer::PyBuffer::<u8>::get(b)?.to_vec(py)?;
                &copied
            }
        },
    };
    let tail = tail.unwrap_or_default();
    let mut out = Vec::with_capacity(first.len() + 384 + last.len() + body.len() + tail.len());
    out.extend_from_slice(first);
    let mark = out.len();
    if !write_headers(&mut out, headers, utf8)? {
        out.truncate(mark); // a character beyond latin-1: all of them as UTF-8
        write_headers(&mut out, headers, true)?;
    }
    out.extend_from_slice(last);
    out.extend_from_slice(body);
    out.extend_from_slice(tail);
    Ok(PyBytes::new(py, &out))
}

/// `haystack.find(needle, start)` by memchr's SIMD substring search: an SSE body of a few kilobytes costs
/// ~10x fewer instructions than `bytes.find` / `in` (callgrind).
#[pyfunction]
#[pyo3(signature = (haystack, needle, start = 0))]
fn find_bytes(py: Python<'_>, haystack: &Bound<'_, PyAny>, needle: &[u8], start: usize) -> PyResult<isize> {
    let copied; // another bytes-like object (bytearray, memoryview)
    let hay: &[u8] = match haystack.cast::<PyBytes>() {
        Ok(b) => b.as_bytes(),
        Err(_) => {
            copied = pyo3::buffer::PyBuffer::<u8>::get(haystack)?.to_vec(py)?;
            &copied
        }
    };
    let found = hay.get(start..).and_then(|h| memchr::memmem::find(h, needle));
    Ok(found.map_or(-1, |i| isize::try_from(start + i).unwrap_or(isize::MAX)))
}

/// A chunked body's decoder, fed the bytes as they arrive.
#[pyclass(module = "fastroute._core")]
struct ChunkedBody {
    dec: http::ChunkDecoder,
}

#[pymethods]
impl ChunkedBody {
    #[new]
    fn new() -> Self {
        Self {
            dec: http::ChunkDecoder::new(),
        }
    }

    /// Decode `buf[start:]`: (the body bytes in it, where decoding stopped, whether the body ended).
    /// Once ended, the bytes from where it stopped belong to the next message.
    #[pyo3(signature = (buf, start = 0))]
    fn feed<'py>(&mut self, py: Python<'py>, buf: &[u8], start: usize) -> PyResult<(Bound<'py, PyBytes>, usize, bool)> {
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        let end = self
            .dec
            .feed(buf, start, |a, b| ranges.push((a, b)))
            .map_err(http_error)?;
        let body = match ranges.as_slice() {
            [] => PyBytes::new(py, b""),
            [(a, b)] => PyBytes::new(py, &buf[*a..*b]),
            many => {
                let total = many.iter().map(|(a, b)| b - a).sum();
                PyBytes::new_with(py, total, |out| {
                    let mut at = 0;
                    for (a, b) in many {
                        out[at..at + (b - a)].copy_from_slice(&buf[*a..*b]);
                        at += b - a;
                    }
                    Ok(())
                })?
            }
        };
        Ok((body, end, self.dec.done()))
    }

    /// The whole body has been decoded.
    #[getter]
    fn done(&self) -> bool {
        self.dec.done()
    }
}

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Router>()?;
    m.add_class::<Decision>()?;
    m.add_class::<Classifier>()?;
    m.add_function(wrap_pyfunction!(builtin_score, m)?)?;
    m.add_function(wrap_pyfunction!(classifier_features, m)?)?;
    m.add_function(wrap_pyfunction!(classifier_feature_names, m)?)?;
    m.add_function(wrap_pyfunction!(noop, m)?)?;
    m.add_function(wrap_pyfunction!(estimate_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(bucket, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite_body, m)?)?;
    m.add_function(wrap_pyfunction!(body_user, m)?)?;
    m.add_function(wrap_pyfunction!(parse_request_head, m)?)?;
    m.add_function(wrap_pyfunction!(parse_response_head, m)?)?;
    m.add_function(wrap_pyfunction!(head_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(relay_answer, m)?)?;
    m.add_function(wrap_pyfunction!(find_bytes, m)?)?;
    m.add_class::<ChunkedBody>()?;
    m.add_class::<HeaderNames>()?;
    m.add("HttpError", m.py().get_type::<HttpError>())?;
    m.add("HeadTooLarge", m.py().get_type::<HeadTooLarge>())?;
    Ok(())
}
