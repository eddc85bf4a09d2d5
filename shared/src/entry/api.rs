//! API Gateway (HTTP API, payload v2) entrypoints: establish the caller
//! from the bearer token (401 before anything else), parse, call the
//! operation under its deadline, render JSON. The use cases apply the
//! caller's scope and tenancy. Every error response is built in
//! `error_response`, from `ErrorKind::status`.

use std::future::Future;
use std::time::Instant;

use lambda_http::http::StatusCode;
use lambda_http::{Body, Request, RequestExt, Response};
use serde::Serialize;
use serde_json::{json, Value};

use crate::domain::allowlist::AllowEntry;
use crate::domain::caller::{Caller, Scope};
use crate::domain::error::{Error, Result};
use crate::domain::host::Host;
use crate::domain::job::Work;
use crate::domain::plugin::validate_name;
use crate::ports::Deps;
use crate::usecases::background::{within_or_hand_off, Change, Done};
use crate::usecases::install::{self, InstallRequest};
use crate::usecases::{allowlist as allowlists, query};

/// Request bodies are tiny JSON documents; anything bigger is a mistake.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub async fn install(deps: &Deps, req: Request) -> Response<Body> {
    let rid = request_id(&req);
    let r = async {
        let started = Instant::now();
        let caller = authenticate(deps, &req).await?;
        caller.require(Scope::Write)?;
        let ws = path_param(&req, "id")?;
        let body = parse_install_body(req.body())?;
        let work = Work::Install {
            source: body.source.clone(),
            sha256: body.sha256.clone(),
        };
        // Only an authorized change may go on in the background. The org's
        // allowlist is read meanwhile; it is looked at only once authorized.
        let (host, ahead) = deadline(
            deps,
            install::authorize_reading_allowlist(deps, &caller, &ws),
        )
        .await?;
        let change = change(&caller, &ws, &host, work, started);
        let op = Box::pin(install::install_on(
            deps,
            host.clone(),
            &ws,
            body,
            None,
            ahead,
        ));
        within_or_hand_off(deps, change, op).await
    }
    .await;
    respond_done(&rid, "install", r)
}

pub async fn uninstall(deps: &Deps, req: Request) -> Response<Body> {
    let rid = request_id(&req);
    let r = async {
        let started = Instant::now();
        let caller = authenticate(deps, &req).await?;
        caller.require(Scope::Write)?;
        let ws = path_param(&req, "id")?;
        let name = path_param(&req, "name")?;
        validate_name(&name)?;
        let work = Work::Uninstall {
            plugin: name.clone(),
        };
        let host = deadline(deps, install::authorize(deps, &caller, &ws)).await?;
        let change = change(&caller, &ws, &host, work, started);
        let op = Box::pin(install::uninstall_on(deps, host.clone(), &ws, &name, None));
        within_or_hand_off(deps, change, op).await
    }
    .await;
    respond_done(&rid, "uninstall", r)
}

/// A change authorized for `host`, and the time spent so far.
fn change<'a>(
    caller: &'a Caller,
    ws: &'a str,
    host: &'a Host,
    work: Work,
    started: Instant,
) -> Change<'a> {
    Change {
        caller,
        workspace: ws,
        org: host.org_id.as_deref(),
        work,
        spent: started.elapsed(),
    }
}

fn respond_done<T: Serialize>(rid: &str, op: &str, r: Result<Done<T>>) -> Response<Body> {
    match r {
        Ok(Done::Finished(v)) => respond(rid, op, Ok(v)),
        Ok(Done::Accepted(id)) => {
            tracing::info!(request_id = rid, op, operation_id = %id, "continues in the background");
            json_response(
                202,
                &json!({ "operation_id": id, "status": "running", "request_id": rid }),
                rid,
            )
        }
        Err(e) => error_response(rid, op, e),
    }
}

pub async fn list(deps: &Deps, req: Request) -> Response<Body> {
    let rid = request_id(&req);
    let r = async {
        let caller = authenticate(deps, &req).await?;
        let ws = path_param(&req, "id")?;
        deadline(deps, query::list(deps, &caller, &ws)).await
    }
    .await;
    respond(&rid, "list", r)
}

/// `GET /workspaces/{id}/plugins/operations?limit=&next=` (newest first)
/// and `GET /workspaces/{id}/plugins/operations/{op_id}`.
pub async fn operations(deps: &Deps, req: Request) -> Response<Body> {
    let rid = request_id(&req);
    let r: Result<Value> = async {
        let caller = authenticate(deps, &req).await?;
        let ws = path_param(&req, "id")?;
        if let Some(op) = req.path_parameters_ref().and_then(|p| p.first("op_id")) {
            let op = percent_decode(op);
            return to_json(&deadline(deps, query::operation(deps, &caller, &ws, &op)).await?);
        }
        let limit = match query_param(&req, "limit") {
            None => 20,
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| Error::bad_request("limit must be a number from 1 to 100"))?,
        };
        let next = query_param(&req, "next");
        let next = next.as_deref();
        let page = deadline(deps, query::operations(deps, &caller, &ws, limit, next)).await?;
        Ok(json!({ "operations": page.records, "next": page.next }))
    }
    .await;
    respond(&rid, "operations", r)
}

/// The read routes of the canvas, one function: `GET /plugins`,
/// `GET /plugins/sources`, `GET /workspaces/{id}/plugins/available`,
/// `GET /workspaces/{id}/plugins/compatibility`.
pub async fn catalog(deps: &Deps, req: Request) -> Response<Body> {
    let rid = request_id(&req);
    let route = route_segments(&req);
    let r: Result<Value> = async {
        let caller = authenticate(deps, &req).await?;
        match route.as_slice() {
            ["plugins"] => {
                caller.require(Scope::Read)?;
                let runtime = query_param(&req, "runtime");
                to_json(&query::registry(&deps.registry, runtime.as_deref()).await)
            }
            ["plugins", "sources"] => {
                caller.require(Scope::Read)?;
                let mut schemes = crate::domain::source::SCHEMES.to_vec();
                schemes.sort();
                Ok(json!({ "schemes": schemes }))
            }
            ["workspaces", _, "plugins", "available"] => {
                let ws = path_param(&req, "id")?;
                to_json(&deadline(deps, query::available(deps, &caller, &ws)).await?)
            }
            ["workspaces", _, "plugins", "compatibility"] => {
                let ws = path_param(&req, "id")?;
                let runtime = query_param(&req, "runtime")
                    .filter(|r| !r.trim().is_empty())
                    .ok_or_else(|| Error::bad_request("missing query parameter \"runtime\""))?;
                let found = query::compatibility(deps, &caller, &ws, &runtime);
                to_json(&deadline(deps, found).await?)
            }
            _ => Err(Error::not_found("no such route")),
        }
    }
    .await;
    respond(&rid, "catalog", r)
}

/// `GET /workspaces/{id}/plugins/{name}/download?source=<src>`: 302 to a
/// short-lived presigned URL of the canonical archive.
pub async fn download(deps: &Deps, req: Request) -> Response<Body> {
    let rid = request_id(&req);
    let r = async {
        let caller = authenticate(deps, &req).await?;
        caller.require(Scope::Write)?;
        let ws = path_param(&req, "id")?;
        let name = path_param(&req, "name")?;
        let source = query_param(&req, "source");
        let url = install::download(deps, &caller, &ws, &name, source.as_deref());
        deadline(deps, url).await
    }
    .await;
    match r {
        Ok(url) => {
            tracing::info!(request_id = %rid, op = "download", "ok");
            Response::builder()
                .status(StatusCode::FOUND)
                .header("location", url)
                .header("x-request-id", &rid)
                .body(Body::Empty)
                .expect("static response parts are valid")
        }
        Err(e) => error_response(&rid, "download", e),
    }
}

/// `GET` and `PUT /orgs/{id}/plugins/allowlist`.
pub async fn allowlist(deps: &Deps, req: Request) -> Response<Body> {
    let rid = request_id(&req);
    let r = async {
        let caller = authenticate(deps, &req).await?;
        let org = path_param(&req, "id")?;
        if req.method() == lambda_http::http::Method::PUT {
            caller.require(Scope::Admin)?;
            let entries = parse_allowlist_body(req.body())?;
            deadline(deps, allowlists::put(deps, &caller, &org, entries)).await
        } else {
            deadline(deps, allowlists::get(deps, &caller, &org)).await
        }
    }
    .await;
    respond(&rid, "allowlist", r)
}

/// `{"plugins": [...]}`, each item a name (the old form) or an entry
/// object (`domain::allowlist`).
fn parse_allowlist_body(body: &Body) -> Result<Vec<AllowEntry>> {
    let v: Value = serde_json::from_slice(body_bytes(body)?)
        .map_err(|_| Error::bad_request("request body must be a JSON object"))?;
    let Some(Value::Array(items)) = v.get("plugins") else {
        return Err(Error::bad_request(
            "\"plugins\" must be a list of plugin names or entries",
        ));
    };
    items
        .iter()
        .map(|i| {
            serde_json::from_value::<AllowEntry>(i.clone()).map_err(|_| {
                Error::bad_request(format!(
                    "invalid allowlist entry {i}: a plugin name, or {{\"name\", \"sources\", \"digest\"}}"
                ))
            })
        })
        .collect()
}

/// The caller the request's bearer token proves (401 otherwise).
async fn authenticate(deps: &Deps, req: &Request) -> Result<Caller> {
    let header = req
        .headers()
        .get(lambda_http::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    deps.auth.authenticate(header).await
}

/// The route's own path segments, whatever prefix the invoker added
/// (a function URL under `cargo lambda watch` puts `/lambda-url/<fn>` first).
fn route_segments(req: &Request) -> Vec<&str> {
    let path = req.raw_http_path();
    let path = if path.is_empty() {
        req.uri().path()
    } else {
        path
    };
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let start = segs
        .iter()
        .position(|s| matches!(*s, "plugins" | "workspaces" | "orgs"))
        .unwrap_or(segs.len());
    segs[start..].to_vec()
}

fn to_json<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(Error::internal)
}

fn query_param(req: &Request, key: &str) -> Option<String> {
    req.query_string_parameters_ref()
        .and_then(|q| q.first(key))
        .map(str::to_string)
}

/// API Gateway gives up at 29 s; answer 504 ourselves before that, with a
/// body, rather than let the caller see a bare gateway timeout.
async fn deadline<T>(deps: &Deps, fut: impl Future<Output = Result<T>>) -> Result<T> {
    crate::domain::deadline::within(deps.config.operation_timeout, fut).await
}

/// The body's bytes, refused over the size limit.
fn body_bytes(body: &Body) -> Result<&[u8]> {
    let bytes: &[u8] = match body {
        Body::Text(t) => t.as_bytes(),
        Body::Binary(b) => b,
        _ => b"",
    };
    if bytes.len() > MAX_BODY_BYTES {
        return Err(Error::bad_request(format!(
            "request body is larger than {} KiB",
            MAX_BODY_BYTES / 1024
        )));
    }
    Ok(bytes)
}

fn parse_install_body(body: &Body) -> Result<InstallRequest> {
    let bytes = body_bytes(body)?;
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|_| Error::bad_request("request body must be a JSON object"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| Error::bad_request("request body must be a JSON object"))?;
    let source = match obj.get("source") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(Error::bad_request("\"source\" must be a string")),
        None => return Err(Error::bad_request("missing \"source\"")),
    };
    let sha256 = match obj.get("sha256") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(Error::bad_request("\"sha256\" must be a string")),
    };
    Ok(InstallRequest { source, sha256 })
}

/// Path parameters from API Gateway; when invoked through a function URL
/// (as `cargo lambda watch` serves it) they are parsed from the path.
fn path_param(req: &Request, key: &str) -> Result<String> {
    if let Some(v) = req.path_parameters_ref().and_then(|p| p.first(key)) {
        return Ok(v.to_string());
    }
    let path = req.raw_http_path();
    let path = if path.is_empty() {
        req.uri().path()
    } else {
        path
    };
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let at = segs.iter().position(|s| *s == "workspaces");
    let at = at.or_else(|| segs.iter().position(|s| *s == "orgs"));
    let found = at.and_then(|i| match key {
        "id" => segs.get(i + 1),
        "name" if segs.get(i + 2) == Some(&"plugins") => segs.get(i + 3),
        _ => None,
    });
    found
        .map(|s| percent_decode(s))
        .ok_or_else(|| Error::bad_request(format!("missing path parameter {key:?}")))
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn request_id(req: &Request) -> String {
    use lambda_http::request::RequestContext;
    match req.request_context_ref() {
        Some(RequestContext::ApiGatewayV2(c)) => c.request_id.clone(),
        _ => None,
    }
    .or_else(|| req.lambda_context_ref().map(|c| c.request_id.clone()))
    .filter(|s| !s.is_empty())
    .unwrap_or_else(|| format!("local-{:016x}", rand::random::<u64>()))
}

fn json_response(status: u16, body: &Value, rid: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .header("x-request-id", rid)
        .body(Body::Text(body.to_string()))
        .expect("static response parts are valid")
}

fn respond<T: Serialize>(rid: &str, op: &str, r: Result<T>) -> Response<Body> {
    match r {
        Ok(v) => {
            tracing::info!(request_id = rid, op, "ok");
            let body = serde_json::to_value(v).unwrap_or(Value::Null);
            json_response(200, &body, rid)
        }
        Err(e) => error_response(rid, op, e),
    }
}

/// The only place errors become responses: public message and fields in the
/// body, everything else in the log line, joined by the request id.
pub fn error_response(rid: &str, op: &str, e: Error) -> Response<Body> {
    let status = e.status();
    if status >= 500 {
        tracing::error!(request_id = rid, op, status, error = %e.message, detail = ?e.detail, "failed");
    } else {
        tracing::warn!(request_id = rid, op, status, error = %e.message, detail = ?e.detail, "rejected");
    }
    let mut body = json!({ "error": e.message, "request_id": rid });
    if let Value::Object(m) = &mut body {
        for (k, v) in e.fields {
            m.entry(k).or_insert(v);
        }
    }
    let mut resp = json_response(status, &body, rid);
    if status == 401 {
        resp.headers_mut().insert(
            lambda_http::http::header::WWW_AUTHENTICATE,
            lambda_http::http::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_rules() {
        let big = Body::Text(format!("{{\"source\":\"{}\"}}", "a".repeat(MAX_BODY_BYTES)));
        assert_eq!(parse_install_body(&big).unwrap_err().status(), 400);
        assert_eq!(
            parse_install_body(&Body::Text("nope".into()))
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            parse_install_body(&Body::Text("[]".into()))
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            parse_install_body(&Body::Text("{}".into()))
                .unwrap_err()
                .status(),
            400
        );
        let ok =
            parse_install_body(&Body::Text("{\"source\":\"x\",\"sha256\":\"ab\"}".into())).unwrap();
        assert_eq!(
            (ok.source.as_str(), ok.sha256.as_deref()),
            ("x", Some("ab"))
        );
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%a\u{e9}"), "%a\u{e9}");
        assert_eq!(percent_decode("x%41"), "xA");
    }
}
