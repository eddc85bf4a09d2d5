//! The canvas's read endpoints and the org allowlist, on the local stack.

use acceptance::*;
use serde_json::{json, Value};

async fn seed(f: &Fixture) {
    f.publish("cc-only", &[("plugin.yaml", b"name: cc-only\nversion: 1.0.0\ndescription: d\nauthor: a\ntags: [x]\nskills: [s]\nruntimes: [claude_code]\n")]).await;
    f.publish(
        "hermes-only",
        &[(
            "plugin.yaml",
            b"name: hermes-only\nversion: 2.0.0\nruntimes: [hermes]\n",
        )],
    )
    .await;
    f.publish(
        "anywhere",
        &[
            ("plugin.yaml", b"name: anywhere\nversion: 0.1.0\n"),
            ("rules/r.md", b"r\n"),
        ],
    )
    .await;
}

fn names(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_sources_and_available() {
    let f = Fixture::new().await;
    let app = f.app();
    // Empty registry: [].
    let (s, b) = catalog(&app, "/plugins", "/plugins", json!({}), "").await;
    assert_eq!((s, b), (200, json!([])));
    seed(&f).await;

    let (s, b) = catalog(&app, "/plugins", "/plugins", json!({}), "").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(names(&b), ["anywhere", "cc-only", "hermes-only"]);
    assert_eq!(
        b[1],
        json!({"name": "cc-only", "version": "1.0.0", "description": "d", "author": "a",
               "tags": ["x"], "skills": ["s"], "runtimes": ["claude_code"]})
    );
    let (s, b) = catalog(
        &app,
        "/plugins",
        "/plugins",
        json!({}),
        "runtime=claude-code",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(names(&b), ["anywhere", "cc-only"]);
    assert!(b
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["supported_on_runtime"] == true));

    let (s, b) = catalog(&app, "/plugins/sources", "/plugins/sources", json!({}), "").await;
    assert_eq!(
        (s, b),
        (200, json!({"schemes": ["github", "https", "local"]}))
    );

    let route = "/workspaces/{id}/plugins/available";
    let path = format!("/workspaces/{}/plugins/available", f.workspace);
    let (s, b) = catalog(&app, route, &path, json!({"id": f.workspace}), "").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        names(&b),
        ["anywhere", "cc-only"],
        "filtered by the workspace's runtime"
    );
    let (s, _) = catalog(
        &app,
        route,
        "/workspaces/ws-none/plugins/available",
        json!({"id": "ws-none"}),
        "",
    )
    .await;
    assert_eq!(s, 404);

    // An unreadable registry answers [] rather than an error.
    let mut cfg = f.config();
    cfg.bucket = "pd-no-such-bucket".into();
    let (s, b) = catalog(&f.app_with(cfg), "/plugins", "/plugins", json!({}), "").await;
    assert_eq!((s, b), (200, json!([])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_compatibility_follow_the_runtime() {
    let f = Fixture::new().await;
    let app = f.app();
    seed(&f).await;
    for p in ["cc-only", "anywhere"] {
        let (s, b) = install(&app, &f.workspace, &format!(r#"{{"source":"{p}"}}"#)).await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, b) = list(&app, &f.workspace).await;
    assert_eq!(s, 200);
    assert_eq!(names(&b), ["anywhere", "cc-only"]);
    assert!(
        b.as_array()
            .unwrap()
            .iter()
            .all(|p| p["supported_on_runtime"] == true),
        "{b}"
    );

    let route = "/workspaces/{id}/plugins/compatibility";
    let path = format!("/workspaces/{}/plugins/compatibility", f.workspace);
    let params = json!({"id": f.workspace});
    let (s, b) = catalog(&app, route, &path, params.clone(), "runtime=hermes").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b,
        json!({"target_runtime": "hermes", "compatible": ["anywhere"], "incompatible": ["cc-only"], "all_compatible": false})
    );
    let (s, b) = catalog(&app, route, &path, params.clone(), "runtime=claude_code").await;
    assert_eq!((s, b["all_compatible"].clone()), (200, json!(true)));
    let (s, b) = catalog(&app, route, &path, params, "").await;
    assert_eq!(s, 400, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_allowlist_allows_denies_and_fails_closed() {
    let f = Fixture::new().await;
    let app = f.app();
    seed(&f).await;
    let org = TEST_ORG.to_string();

    let (s, b) = allowlist(&app, "GET", &org, None).await;
    assert_eq!(
        (s, b),
        (
            200,
            json!({"org_id": org, "plugins": [], "allow_all": true})
        )
    );
    let (s, b) = allowlist(
        &app,
        "PUT",
        &org,
        Some(r#"{"plugins": ["cc-only", "../x"]}"#),
    )
    .await;
    assert_eq!(s, 400);
    assert!(b["error"].as_str().unwrap().contains("../x"), "{b}");
    let (s, b) = allowlist(&app, "PUT", &org, Some(r#"{"plugins": ["cc-only"]}"#)).await;
    assert_eq!(
        (s, b),
        (
            200,
            json!({"org_id": org, "plugins": [
                {"name": "cc-only", "sources": ["local://cc-only"]}
            ], "allow_all": false})
        )
    );
    let (s, b) = allowlist(&app, "GET", &org, None).await;
    assert_eq!(b["plugins"][0]["name"], "cc-only", "{s} {b}");

    // Denied: 403 with the exact message, nothing staged, nothing on the host.
    let (s, b) = install(&app, &f.workspace, r#"{"source":"anywhere"}"#).await;
    assert_eq!(s, 403, "{b}");
    assert_eq!(
        b["error"],
        "the org allowlist admits no plugin from local://anywhere"
    );
    assert!(f.keys("staged/").await.is_empty());
    assert!(!f.touched());
    // Allowed.
    let (s, b) = install(&app, &f.workspace, r#"{"source":"cc-only"}"#).await;
    assert_eq!(s, 200, "{b}");
    // Empty list: everything allowed again.
    let (s, _) = allowlist(&app, "PUT", &org, Some(r#"{"plugins": []}"#)).await;
    assert_eq!(s, 200);
    let (s, b) = install(&app, &f.workspace, r#"{"source":"anywhere"}"#).await;
    assert_eq!(s, 200, "{b}");

    // An unreadable list refuses the install (fail closed) with a 503.
    f.s3.put_object()
        .bucket(&f.bucket)
        .key(format!("orgs/{org}/plugins/allowlist.json"))
        .body(b"{not json".to_vec().into())
        .send()
        .await
        .unwrap();
    let (s, b) = install(&app, &f.workspace, r#"{"source":"hermes-only"}"#).await;
    assert_eq!(s, 503, "{b}");
    assert!(b["error"].as_str().unwrap().contains("allowlist"), "{b}");
    assert!(!f.plugin_dir("hermes-only").exists());
}

/// The allowlist function's own wiring (S3 and SSM only): its routes work,
/// and a route that needs a workspace fails closed as an internal error,
/// with nothing of the wiring in the answer.
/// The status and `error` of a route a wiring refuses.
async fn refused(app: &plugin_delivery::App, req: lambda_http::Request) -> (u16, Value) {
    let (status, body) = parts(send_unchecked(app, req).await.0);
    (status, body["error"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_functions_wiring_serves_allowlists_and_nothing_else() {
    let f = Fixture::new().await;
    seed(&f).await;
    let app =
        plugin_delivery::App::without_hosts_with_clients(f.config(), f.s3.clone(), f.ssm.clone());
    let org = TEST_ORG.to_string();
    let (s, b) = allowlist(&app, "PUT", &org, Some(r#"{"plugins": ["cc-only"]}"#)).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = allowlist(&app, "GET", &org, None).await;
    assert_eq!(
        (s, &b["plugins"][0]["name"]),
        (200, &json!("cc-only")),
        "{b}"
    );
    // What it wrote, the full wiring reads.
    let (s, b) = allowlist(&f.app(), "GET", &org, None).await;
    assert_eq!(
        (s, &b["plugins"][0]["name"]),
        (200, &json!("cc-only")),
        "{b}"
    );
    // Anything that needs a workspace's host (API Gateway routes none of
    // it here): refused as an internal error, nothing done.
    for req in [
        list_req(&f.workspace),
        install_req(&f.workspace, r#"{"source":"cc-only"}"#),
    ] {
        assert_eq!(refused(&app, req).await, (500, json!("internal error")));
    }
    assert!(!f.touched());
    assert!(f.keys("staged/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_and_download_functions_wirings_serve_their_routes_and_never_reach_a_host() {
    let f = Fixture::new().await;
    seed(&f).await;
    let (s, b) = install(&f.app(), &f.workspace, r#"{"source":"cc-only"}"#).await;
    assert_eq!(s, 200, "{b}");
    let host_before = (
        tree(&f.plugin_dir("cc-only")),
        tree(&f.book()),
        f.restarts(),
    );
    let cfg = f.config();
    let reads = plugin_delivery::App::for_reads_with_clients(
        cfg.clone(),
        f.s3.clone(),
        f.ec2.clone(),
        f.ssm.clone(),
    );
    let downloads = plugin_delivery::App::for_downloads_with_clients(
        cfg,
        f.s3.clone(),
        f.ec2.clone(),
        f.ssm.clone(),
    )
    .unwrap();

    // list, catalog and operations: what the full wiring did, read through
    // EC2 (whose workspace it is) and S3.
    let (s, b) = list(&reads, &f.workspace).await;
    assert_eq!((s, names(&b)), (200, vec!["cc-only"]), "{b}");
    assert_eq!(b[0]["supported_on_runtime"], json!(true), "{b}");
    let path = format!("/workspaces/{}/plugins/available", f.workspace);
    let (s, b) = catalog(
        &reads,
        "/workspaces/{id}/plugins/available",
        &path,
        json!({"id": f.workspace}),
        "",
    )
    .await;
    assert_eq!((s, names(&b)), (200, vec!["anywhere", "cc-only"]), "{b}");
    let path = format!("/workspaces/{}/plugins/operations", f.workspace);
    let req = get_req(
        "/workspaces/{id}/plugins/operations",
        &path,
        json!({"id": f.workspace}),
        "",
    );
    let (s, b) = api(&reads, req).await;
    assert_eq!(s, 200, "{b}");
    let ops = b["operations"].as_array().expect("a page of records");
    assert_eq!(ops.len(), 1, "{b}");
    assert_eq!(ops[0]["plugin"], json!("cc-only"), "{b}");

    // download: a plugin installed nowhere, resolved, staged and presigned.
    let path = format!("/workspaces/{}/plugins/anywhere/download", f.workspace);
    let req = get_req(
        "/workspaces/{id}/plugins/{name}/download",
        &path,
        json!({"id": f.workspace, "name": "anywhere"}),
        "",
    );
    let resp = send(&downloads, req).await;
    assert_eq!(resp.status().as_u16(), 302);
    let url = resp.headers()["location"].to_str().unwrap().to_string();
    let staged = f.staged_archives().await;
    assert_eq!(staged.len(), 2, "{staged:?}");
    assert!(
        staged.iter().any(|k| url.contains(k.as_str())),
        "{url} {staged:?}"
    );

    // What needs the host: refused as an internal error by either wiring.
    for app in [&reads, &downloads] {
        for req in [
            install_req(&f.workspace, r#"{"source":"anywhere"}"#),
            uninstall_req(&f.workspace, "cc-only"),
        ] {
            assert_eq!(refused(app, req).await, (500, json!("internal error")));
        }
    }
    let host_after = (
        tree(&f.plugin_dir("cc-only")),
        tree(&f.book()),
        f.restarts(),
    );
    assert_eq!(host_after, host_before, "the host was changed");
    assert!(!f.plugin_dir("anywhere").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_redirects_to_the_staged_archive() {
    let f = Fixture::new().await;
    let app = f.app();
    seed(&f).await;
    let route = "/workspaces/{id}/plugins/{name}/download";
    let call = |name: &str, query: &str| {
        let path = format!("/workspaces/{}/plugins/{name}/download", f.workspace);
        let req = get_req(
            route,
            &path,
            json!({"id": f.workspace, "name": name}),
            query,
        );
        send(&app, req)
    };
    let resp = call("cc-only", "").await;
    assert_eq!(resp.status().as_u16(), 302);
    let url = resp.headers()["location"].to_str().unwrap().to_string();
    let staged = f.keys("staged/").await;
    let archive = staged
        .iter()
        .find(|k| k.ends_with(".tar.gz"))
        .expect("staged")
        .clone();
    let digest = archive
        .trim_start_matches("staged/")
        .trim_end_matches(".tar.gz");
    assert!(url.contains(&archive), "{url}");
    // The URL serves the canonical archive itself.
    let bytes = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256_hex(&bytes), digest);

    let (s, b) = parts(call("cc-only", "source=local://anywhere").await);
    assert_eq!(s, 400, "{b}");
    assert_eq!(
        (b["resolved_name"].as_str(), b["requested_name"].as_str()),
        (Some("anywhere"), Some("cc-only"))
    );
    let (s, _) = parts(call("missing", "").await);
    assert_eq!(s, 404);
}

/// The source index only says which staged archive a registry listing
/// built; a forged `plugin.yaml` in it (whoever could write that key)
/// does not make a `sha256` pin pass: the pin is checked against the
/// plugin.yaml inside the archive, whose digest is verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_index_entry_cannot_pass_a_pin() {
    use base64::Engine;
    let f = Fixture::new().await;
    let app = f.app();
    seed(&f).await;
    let real = b"name: cc-only\nversion: 1.0.0\ndescription: d\nauthor: a\ntags: [x]\nskills: [s]\nruntimes: [claude_code]\n";
    let (s, b) = install(&app, &f.workspace, r#"{"source":"cc-only"}"#).await;
    assert_eq!(s, 200, "{b}");
    let index = f.keys("staged/index/").await;
    assert_eq!(index.len(), 1, "{index:?}");
    let forged = b"name: cc-only\nversion: 9.9.9\n";
    let mut entry: Value = serde_json::from_slice(&f.get(&index[0]).await.unwrap()).unwrap();
    entry["manifest"] = json!(base64::engine::general_purpose::STANDARD.encode(forged));
    f.s3.put_object()
        .bucket(&f.bucket)
        .key(&index[0])
        .body(entry.to_string().into_bytes().into())
        .send()
        .await
        .unwrap();
    let pin = |m: &[u8]| json!({"source": "cc-only", "sha256": sha256_hex(m)}).to_string();
    let (s, b) = install(&app, &f.workspace, &pin(forged)).await;
    assert_eq!(s, 422, "the forged plugin.yaml is not the archive's: {b}");
    assert_eq!(b["actual"], sha256_hex(real), "{b}");
    let (s, b) = install(&app, &f.workspace, &pin(real)).await;
    assert_eq!((s, b["version"].as_str()), (200, Some("1.0.0")), "{b}");
}

/// Records carry the tag the bucket's lifecycle rule expires; the desired
/// state beside them does not (it must never expire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_tagged_for_expiry_and_desired_states_are_not() {
    let f = Fixture::new().await;
    let app = f.app();
    seed(&f).await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"cc-only"}"#).await;
    assert_eq!(s, 200, "{b}");
    let tags = |key: String| {
        let f = &f;
        async move {
            let out =
                f.s3.get_object_tagging()
                    .bucket(&f.bucket)
                    .key(key)
                    .send()
                    .await
                    .unwrap();
            out.tag_set()
                .iter()
                .map(|t| (t.key().to_string(), t.value().to_string()))
                .collect::<Vec<_>>()
        }
    };
    let records = f
        .keys(&format!("workspaces/{}/operations/", f.workspace))
        .await;
    assert_eq!(records.len(), 1, "{records:?}");
    let (k, v) = plugin_delivery::adapters::s3::RECORD_TAG;
    assert_eq!(
        tags(records[0].clone()).await,
        vec![(k.to_string(), v.to_string())]
    );
    assert!(tags(format!("workspaces/{}/plugins.json", f.workspace))
        .await
        .is_empty());
}
