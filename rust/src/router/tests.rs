use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::Value;

use super::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/specs")
}

fn load(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join(name)).unwrap()).unwrap()
}

fn compile(spec: &Value) -> CompiledRouter {
    CompiledRouter::compile(&serde_json::to_vec(spec).unwrap()).unwrap()
}

/// Header values in the router's slot order, from a name → value map (any case).
fn header_values<'a>(r: &CompiledRouter, headers: &'a [(String, String)]) -> Vec<Option<&'a str>> {
    r.header_names()
        .iter()
        .map(|h| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(h))
                .map(|(_, v)| v.as_str())
        })
        .collect()
}

fn name<T: AsRef<str>>(names: &[T], i: Option<u32>) -> Value {
    i.map_or(Value::Null, |i| Value::String(names[i as usize].as_ref().to_owned()))
}

/// The decision as the JSON object the fixtures' `expect` blocks describe.
fn as_json(r: &CompiledRouter, body: &[u8], d: &Decision<'_>) -> Value {
    let models: Vec<&str> = r.models().iter().map(|m| &*m.name).collect();
    let variants: Vec<&str> = r.variants().iter().map(|v| &*v.name).collect();
    let upstream = d.pool.and_then(|p| {
        r.models()[p as usize]
            .upstream_model
            .as_deref()
            .map(str::to_owned)
            .or_else(|| d.requested_model.map(|m| m.decode().into_owned()))
    });
    serde_json::json!({
        "status": d.status,
        "error": d.error,
        "route": name(r.route_names(), d.route),
        "pool": name(&models, d.pool),
        "upstream_model": upstream,
        "adapter": name(r.adapters(), d.adapter),
        "variant": name(&variants, d.variant),
        "tenant": name(r.tenant_names(), d.tenant),
        "upstream_path": d.route.and_then(|i| r.route_upstream_paths()[i as usize].as_deref()),
        "body": d.rewrite.map(|p| String::from_utf8(p.apply(body)).unwrap()),
        "requested_model": d.requested_model.map(|m| m.decode().into_owned()),
        "stream": d.stream,
        "max_tokens": d.max_tokens,
    })
}

#[test]
fn fixture_cases() {
    let mut n = 0;
    for file in ["basic.json", "tenants.json", "splits.json", "classify.json"] {
        let fx = load(file);
        let r = compile(&fx["spec"]);
        for case in fx["cases"].as_array().unwrap() {
            let label = format!("{file}: {}", case["name"]);
            let headers: Vec<(String, String)> = case["headers"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect();
            let values = header_values(&r, &headers);
            let body = case["body"].as_str().unwrap().as_bytes();
            let req = Request {
                method: case["method"].as_str().unwrap(),
                path: case["path"].as_str().unwrap(),
                headers: &values,
                body,
            };
            let expect = case["expect"].as_object().unwrap();
            let mut trace = Vec::new();
            let traced = r.decide(&req, Some(&mut trace));
            let fast = r.decide(&req, None);
            assert_eq!(traced.is_ok(), fast.is_ok(), "{label}");
            match fast {
                Err(e) => {
                    assert!(expect.contains_key("raises"), "{label}: unexpected error {e}");
                    assert_eq!(expect["raises"].as_str(), e.param, "{label}");
                }
                Ok(d) => {
                    assert!(!expect.contains_key("raises"), "{label}: expected an error, got {d:?}");
                    let got = as_json(&r, body, &d);
                    assert_eq!(
                        got,
                        as_json(&r, body, &traced.unwrap()),
                        "{label}: trace changed the outcome"
                    );
                    for (k, v) in expect {
                        assert_eq!(&got[k], v, "{label}: field {k}\n{got:#}\ntrace: {trace:#?}");
                    }
                }
            }
            n += 1;
        }
    }
    assert!(n > 40);
}

#[test]
fn compile_errors_name_their_path() {
    let fx = load("compile_errors.json");
    for case in fx["cases"].as_array().unwrap() {
        let bytes = serde_json::to_vec(&case["spec"]).unwrap();
        let err = CompiledRouter::compile(&bytes).expect_err(case["name"].as_str().unwrap());
        let want = case["path"].as_str().unwrap_or("");
        assert_eq!(err.path, want, "{}: {err}", case["name"]);
    }
}

fn splits_router() -> CompiledRouter {
    compile(&load("splits.json")["spec"])
}

fn decide_split<'a>(r: &'a CompiledRouter, values: &'a [Option<&'a str>], body: &'a [u8]) -> Decision<'a> {
    let req = Request {
        method: "POST",
        path: "/v1/chat/completions",
        headers: values,
        body,
    };
    r.decide(&req, None).unwrap()
}

#[test]
fn split_by_header_is_sticky_and_weighted() {
    let r = splits_router();
    let slot = r.header_names().iter().position(|h| &**h == "x-user-id").unwrap();
    let mut counts = [0u32; 2];
    let n = 20_000;
    for i in 0..n {
        let user = format!("user-{i}");
        let mut values = vec![None; r.header_names().len()];
        values[slot] = Some(user.as_str());
        let a = decide_split(&r, &values, b"{}");
        let b = decide_split(&r, &values, br#"{"user":"someone-else","messages":[]}"#);
        assert_eq!(a.variant, b.variant, "the header wins over the body and `user`");
        counts[a.variant.unwrap() as usize] += 1;
        if a.variant == Some(1) {
            assert_eq!(r.adapters()[a.adapter.unwrap() as usize].as_ref(), "b-lora-v2");
        }
    }
    let share = f64::from(counts[0]) / f64::from(n);
    assert!((share - 0.5).abs() < 0.02, "{counts:?}");
}

#[test]
fn split_falls_back_to_user_then_body() {
    let r = splits_router();
    let values = vec![None; r.header_names().len()];
    let by_user: Vec<_> = (0..200)
        .map(|i| {
            let body = format!(r#"{{"user":"u{i}"}}"#);
            let d1 = decide_split(&r, &values, body.as_bytes()).variant;
            let body2 = format!(r#"{{"messages":[],"user":"u{i}"}}"#);
            let d2 = decide_split(&r, &values, body2.as_bytes()).variant;
            assert_eq!(d1, d2, "same user, same variant, whatever the body");
            d1
        })
        .collect();
    assert!(by_user.contains(&Some(0)) && by_user.contains(&Some(1)));
    let body = br#"{"messages":[{"role":"user","content":"x"}]}"#;
    assert_eq!(
        decide_split(&r, &values, body).variant,
        decide_split(&r, &values, body).variant
    );
}

#[test]
fn trace_reads_like_an_explanation() {
    let r = compile(&load("basic.json")["spec"]);
    let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let values = vec![None; r.header_names().len()];
    let req = Request {
        method: "POST",
        path: "/v1/chat/completions",
        headers: &values,
        body,
    };
    let mut trace = Vec::new();
    r.decide(&req, Some(&mut trace)).unwrap();
    let text = trace.join("\n");
    assert!(text.contains("no API key: anonymous caller"), "{text}");
    assert!(
        text.contains("route classify-path skipped: path /v1/chat/completions is not /v1/classify"),
        "{text}"
    );
    assert!(text.contains("route long skipped: input_tokens"), "{text}");
    assert!(text.contains("route gpt4o matched"), "{text}");
    assert!(text.contains("body rewritten: model → `llama-3-70b`"), "{text}");
}

fn tenant_spec(n: usize) -> Value {
    let mut tenants = serde_json::Map::new();
    for t in 0..n {
        let digest: [u8; 32] = Sha256::digest(format!("key-{t}").as_bytes()).into();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        tenants.insert(
            format!("t{t}"),
            serde_json::json!({"keys_sha256": [hex], "base": "base", "adapter": format!("lora-{t}")}),
        );
    }
    serde_json::json!({
        "models": {
            "base": {"endpoints": ["http://x"], "upstream_model": "llama"},
            "lorax": {"endpoints": ["http://y"], "upstream_model": "mistral", "adapter_field": "adapter_id"},
            "other": {"endpoints": ["http://z"]},
        },
        "tenants": tenants,
        "splits": {"canary": {"sticky": "tenant", "variants": [
            {"name": "v3", "to": "base", "weight": 1},
            {"name": "v4", "to": "base", "weight": 1, "adapter": "lora-0"},
        ]}},
        "routes": [
            {"name": "by-name", "match": {"path": "/v1/completions"}, "requested": true},
            {"name": "lorax", "match": {"path": "/lorax"}, "to": "lorax"},
            {"name": "canary", "match": {"path": "/canary"}, "split": "canary"},
        ],
        "default": "base",
        "server": {"allow_anonymous": true},
    })
}

/// `POST /` with an empty object body and the key header's value (the tenant specs read one header).
fn keyed<'a>(values: &'a [Option<&'a str>]) -> Request<'a> {
    Request {
        method: "POST",
        path: "/",
        headers: values,
        body: b"{}",
    }
}

#[test]
fn many_keys() {
    let r = compile(&tenant_spec(2000));
    assert_eq!(r.tenant_key_count(), 2000);
    for t in [0usize, 1, 999, 1999] {
        let auth = format!("Bearer key-{t}");
        let values = [Some(auth.as_str())];
        let d = r.decide(&keyed(&values), None).unwrap();
        assert_eq!(r.tenant_names()[d.tenant.unwrap() as usize].as_ref(), format!("t{t}"));
        assert_eq!(r.adapters()[d.adapter.unwrap() as usize].as_ref(), format!("lora-{t}"));
    }
}

#[test]
fn a_key_is_trimmed_of_white_space_at_both_ends() {
    let r = compile(&tenant_spec(3));
    let decide = |auth: &str| {
        let values = [Some(auth)];
        let d = r.decide(&keyed(&values), None).unwrap();
        (d.status, d.tenant)
    };
    for auth in [
        "Bearer key-1",
        "Bearer  key-1 ",
        "Bearer \tkey-1\t",
        "Bearer key-1\u{a0}",
        "Bearer \u{2003}key-1",
    ] {
        let (status, tenant) = decide(auth);
        assert_eq!(status, 200, "{auth:?}");
        assert_eq!(r.tenant_names()[tenant.unwrap() as usize].as_ref(), "t1", "{auth:?}");
    }
    // Not the key: refused; nothing but white space: no key (this spec allows anonymous callers).
    for (auth, status) in [
        ("Bearer key-1x", 401),
        ("Bearer k ey-1", 401),
        ("Bearer ", 200),
        ("Bearer \u{a0}", 200),
    ] {
        assert_eq!(decide(auth), (status, None), "{auth:?}");
    }
}

#[test]
fn digests_differing_in_any_one_bit_are_not_equal() {
    let a: [u8; 32] = Sha256::digest(b"key-0").into();
    assert!(digest_eq(&a, &a));
    assert!(digest_eq(&a, &{ a }));
    for byte in 0..32 {
        for bit in 0..8 {
            let mut b = a;
            b[byte] ^= 1 << bit;
            assert!(!digest_eq(&a, &b), "byte {byte} bit {bit}");
            assert!(!digest_eq(&b, &a), "byte {byte} bit {bit}");
        }
    }
    let b: [u8; 32] = Sha256::digest(b"key-1").into();
    assert!(!digest_eq(&a, &b));
}

#[test]
fn a_key_sharing_a_digest_prefix_is_still_compared_in_full() {
    // Two digests with the same first 8 bytes land in one index slot; only the one equal in full matches.
    let a: [u8; 32] = Sha256::digest(b"key-0").into();
    let mut b = a;
    b[31] ^= 0x80;
    let table = KeyTable::build(vec![(b, 7)]);
    assert_eq!(table.lookup(b"key-0"), None);
    let table = KeyTable::build(vec![(b, 7), (a, 3)]);
    assert_eq!(table.lookup(b"key-0"), Some(3));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_body_is_a_decision_or_an_error(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let r = compile(&load("basic.json")["spec"]);
        let values = vec![None; r.header_names().len()];
        let req = Request { method: "POST", path: "/v1/completions", headers: &values, body: &body };
        let fast = r.decide(&req, None).map(|d| d.status);
        let mut trace = Vec::new();
        let traced = r.decide(&req, Some(&mut trace)).map(|d| d.status);
        prop_assert_eq!(fast, traced);
    }

    #[test]
    fn json_like_bodies_never_panic(body in r#"\{("(model|stream|messages|max_tokens|user|metadata|x)":([0-9]{1,3}|"[a-z\\"]{0,4}"|true|null|\[[^\]]{0,8}\]|\{[^}]{0,8}\}),?){0,4}\}"#) {
        let r = compile(&load("basic.json")["spec"]);
        let values = vec![None; r.header_names().len()];
        let req = Request { method: "POST", path: "/v1/completions", headers: &values, body: body.as_bytes() };
        let _ = r.decide(&req, None);
    }

    #[test]
    fn rewritten_body_is_the_original_but_for_the_rewritten_fields(
        tenant in 0usize..8,
        model in proptest::option::of("[a-zA-Z0-9\"\\\\\n é-]{0,12}"),
        extra in proptest::collection::btree_map("[a-z_]{1,8}", "[ -~]{0,10}", 0..4),
        adapter_id in proptest::option::of("[a-z-]{1,8}"),
        path in prop_oneof![Just("/"), Just("/lorax")],
    ) {
        let r = compile(&tenant_spec(8));
        let mut obj = serde_json::Map::new();
        obj.insert("messages".into(), serde_json::json!([{"role": "user", "content": "hello"}]));
        for (k, v) in &extra {
            obj.insert(format!("x_{k}"), Value::String(v.clone()));
        }
        if let Some(m) = &model {
            obj.insert("model".into(), Value::String(m.clone()));
        }
        if let Some(a) = &adapter_id {
            obj.insert("adapter_id".into(), Value::String(a.clone()));
        }
        let body = serde_json::to_vec(&Value::Object(obj.clone())).unwrap();
        let auth = format!("Bearer key-{tenant}");
        let values = [Some(auth.as_str())];
        let req = Request { method: "POST", path, headers: &values, body: &body };
        let d = r.decide(&req, None).unwrap();
        prop_assume!(d.status == 200);
        if let Some(plan) = d.rewrite {
            let out: Value = serde_json::from_slice(&plan.apply(&body)).unwrap();
            let mut out = out.as_object().unwrap().clone();
            let mut orig = obj.clone();
            for f in ["model", "adapter_id"] {
                out.remove(f);
                orig.remove(f);
            }
            prop_assert_eq!(out, orig);
        }
    }

    #[test]
    fn a_tenant_never_gets_another_tenants_adapter(
        tenant in 0usize..8,
        asked in 0usize..8,
        path in prop_oneof![Just("/"), Just("/v1/completions"), Just("/lorax"), Just("/canary")],
        via_adapter_id in any::<bool>(),
    ) {
        let r = compile(&tenant_spec(8));
        let body = if via_adapter_id {
            format!(r#"{{"model":"llama","adapter_id":"lora-{asked}"}}"#)
        } else {
            format!(r#"{{"model":"lora-{asked}"}}"#)
        };
        let auth = format!("Bearer key-{tenant}");
        let values = [Some(auth.as_str())];
        let req = Request { method: "POST", path, headers: &values, body: body.as_bytes() };
        let d = r.decide(&req, None).unwrap();
        if d.status == 200 {
            if let Some(a) = d.adapter {
                prop_assert_eq!(r.adapters()[a as usize].as_ref(), format!("lora-{tenant}"));
            }
            if let Some(plan) = d.rewrite {
                let out = String::from_utf8(plan.apply(body.as_bytes())).unwrap();
                for other in (0..8).filter(|&o| o != tenant) {
                    prop_assert!(!out.contains(&format!("\"lora-{other}\"")), "{}", out);
                }
            }
        }
        if asked != tenant {
            prop_assert_eq!(d.status, 403);
        }
    }
}

/// Timing of the core alone (no Python): `cargo test --profile devrel -q core_timing -- --ignored --nocapture`.
#[test]
#[ignore = "timing, run by hand"]
fn core_timing() {
    let r = compile(&tenant_spec(1000));
    let sentence = "The quick brown fox jumps over the lazy dog, and then explains why it did so. ";
    for size in [200usize, 2048, 102_400] {
        let mut msgs = Vec::new();
        let mut len = 0;
        while len < size {
            let t = sentence.repeat(1 + (size - len).min(2000) / sentence.len());
            len += t.len() + 30;
            msgs.push(serde_json::json!({"role": "user", "content": t}));
        }
        let body = serde_json::to_vec(&serde_json::json!({"model": "gpt-4o-mini", "messages": msgs})).unwrap();
        let auth = "Bearer key-123".to_owned();
        let values = [Some(auth.as_str())];
        let req = Request {
            method: "POST",
            path: "/",
            headers: &values,
            body: &body,
        };
        let opts = ScanOptions {
            estimator: Estimator::Fast,
            features: false,
            grams: crate::classify::Grams::Off,
            metadata_keys: &[],
        };
        let n = if size > 10_000 { 2000 } else { 200_000 };
        let t0 = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(r.decide(std::hint::black_box(&req), None).unwrap());
        }
        let t_decide = t0.elapsed() / n;
        let t0 = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(scan(std::hint::black_box(&body), &opts).unwrap());
        }
        let t_scan = t0.elapsed() / n;
        let t0 = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(Estimator::Fast.count(std::hint::black_box(&body)));
        }
        let t_est = t0.elapsed() / n;
        let t0 = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(r.keys.lookup(std::hint::black_box(b"key-123")));
        }
        let t_key = t0.elapsed() / n;
        eprintln!(
            "{} B: decide {t_decide:?}, scan {t_scan:?}, estimate(whole body) {t_est:?}, key {t_key:?}",
            body.len()
        );
    }
}

/// Routes mixing exact paths (alone, in `any`, under `all`, under `not`), prefixes and path-free conditions, several
/// sharing a path, so the route index has candidate sets of every shape.
fn mixed_path_spec() -> Value {
    let matches = [
        serde_json::json!({"path": "/a"}),
        serde_json::json!({"headers": {"x-t": "1"}}),
        serde_json::json!({"path": "/b", "headers": {"x-t": "2"}}),
        serde_json::json!({"any": [{"path": "/a"}, {"path": "/c"}], "model": "m1"}),
        serde_json::json!({"path": {"prefix": "/b"}, "headers": {"x-t": "3"}}),
        serde_json::json!({"not": {"path": "/a"}, "headers": {"x-t": "4"}}),
        serde_json::json!({"all": [{"path": "/c"}, {"any": [{"path": "/c"}, {"path": "/d"}]}], "stream": true}),
        serde_json::json!({"any": [{"path": "/d"}, {"headers": {"x-t": "5"}}]}),
        serde_json::json!({"all": [{"path": "/a"}, {"path": "/b"}]}),
        serde_json::json!({"path": "/b"}),
        serde_json::json!({"model": "m2*"}),
        serde_json::json!({"path": "/c", "not": {"model": "m1"}}),
        serde_json::json!({"path": {"exact": "/d"}, "headers": {"x-t": {"present": false}}}),
    ];
    let routes: Vec<Value> = matches
        .iter()
        .enumerate()
        .map(|(i, m)| serde_json::json!({"name": format!("r{i}"), "match": m, "to": "m"}))
        .collect();
    serde_json::json!({
        "server": {"allow_anonymous": true},
        "models": {"m": {"endpoints": ["http://127.0.0.1:1"]}},
        "routes": routes,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn the_route_index_picks_the_route_a_linear_walk_picks(
        path in prop_oneof![Just("/a"), Just("/b"), Just("/bb"), Just("/c"), Just("/d"), Just("/e"), Just(""), Just("/a/")],
        tier in proptest::option::of(prop_oneof![Just("1"), Just("2"), Just("3"), Just("4"), Just("5"), Just("9")]),
        model in proptest::option::of(prop_oneof![Just("m1"), Just("m2x"), Just("zz")]),
        stream in any::<bool>(),
    ) {
        let r = compile(&mixed_path_spec());
        prop_assert!(r.index.is_some());
        let headers: Vec<(String, String)> = tier.map(|t| ("x-t".to_owned(), t.to_owned())).into_iter().collect();
        let values = header_values(&r, &headers);
        let mut obj = serde_json::json!({"stream": stream, "messages": []});
        if let Some(m) = model {
            obj["model"] = Value::String(m.to_owned());
        }
        let body = serde_json::to_vec(&obj).unwrap();
        let req = Request { method: "POST", path, headers: &values, body: &body };
        let opts = ScanOptions { estimator: r.estimator, features: false, grams: crate::classify::Grams::Off, metadata_keys: &r.metadata_keys };
        let scanned = scan(&body, &opts).unwrap();
        let facts = Facts { req: &req, body: &scanned, tenant: None, tenant_names: &r.tenant_names };
        let linear = r.first_match_linear(&facts);
        prop_assert_eq!(r.first_match(&facts), linear);
        // The index itself, whatever the route count `decide` starts using it at.
        prop_assert_eq!(r.index.as_ref().unwrap().first(&facts, |i| r.routes[i].cond.eval(&facts)), linear);
        let fast = r.decide(&req, None).unwrap().route;
        let mut trace = Vec::new();
        let traced = r.decide(&req, Some(&mut trace)).unwrap().route;
        prop_assert_eq!(fast, linear.map(idx));
        prop_assert_eq!(traced, linear.map(idx));
        // The trace explains every route before the match, those the index skips included.
        let explained = trace.iter().filter(|l| l.starts_with("route ")).count();
        prop_assert_eq!(explained, linear.map_or(r.routes.len(), |i| i + 1));
    }
}

/// The route index's candidates for a request, in route order.
fn candidates(r: &CompiledRouter, path: &str, tier: Option<&str>, model: Option<&str>, stream: bool) -> Vec<usize> {
    let headers: Vec<(String, String)> = tier.map(|t| ("x-t".to_owned(), t.to_owned())).into_iter().collect();
    let values = header_values(r, &headers);
    let mut obj = serde_json::json!({"stream": stream, "messages": []});
    if let Some(m) = model {
        obj["model"] = Value::String(m.to_owned());
    }
    let body = serde_json::to_vec(&obj).unwrap();
    let req = Request {
        method: "POST",
        path,
        headers: &values,
        body: &body,
    };
    let opts = ScanOptions {
        estimator: r.estimator,
        features: false,
        grams: crate::classify::Grams::Off,
        metadata_keys: &r.metadata_keys,
    };
    let scanned = scan(&body, &opts).unwrap();
    let facts = Facts {
        req: &req,
        body: &scanned,
        tenant: None,
        tenant_names: &r.tenant_names,
    };
    let mut acc = [0u64; index::MAX_WORDS];
    r.index.as_ref().unwrap().candidates(&facts, &mut acc);
    (0..r.routes.len())
        .filter(|&i| acc[i / 64] & (1 << (i % 64)) != 0)
        .collect()
}

#[test]
fn the_route_index_lists_candidates_in_route_order() {
    let r = compile(&mixed_path_spec());
    // A path no route names, no header, no model: only route 7 is left (its `any` tests the path in one branch and a
    // header in the other, so neither field's bitset can rule it out).
    assert_eq!(candidates(&r, "/zzz", None, None, false), [7]);
    assert_eq!(candidates(&r, "/a", None, None, false), [0, 7]);
    assert_eq!(candidates(&r, "/a", None, Some("m1"), false), [0, 3, 7]);
    assert_eq!(candidates(&r, "/b", Some("2"), None, false), [2, 7, 9]);
    assert_eq!(candidates(&r, "/bb", Some("3"), None, false), [4, 7]);
    assert_eq!(candidates(&r, "/c", Some("4"), Some("m2x"), true), [5, 6, 7, 10, 11]);
    assert_eq!(candidates(&r, "/d", None, Some("zz"), false), [7, 12]);
    assert_eq!(candidates(&r, "/d", Some("1"), None, false), [1, 7]);
    // Route 8 needs two different exact paths at once and so is a candidate for none.
    for path in ["/a", "/b", "/c", "/d", "/e"] {
        for tier in [None, Some("1"), Some("9")] {
            assert!(!candidates(&r, path, tier, Some("m1"), true).contains(&8));
        }
    }
    // No route testing a field by value: no index.
    let mut spec = mixed_path_spec();
    spec["routes"] = serde_json::json!([
        {"name": "m", "match": {"method": "GET"}, "to": "m"},
        {"name": "n", "match": {"not": {"path": "/a"}}, "to": "m"},
        {"name": "h", "match": {"any": [{"path": "/a"}, {"headers": {"x-t": {"regex": "1"}}}]}, "to": "m"},
    ]);
    assert!(compile(&spec).index.is_none());
}

/// A random route condition over a few fields and values, nested up to three levels.
fn arb_match() -> impl Strategy<Value = Value> {
    use serde_json::json;
    let leaf = prop_oneof![
        prop_oneof![Just("/a"), Just("/b"), Just("/ab")].prop_map(|p| json!({"path": p})),
        prop_oneof![Just("/a"), Just("/b"), Just("")].prop_map(|p| json!({"path": {"prefix": p}})),
        prop_oneof![Just("GET"), Just("post")].prop_map(|m| json!({"method": m})),
        prop_oneof![Just("1"), Just("2"), Just("")].prop_map(|v| json!({"headers": {"x-t": v}})),
        Just(json!({"headers": {"x-t": {"one_of": ["1", "3"]}}})),
        any::<bool>().prop_map(|p| json!({"headers": {"x-t": {"present": p}}})),
        Just(json!({"headers": {"x-t": {"regex": "^[12]$"}}})),
        prop_oneof![Just("a"), Just("b")].prop_map(|v| json!({"headers": {"X-U": {"equals": v}}})),
        prop_oneof![Just(json!("t0")), Just(json!("t1")), Just(json!(["t0", "t1"]))].prop_map(|t| json!({"tenant": t})),
        prop_oneof![Just("m1"), Just("m2"), Just("m*"), Just("?1"), Just("*x"), Just("é*")]
            .prop_map(|m| json!({"model": m})),
        Just(json!({"model": ["m1", "z*"]})),
        (0i64..80, 0i64..80).prop_map(|(a, b)| json!({"input_tokens": {"gte": a.min(b), "lte": a.max(b)}})),
        (0i64..80).prop_map(|a| json!({"input_tokens": {"gt": a}})),
        (0i64..40).prop_map(|a| json!({"max_tokens": {"lt": a}})),
        (0i64..40).prop_map(|a| json!({"max_tokens": {"gte": a}})),
        any::<bool>().prop_map(|s| json!({"stream": s})),
        prop_oneof![Just("a"), Just("b\n")].prop_map(|v| json!({"metadata": {"team": v}})),
        Just(json!({})),
    ];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(|cs| json!({"all": cs})),
            proptest::collection::vec(inner.clone(), 1..3).prop_map(|cs| json!({"any": cs})),
            inner.clone().prop_map(|c| json!({"not": c})),
            (inner.clone(), inner).prop_map(|(a, b)| json!({"all": [a], "any": [b]})),
        ]
    })
}

fn random_routes_spec(matches: &[Value]) -> Value {
    let key = |k: &str| -> String {
        Sha256::digest(k.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let routes: Vec<Value> = matches
        .iter()
        .enumerate()
        .map(|(i, m)| serde_json::json!({"name": format!("r{i}"), "match": m, "to": "m"}))
        .collect();
    serde_json::json!({
        "server": {"allow_anonymous": true},
        "models": {"m": {"endpoints": ["http://127.0.0.1:1"]}},
        "tenants": {"t0": {"keys_sha256": [key("k0")]}, "t1": {"keys_sha256": [key("k1")]}},
        "routes": routes,
        "default": "m",
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// On random routes (more than 64 of them at times, so bitsets of several words) and random requests, the route
    /// index finds the route that evaluating every route in order finds, with and without a trace.
    #[test]
    fn the_route_index_equals_a_linear_walk_on_random_routes(
        matches in proptest::collection::vec(arb_match(), 1..80),
        path in prop_oneof![Just("/a"), Just("/b"), Just("/ab"), Just("/c"), Just("")],
        method in prop_oneof![Just("POST"), Just("get")],
        tier in proptest::option::of(prop_oneof![Just("1"), Just("2"), Just("3"), Just("")]),
        u in proptest::option::of(prop_oneof![Just("a"), Just("b")]),
        key in proptest::option::of(prop_oneof![Just("k0"), Just("k1")]),
        model in proptest::option::of(prop_oneof![Just("m1"), Just("m2"), Just("mx"), Just("21"), Just("é1"), Just("m\u{1}")]),
        stream in any::<bool>(),
        max_tokens in proptest::option::of(0i64..40),
        team in proptest::option::of(prop_oneof![Just("a"), Just("b\n"), Just("b")]),
        words in 0usize..60,
    ) {
        let r = compile(&random_routes_spec(&matches));
        let mut headers: Vec<(String, String)> = Vec::new();
        if let Some(t) = tier { headers.push(("x-t".to_owned(), t.to_owned())); }
        if let Some(u) = u { headers.push(("x-u".to_owned(), u.to_owned())); }
        if let Some(k) = key { headers.push(("authorization".to_owned(), format!("Bearer {k}"))); }
        let values = header_values(&r, &headers);
        let mut obj = serde_json::json!({"stream": stream, "messages": [{"role": "user", "content": "word ".repeat(words)}]});
        if let Some(m) = model { obj["model"] = Value::String(m.to_owned()); }
        if let Some(n) = max_tokens { obj["max_tokens"] = Value::from(n); }
        if let Some(t) = team { obj["metadata"] = serde_json::json!({"team": t}); }
        let body = serde_json::to_vec(&obj).unwrap();
        let req = Request { method, path, headers: &values, body: &body };
        let d = r.decide(&req, None).unwrap();
        prop_assert_eq!(d.status, 200);
        let opts = ScanOptions { estimator: r.estimator, features: false, grams: crate::classify::Grams::Off, metadata_keys: &r.metadata_keys };
        let scanned = scan(&body, &opts).unwrap();
        let facts = Facts { req: &req, body: &scanned, tenant: d.tenant, tenant_names: &r.tenant_names };
        let linear = r.first_match_linear(&facts);
        prop_assert_eq!(r.first_match(&facts), linear);
        if let Some(index) = &r.index {
            prop_assert_eq!(index.first(&facts, |i| r.routes[i].cond.eval(&facts)), linear);
        }
        prop_assert_eq!(d.route, linear.map(idx));
        let mut trace = Vec::new();
        prop_assert_eq!(r.decide(&req, Some(&mut trace)).unwrap().route, linear.map(idx));
    }
}

/// Routers past one bitset word use several; past `MAX_WORDS` words they walk the routes in order.
#[test]
fn many_routes_use_several_words_or_the_linear_walk() {
    for n in [63usize, 64, 65, 130, index::MAX_WORDS * 64, index::MAX_WORDS * 64 + 1] {
        let routes: Vec<Value> = (0..n)
            .map(|i| serde_json::json!({"name": format!("r{i}"), "match": {"headers": {"x-t": i.to_string()}}, "to": "m"}))
            .collect();
        let spec = serde_json::json!({
            "server": {"allow_anonymous": true},
            "models": {"m": {"endpoints": ["http://127.0.0.1:1"]}},
            "routes": routes,
            "default": "m",
        });
        let r = compile(&spec);
        assert_eq!(r.index.is_some(), n <= index::MAX_WORDS * 64, "{n} routes");
        for i in [0, 1, 63, 64, n / 2, n - 1, n] {
            let headers = vec![("x-t".to_owned(), i.to_string())];
            let values = header_values(&r, &headers);
            let req = Request {
                method: "POST",
                path: "/",
                headers: &values,
                body: b"{}",
            };
            let d = r.decide(&req, None).unwrap();
            assert_eq!(d.route, (i < n).then(|| idx(i)), "{n} routes, x-t {i}");
        }
    }
}
