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
            assert!(op["responses"]["401"].is_object(), "{method} {path} has no 401");
            assert!(op.get("security").is_none(), "{method} {path} overrides security");
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
    Route { key: "POST /workspaces/{id}/plugins", scope: "write", kind: Kind::Workspace },
    Route { key: "GET /workspaces/{id}/plugins", scope: "read", kind: Kind::Workspace },
    Route { key: "GET /workspaces/{id}/plugins/available", scope: "read", kind: Kind::Workspace },
    Route { key: "GET /workspaces/{id}/plugins/compatibility", scope: "read", kind: Kind::Workspace },
    Route { key: "GET /workspaces/{id}/plugins/operations", scope: "read", kind: Kind::Workspace },
    Route { key: "GET /workspaces/{id}/plugins/operations/{op_id}", scope: "read", kind: Kind::Workspace },
    Route { key: "GET /workspaces/{id}/plugins/{name}/download", scope: "write", kind: Kind::Workspace },
    Route { key: "DELETE /workspaces/{id}/plugins/{name}", scope: "write", kind: Kind::Workspace },
    Route { key: "GET /orgs/{id}/plugins/allowlist", scope: "read", kind: Kind::Org },
    Route { key: "PUT /orgs/{id}/plugins/allowlist", scope: "admin", kind: Kind::Org },
    Route { key: "GET /plugins", scope: "read", kind: Kind::Global },
    Route { key: "GET /plugins/sources", scope: "read", kind: Kind::Global },
];

/// The status each case must get on `r`.
fn expected(r: &Route, case: As) -> u16 {
    let ok = if r.key.starts_with("GET /workspaces/{id}/plugins/{name}/download") { 302 } else { 200 };
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
        "POST /workspaces/{id}/plugins" => (Some(json!({"source": w.source}).to_string()), String::new()),
        "PUT /orgs/{id}/plugins/allowlist" => (Some(r#"{"plugins": []}"#.to_string()), String::new()),
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
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (p, d) in [("plugin.yaml", &b"name: matrix-tool\nversion: 1.0.0\n"[..]), ("rules/m.md", b"m\n")] {
            let mut h = tar::Header::new_gnu();
            h.set_size(d.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, p, d).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    };
    srv.file("m/matrix-tool.tar.gz", &archive);
    let source = format!("{}/files/m/matrix-tool.tar.gz#sha256={}", srv.base(), sha256_hex(&archive));
    let mut cfg = f.config();
    cfg.extra_ca_pem = Some(std::fs::read(srv.tls.join("ca.pem")).unwrap());
    let app = f.app_with(cfg);
    World { f, srv, app, source, op_id: "op-0-00000000".into() }
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
                assert_eq!(seen(&w.f, &w.srv).await, before, "{access:?} {} as {case:?} left a trace", r.key);
            }
        }
    }
    assert!(refused >= 12 * 6, "{refused}");
    // An unknown workspace answers exactly as another org's does.
    let unknown = as_caller(list_req("no-such-ws"), Some(owner_token()));
    let (s, b) = api(&w.app, unknown).await;
    assert_eq!((s, b["error"].as_str()), (404, Some("workspace \"no-such-ws\" was not found")));

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
        assert_eq!(status, expected(r, As::Valid), "{access:?} {} valid: {body}", r.key);
        if i == 0 {
            assert_eq!(body["plugin"], "matrix-tool", "{body}");
            assert!(w.f.plugin_dir("matrix-tool").join("rules/m.md").exists());
        }
    }
    assert!(!w.f.plugin_dir("matrix-tool").exists(), "uninstalled last");
    assert!(w.srv.requests() > before.fetches, "the valid install did fetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_matrix_over_ssh() {
    matrix(Access::Ssh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_matrix_over_ssm() {
    matrix(Access::Ssm).await;
}
