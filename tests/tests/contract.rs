//! The API contract and who may use it.
//!
//! - openapi.yaml and template.yaml describe the same routes.
//! - The isolation matrix: every route × {no token, expired, wrong
//!   signature, wrong issuer, wrong audience, another org, a workspace token
//!   of another workspace, too little scope, valid} on the local stack, on
//!   both transports. Each refused request must leave S3, the host's config
//!   dir and the fetch server exactly as they were; every response is
//!   checked against openapi.yaml on the way (`send`).

use std::collections::BTreeSet;

use acceptance::*;
use lambda_http::Request;
use plugin_delivery::domain::host::Access;
use serde_json::{json, Value};

/// (METHOD, path) of every HttpApi route in template.yaml.
fn template_routes() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("template.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut routes = BTreeSet::new();
    for (_, res) in doc["Resources"].as_mapping().unwrap() {
        let Some(events) = res["Properties"]["Events"].as_mapping() else {
            continue;
        };
        for (_, ev) in events {
            if ev["Type"].as_str() == Some("HttpApi") {
                let p = &ev["Properties"];
                routes.insert((
                    p["Method"].as_str().unwrap().to_ascii_uppercase(),
                    p["Path"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    routes
}

fn document_routes() -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in openapi()["paths"].as_object().unwrap() {
        for method in ["get", "put", "post", "delete", "patch"] {
            if item.get(method).is_some() {
                routes.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    routes
}

#[test]
fn the_template_routes_exactly_what_the_document_describes() {
    let (t, d) = (template_routes(), document_routes());
    assert_eq!(t.len(), 12, "{t:?}");
    assert_eq!(t, d, "template.yaml and openapi.yaml disagree");
    // Every operation is behind the bearer scheme and documents 401.
    assert_eq!(openapi()["security"], json!([{"platformJwt": []}]));
    for (path, item) in openapi()["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            assert!(
                op["responses"]["401"].is_object(),
                "{method} {path} has no 401"
            );
            assert!(
                op.get("security").is_none(),
                "{method} {path} overrides security"
            );
        }
    }
}

/// Who the matrix sends each request as.
#[derive(Debug, Clone, Copy, PartialEq)]
enum As {
    NoToken,
    Expired,
    WrongSignature,
    WrongIssuer,
    WrongAudience,
    OtherOrg,
    OtherWorkspaceToken,
    TooLittleScope,
    Valid,
}

const CASES: [As; 9] = [
    As::NoToken,
    As::Expired,
    As::WrongSignature,
    As::WrongIssuer,
    As::WrongAudience,
    As::OtherOrg,
    As::OtherWorkspaceToken,
    As::TooLittleScope,
    As::Valid,
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Workspace,
    Org,
    Global,
}

struct Route {
    key: &'static str,
    /// The one scope it needs.
    scope: &'static str,
    kind: Kind,
}

const ROUTES: [Route; 12] = [
    Route {
        key: "POST /workspaces/{id}/plugins",
        scope: "write",
        kind: Kind::Workspace,
    },
    Route {
        key: "GET /workspaces/{id}/plugins",
        scope: "read",
        kind: Kind::Workspace,
    },
    Route {
        key: "GET /workspaces/{id}/plugins/available",
        scope: "read",
        kind: Kind::Workspace,
    },
    Route {
        key: "GET /workspaces/{id}/plugins/compatibility",
        scope: "read",
        kind: Kind::Workspace,
    },
    Route {
        key: "GET /workspaces/{id}/plugins/operations",
        scope: "read",
        kind: Kind::Workspace,
    },
    Route {
        key: "GET /workspaces/{id}/plugins/operations/{op_id}",
        scope: "read",
        kind: Kind::Workspace,
    },
    Route {
        key: "GET /workspaces/{id}/plugins/{name}/download",
        scope: "write",
        kind: Kind::Workspace,
    },
    Route {
        key: "DELETE /workspaces/{id}/plugins/{name}",
        scope: "write",
        kind: Kind::Workspace,
    },
    Route {
        key: "GET /orgs/{id}/plugins/allowlist",
        scope: "read",
        kind: Kind::Org,
    },
    Route {
        key: "PUT /orgs/{id}/plugins/allowlist",
        scope: "admin",
        kind: Kind::Org,
    },
    Route {
        key: "GET /plugins",
        scope: "read",
        kind: Kind::Global,
    },
    Route {
        key: "GET /plugins/sources",
        scope: "read",
        kind: Kind::Global,
    },
];

/// The status each case must get on `r`.
fn expected(r: &Route, case: As) -> u16 {
    let ok = if r
        .key
        .starts_with("GET /workspaces/{id}/plugins/{name}/download")
    {
        302
    } else {
        200
    };
    match case {
        As::NoToken | As::Expired | As::WrongSignature | As::WrongIssuer | As::WrongAudience => 401,
        As::TooLittleScope => 403,
        As::Valid => ok,
        As::OtherOrg => match r.kind {
            Kind::Workspace | Kind::Org => 404,
            Kind::Global => ok,
        },
        As::OtherWorkspaceToken => match (r.kind, r.scope) {
            (Kind::Workspace, _) => 404,
            // A workspace token reads its org's allowlist, never changes it.
            (Kind::Org, "admin") => 403,
            (Kind::Org, _) | (Kind::Global, _) => ok,
        },
    }
}

fn token_for(r: &Route, case: As) -> Option<String> {
    let all = "read write admin";
    let signed = |c: Value| Some(sign_token(&c, "platform-test-key.pem"));
    match case {
        As::NoToken => None,
        As::Expired => {
            let mut c = claims(TEST_ORG, None, all);
            c["exp"] = json!(now_secs() - 3600);
            c["iat"] = json!(now_secs() - 7200);
            signed(c)
        }
        As::WrongSignature => Some(sign_token(&claims(TEST_ORG, None, all), "attacker-key.pem")),
        As::WrongIssuer => {
            let mut c = claims(TEST_ORG, None, all);
            c["iss"] = json!("https://attacker.test/");
            signed(c)
        }
        As::WrongAudience => {
            let mut c = claims(TEST_ORG, None, all);
            c["aud"] = json!("another-service");
            signed(c)
        }
        As::OtherOrg => Some(token("globex", None, all)),
        As::OtherWorkspaceToken => Some(token(TEST_ORG, Some("some-other-ws"), all)),
        As::TooLittleScope => {
            let others: Vec<&str> = ["read", "write", "admin"]
                .into_iter()
                .filter(|s| *s != r.scope)
                .collect();
            Some(token(TEST_ORG, None, &others.join(" ")))
        }
        As::Valid => Some(owner_token().to_string()),
    }
}

/// What a refused request must not change.
#[derive(Debug, PartialEq)]
struct Seen {
    s3: Vec<String>,
    host: Vec<String>,
    fetches: usize,
}

async fn seen(f: &Fixture, srv: &SourceServer) -> Seen {
    let mut s3 = f.keys("").await;
    s3.sort();
    Seen {
        s3,
        host: tree(&f.config_dir).into_keys().collect(),
        fetches: srv.requests(),
    }
}

struct World {
    f: Fixture,
    srv: SourceServer,
    app: plugin_delivery::App,
    source: String,
    op_id: String,
}

fn request(w: &World, r: &Route) -> Request {
    let ws = w.f.workspace.as_str();
    let (method, route) = r.key.split_once(' ').unwrap();
    let path = route
        .replace("{id}", if r.kind == Kind::Org { TEST_ORG } else { ws })
        .replace("{name}", "matrix-tool")
        .replace("{op_id}", &w.op_id);
    let mut params = match r.kind {
        Kind::Workspace => json!({"id": ws}),
        Kind::Org => json!({"id": TEST_ORG}),
        Kind::Global => json!({}),
    };
    if route.contains("{name}") {
        params["name"] = json!("matrix-tool");
    }
    if route.contains("{op_id}") {
        params["op_id"] = json!(w.op_id);
    }
    let (body, query) = match r.key {
        "POST /workspaces/{id}/plugins" => {
            (Some(json!({"source": w.source}).to_string()), String::new())
        }
        "PUT /orgs/{id}/plugins/allowlist" => {
            (Some(r#"{"plugins": []}"#.to_string()), String::new())
        }
        "GET /workspaces/{id}/plugins/compatibility" => (None, "runtime=hermes".into()),
        "GET /workspaces/{id}/plugins/{name}/download" => (None, format!("source={}", w.source)),
        _ => (None, String::new()),
    };
    event_with_query(method, route, &path, params, body.as_deref(), &query)
}

async fn world(access: Access) -> World {
    let f = Fixture::with(access).await;
    let srv = SourceServer::start();
    let archive = {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (p, d) in [
            ("plugin.yaml", &b"name: matrix-tool\nversion: 1.0.0\n"[..]),
            ("rules/m.md", b"m\n"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(d.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, p, d).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    };
    srv.file("m/matrix-tool.tar.gz", &archive);
    let source = format!(
        "{}/files/m/matrix-tool.tar.gz#sha256={}",
        srv.base(),
        sha256_hex(&archive)
    );
    let mut cfg = f.config();
    cfg.extra_ca_pem = Some(std::fs::read(srv.tls.join("ca.pem")).unwrap());
    let app = f.app_with(cfg);
    World {
        f,
        srv,
        app,
        source,
        op_id: "op-0-00000000".into(),
    }
}

async fn matrix(access: Access) {
    let mut w = world(access).await;
    // Refusals first, on a workspace that has nothing yet.
    let before = seen(&w.f, &w.srv).await;
    let mut refused = 0;
    for r in &ROUTES {
        for case in CASES {
            if case == As::Valid {
                continue;
            }
            let want = expected(r, case);
            let req = as_caller(request(&w, r), token_for(r, case).as_deref());
            let (status, body) = api(&w.app, req).await;
            assert_eq!(status, want, "{access:?} {} as {case:?}: {body}", r.key);
            if want == 404 && r.kind == Kind::Workspace {
                assert_eq!(
                    body["error"],
                    format!("workspace {:?} was not found", w.f.workspace),
                    "the same body as an unknown workspace"
                );
            }
            if want >= 400 {
                refused += 1;
                assert_eq!(
                    seen(&w.f, &w.srv).await,
                    before,
                    "{access:?} {} as {case:?} left a trace",
                    r.key
                );
            }
        }
    }
    assert!(refused >= 12 * 6, "{refused}");
    // An unknown workspace answers exactly as another org's does.
    let unknown = as_caller(list_req("no-such-ws"), Some(owner_token()));
    let (s, b) = api(&w.app, unknown).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (404, Some("workspace \"no-such-ws\" was not found"))
    );

    // Valid, in an order where each finds what it needs.
    let ordered = [0usize, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 7];
    for i in ordered {
        let r = &ROUTES[i];
        if i == 5 {
            let (_, page) = api(&w.app, request(&w, &ROUTES[4])).await;
            w.op_id = page["operations"][0]["id"].as_str().unwrap().to_string();
        }
        let req = as_caller(request(&w, r), Some(owner_token()));
        let (status, body) = api(&w.app, req).await;
        assert_eq!(
            status,
            expected(r, As::Valid),
            "{access:?} {} valid: {body}",
            r.key
        );
        if i == 0 {
            assert_eq!(body["plugin"], "matrix-tool", "{body}");
            assert!(w.f.plugin_dir("matrix-tool").join("rules/m.md").exists());
        }
    }
    assert!(!w.f.plugin_dir("matrix-tool").exists(), "uninstalled last");
    assert!(
        w.srv.requests() > before.fetches,
        "the valid install did fetch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_matrix_over_ssh() {
    matrix(Access::Ssh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_matrix_over_ssm() {
    matrix(Access::Ssm).await;
}

// ---- property-based API fuzz

/// Percent-encoding of everything but unreserved characters.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Random requests over every route, derived from the document's routes
/// and parameters, with a valid token (mostly): each response must be
/// documented (status, headers, body schema) and none may be a 500.
/// `PLUGIN_FUZZ_REQUESTS` (default 1000) and `PLUGIN_FUZZ_SEED` set the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_fuzz_against_the_document() {
    use rand::{Rng, SeedableRng};
    let n: usize = std::env::var("PLUGIN_FUZZ_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let seed: u64 = std::env::var("PLUGIN_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let w = world(Access::Ssh).await;
    // GitHub sources go to the local stand-in, never to the internet.
    let mut cfg = w.f.config();
    cfg.extra_ca_pem = Some(std::fs::read(w.srv.tls.join("ca.pem")).unwrap());
    cfg.github_api = w.srv.base();
    let app = w.f.app_with(cfg);
    w.srv.repo_ref(
        "acme",
        "tools",
        "v1",
        &[("plugin.yaml", b"name: tools\n"), ("rules/t.md", b"t\n")],
    );
    let ws = w.f.workspace.clone();
    let pick = |rng: &mut rand::rngs::StdRng, xs: &[String]| xs[rng.gen_range(0..xs.len())].clone();
    let junk = |rng: &mut rand::rngs::StdRng| -> String {
        let alphabet: Vec<char> = "aZ09-_.~%:/#?&=@ é\u{0}\u{202e}\"'{}[]\\".chars().collect();
        let len = rng.gen_range(0..40);
        (0..len)
            .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
            .collect()
    };
    let ids = vec![
        ws.clone(),
        "no-such-ws".into(),
        String::new(),
        "..".into(),
        "A".repeat(300),
        "ws with space".into(),
    ];
    let names = vec![
        "matrix-tool".into(),
        "tools".into(),
        "../etc".into(),
        String::new(),
        "Bad/Name".into(),
        "x".repeat(200),
    ];
    let sources = vec![
        w.source.clone(),
        "github://acme/tools#v1".into(),
        "github://acme/missing#v1".into(),
        "github://acme/tools".into(),
        format!(
            "{}/files/m/none.tgz#sha256={}",
            w.srv.base(),
            "0".repeat(64)
        ),
        format!("{}/files/m/matrix-tool.tar.gz", w.srv.base()),
        "local://matrix-tool".into(),
        "nope://x".into(),
        "matrix-tool".into(),
        String::new(),
    ];
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let (mut five_hundreds, mut breaks) = (Vec::new(), Vec::new());
    let started = std::time::Instant::now();
    for i in 0..n {
        let r = &ROUTES[rng.gen_range(0..ROUTES.len())];
        let (method, route) = r.key.split_once(' ').unwrap();
        let id = if rng.gen_bool(0.7) {
            if r.kind == Kind::Org {
                TEST_ORG.to_string()
            } else {
                ws.clone()
            }
        } else if rng.gen_bool(0.5) {
            pick(&mut rng, &ids)
        } else {
            junk(&mut rng).replace('/', "")
        };
        let name = if rng.gen_bool(0.6) {
            pick(&mut rng, &names)
        } else {
            junk(&mut rng).replace('/', "")
        };
        let op_id = if rng.gen_bool(0.5) {
            format!("op-{}-{:08x}", rng.gen::<u32>(), rng.gen::<u32>())
        } else {
            junk(&mut rng).replace('/', "")
        };
        let mut params = json!({});
        if r.kind != Kind::Global {
            params["id"] = json!(id);
        }
        if route.contains("{name}") {
            params["name"] = json!(name);
        }
        if route.contains("{op_id}") {
            params["op_id"] = json!(op_id);
        }
        // As a client sends them: percent-encoded in the raw path and query.
        let path = route
            .replace("{id}", &enc(&id))
            .replace("{name}", &enc(&name))
            .replace("{op_id}", &enc(&op_id));
        let mut query = Vec::new();
        for key in ["limit", "next", "runtime", "source"] {
            if rng.gen_bool(0.3) {
                let v = match key {
                    "limit" => pick(
                        &mut rng,
                        &[
                            "0",
                            "1",
                            "20",
                            "100",
                            "101",
                            "-1",
                            "x",
                            "99999999999999999999",
                        ]
                        .map(String::from),
                    ),
                    "source" => pick(&mut rng, &sources),
                    "runtime" => pick(&mut rng, &["claude-code", "hermes", ""].map(String::from)),
                    _ => junk(&mut rng),
                };
                query.push(format!("{key}={}", enc(&v)));
            }
        }
        let body: Option<String> = match (method, rng.gen_range(0..10)) {
            ("POST", 0) => Some(junk(&mut rng)),
            ("POST", 1) => Some(json!({"source": 42}).to_string()),
            ("POST", 2) => Some(json!({"source": pick(&mut rng, &sources), "sha256": junk(&mut rng)}).to_string()),
            ("POST", 3) => Some(format!("{{\"source\":\"{}\"}}", "a".repeat(70 * 1024))),
            ("POST", _) => Some(json!({"source": pick(&mut rng, &sources)}).to_string()),
            ("PUT", 0) => Some(junk(&mut rng)),
            ("PUT", 1) => Some(json!({"plugins": [pick(&mut rng, &names)]}).to_string()),
            ("PUT", 2) => Some(json!({"plugins": [{"name": pick(&mut rng, &names), "sources": [junk(&mut rng)]}]}).to_string()),
            ("PUT", 3) => Some(json!({"plugins": [{"name": "tools", "sources": ["github://acme/"], "digest": junk(&mut rng)}]}).to_string()),
            ("PUT", 4) => Some(json!({"plugins": "x"}).to_string()),
            ("PUT", _) => Some(json!({"plugins": []}).to_string()),
            _ => None,
        };
        let token = match rng.gen_range(0..20) {
            0 => None,
            1 => Some(enc(&junk(&mut rng))),
            2 => Some(token(TEST_ORG, None, "read")),
            3 => Some(token("globex", None, "read write admin")),
            _ => Some(owner_token().to_string()),
        };
        let req = as_caller(
            event_with_query(
                method,
                route,
                &path,
                params,
                body.as_deref(),
                &query.join("&"),
            ),
            token.as_deref(),
        );
        let (resp, checked) = send_unchecked(&app, req).await;
        let status = resp.status().as_u16();
        *statuses.entry(status).or_default() += 1;
        if status >= 500 && status != 502 && status != 503 && status != 504 {
            five_hundreds.push(format!("#{i} {} {path}: {:?}", r.key, resp.body()));
        }
        if let Err(e) = checked {
            breaks.push(format!("#{i} {} {path}: {e}", r.key));
        }
    }
    eprintln!(
        "api fuzz: seed {seed}, {n} requests in {:.1} s, statuses {statuses:?}, {} responses of 500, {} breaking openapi.yaml",
        started.elapsed().as_secs_f64(),
        five_hundreds.len(),
        breaks.len()
    );
    assert!(five_hundreds.is_empty(), "seed {seed}: {five_hundreds:#?}");
    assert!(breaks.is_empty(), "seed {seed}: {breaks:#?}");
    assert_eq!(statuses.values().sum::<usize>(), n);
}
