//! The function binaries run as Lambda runs them: a process of its own that
//! polls a Runtime API for invocations. This is a small Runtime API (the
//! 2018-06-01 interface: `invocation/next`, `.../response`, `.../error`,
//! `init/error`) so a test can start the real `install` or `reinstall`
//! binary, hand it an event, and SIGKILL it in the middle, as Lambda does at
//! a timeout or an out-of-memory.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::*;

#[derive(Default)]
struct Inner {
    queue: Mutex<VecDeque<(String, Value)>>,
    queued: Notify,
    /// Request id → the function's response (Ok) or reported error (Err).
    done: Mutex<HashMap<String, Result<Value, Value>>>,
    finished: Notify,
    /// Bumped when the function process is killed: a `next` poll that the
    /// dead process left waiting must not take the next event.
    epoch: std::sync::atomic::AtomicU64,
}

pub struct RuntimeApi {
    /// `host:port`, what `AWS_LAMBDA_RUNTIME_API` holds.
    pub addr: String,
    inner: Arc<Inner>,
}

impl RuntimeApi {
    pub async fn start() -> RuntimeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let inner = Arc::new(Inner::default());
        let shared = inner.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, shared.clone()));
            }
        });
        RuntimeApi { addr, inner }
    }

    /// The process polling us is gone: polls it left waiting end without
    /// an event (Lambda's runtime service does the same for a dead sandbox).
    pub fn forget_waiters(&self) {
        self.inner
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.queued.notify_waiters();
    }

    /// Queues an invocation; its request id.
    pub fn invoke(&self, event: Value) -> String {
        let id = unique("req");
        self.inner
            .queue
            .lock()
            .unwrap()
            .push_back((id.clone(), event));
        self.inner.queued.notify_waiters();
        self.inner.queued.notify_one();
        id
    }

    /// The outcome of invocation `id`, once the function reported it; `None`
    /// after `limit` (a killed function never reports).
    pub async fn outcome(&self, id: &str, limit: Duration) -> Option<Result<Value, Value>> {
        let wait = async {
            loop {
                let finished = self.inner.finished.notified();
                if let Some(r) = self.inner.done.lock().unwrap().remove(id) {
                    return r;
                }
                finished.await;
            }
        };
        tokio::time::timeout(limit, wait).await.ok()
    }
}

struct HttpRequest {
    method: String,
    path: String,
    body: Vec<u8>,
}

async fn read_request(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<HttpRequest> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let (mut length, mut chunked) = (0usize, false);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await.ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = v.trim().parse().ok()?,
            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await.ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(length, 0);
        r.read_exact(&mut body).await.ok()?;
    }
    Some(HttpRequest { method, path, body })
}

async fn serve(conn: TcpStream, inner: Arc<Inner>) {
    let (read, mut write) = conn.into_split();
    let mut read = BufReader::new(read);
    const BASE: &str = "/2018-06-01/runtime/";
    while let Some(req) = read_request(&mut read).await {
        let route = req.path.strip_prefix(BASE).unwrap_or("");
        let (status, headers, body) = if req.method == "GET" && route == "invocation/next" {
            let epoch = inner.epoch.load(std::sync::atomic::Ordering::SeqCst);
            let (id, event) = loop {
                let queued = inner.queued.notified();
                if inner.epoch.load(std::sync::atomic::Ordering::SeqCst) != epoch {
                    return;
                }
                if let Some(next) = inner.queue.lock().unwrap().pop_front() {
                    break next;
                }
                queued.await;
            };
            let deadline = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                + 300_000;
            let headers = format!(
                "Lambda-Runtime-Aws-Request-Id: {id}\r\nLambda-Runtime-Deadline-Ms: {deadline}\r\n\
                 Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:123456789012:function:test\r\n\
                 Lambda-Runtime-Trace-Id: Root=1-00000000-000000000000000000000000\r\n"
            );
            (200, headers, event.to_string().into_bytes())
        } else if let Some(rest) = route.strip_prefix("invocation/") {
            let (id, what) = rest.split_once('/').unwrap_or((rest, ""));
            let value: Value = serde_json::from_slice(&req.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&req.body).into()));
            let outcome = match what {
                "response" => Ok(value),
                _ => Err(value),
            };
            inner.done.lock().unwrap().insert(id.to_string(), outcome);
            inner.finished.notify_waiters();
            (202, String::new(), br#"{"status":"OK"}"#.to_vec())
        } else if route == "init/error" {
            (202, String::new(), br#"{"status":"OK"}"#.to_vec())
        } else {
            (404, String::new(), b"{}".to_vec())
        };
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n",
            body.len()
        );
        if write.write_all(head.as_bytes()).await.is_err() || write.write_all(&body).await.is_err()
        {
            return;
        }
    }
}

/// The dev build of a function binary (built once per test process).
pub fn function_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    BUILT.get_or_init(|| {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(repo_root())
            .args(["build", "-q", "-p", "install", "-p", "reinstall"])
            .status()
            .expect("cargo build");
        assert!(status.success(), "cargo build of the functions failed");
    });
    target.join("debug").join(name)
}

/// `binary` as Lambda starts it: only `env` (a deployment's) and the
/// runtime's own variables, the Runtime API at `api_addr`.
pub fn runtime_command(binary: &Path, api_addr: &str, env: &[(String, String)]) -> Command {
    let mut c = Command::new(binary);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("AWS_LAMBDA_RUNTIME_API", api_addr)
        .env("AWS_LAMBDA_FUNCTION_NAME", binary.file_name().unwrap())
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/test")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "test");
    c
}

/// A function process: the real binary, its environment as a deployment's
/// (endpoints, bucket, tokens, profiles) plus the Runtime API's address.
pub struct Function {
    child: Child,
}

impl Function {
    pub fn start(
        binary: &Path,
        api: &RuntimeApi,
        env: &[(String, String)],
        log: &Path,
    ) -> Function {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = runtime_command(binary, &api.addr, env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the function");
        Function { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as Lambda ends an invocation at its timeout.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The environment of a deployed function, pointed at the local stack and
/// at this fixture's bucket, host and config dir; `tmp` is its temp dir.
pub fn function_env(f: &Fixture, tmp: &Path) -> Vec<(String, String)> {
    let s = stack();
    let profiles: serde_json::Map<String, Value> = f
        .config()
        .profiles
        .iter()
        .map(|(k, p)| {
            (
                k.clone(),
                json!({"config_dir": p.config_dir, "restart": p.restart}),
            )
        })
        .collect();
    let mut env: Vec<(String, String)> = [
        ("AWS_ENDPOINT_URL", s.var("AWS_ENDPOINT_URL")),
        (
            "AWS_ENDPOINT_URL_EC2_INSTANCE_CONNECT",
            s.var("AWS_ENDPOINT_URL_EC2_INSTANCE_CONNECT"),
        ),
        ("AWS_ENDPOINT_URL_SSM", s.var("AWS_ENDPOINT_URL_SSM")),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("PLUGIN_BUCKET", &f.bucket),
        ("PLUGIN_SSH_USER", LOGIN_USER),
        ("PLUGIN_HOST_COMMAND_PREFIX", "sudo -n"),
        ("PLUGIN_SSH_ADDRESS_TAG", "molecule:local-address"),
        ("PLUGIN_JWT_ISSUER", TEST_ISSUER),
        ("PLUGIN_JWT_AUDIENCE", TEST_AUDIENCE),
        ("PLUGIN_JWKS_PARAMETER", JWKS_PARAMETER),
        ("PLUGIN_FETCH_TEST_ALLOW_ADDRESSES", "127.0.0.1"),
        ("RUST_LOG", "info"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.push((
        "PLUGIN_CONFIG_DIR_ROOTS".into(),
        f.dir.path().to_string_lossy().into_owned(),
    ));
    env.push((
        "PLUGIN_RUNTIME_PROFILES".into(),
        Value::Object(profiles).to_string(),
    ));
    env.push(("TMPDIR".into(), tmp.to_string_lossy().into_owned()));
    env
}

/// An API Gateway (HTTP API, payload 2.0) event as the edge hands it on.
pub fn api_event(method: &str, route: &str, path: &str, id: &str, body: Option<&str>) -> Value {
    json!({
        "version": "2.0",
        "routeKey": format!("{method} {route}"),
        "rawPath": path,
        "rawQueryString": "",
        "headers": {
            "content-type": "application/json",
            "authorization": format!("Bearer {}", owner_token()),
        },
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "local",
            "domainName": "local",
            "domainPrefix": "local",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1",
                     "sourceIp": "127.0.0.1", "userAgent": "test"},
            "requestId": unique("apigw"),
            "routeKey": format!("{method} {route}"),
            "stage": "$default",
            "time": "01/Dec/2026:00:00:00 +0000",
            "timeEpoch": 1796083200000u64
        },
        "pathParameters": {"id": id},
        "body": body,
        "isBase64Encoded": false
    })
}
