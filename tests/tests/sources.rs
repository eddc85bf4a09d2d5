//! Plugin sources beyond the registry: pinned GitHub repositories and
//! pinned https archives, served by the tests' own TLS server
//! (`tests/stack/source_server.py`, a stand-in for GitHub's tarball
//! endpoint), and a private repository whose token is in SSM (moto).

use acceptance::*;
use serde_json::json;

/// A .tar.gz with `entries`, each (path, bytes) or a symlink (path, target).
fn tarball(files: &[(&str, &[u8])], symlinks: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (p, d) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(d.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, p, *d).unwrap();
    }
    for (p, target) in symlinks {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, p, target).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// An app fetching from `srv`; orgs keep their credentials under
/// `credentials` (a path of this test's own) when given.
fn app_for(f: &Fixture, srv: &SourceServer, credentials: Option<&str>) -> plugin_delivery::App {
    let mut cfg = f.config();
    cfg.github_api = srv.base();
    cfg.extra_ca_pem = Some(std::fs::read(srv.tls.join("ca.pem")).unwrap());
    if let Some(path) = credentials {
        cfg.org_credentials_path = path.to_string();
    }
    f.app_with(cfg)
}

const PLUGIN: &[(&str, &[u8])] = &[
    (
        "plugin.yaml",
        b"name: gh-plugin\nversion: 3.1.0\nskills: [gh]\n",
    ),
    ("skills/gh/SKILL.md", b"# GH\n"),
    ("rules/r.md", b"From GitHub.\n"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_sources_by_tag_branch_and_commit() {
    let f = Fixture::new().await;
    let srv = SourceServer::start();
    let app = app_for(&f, &srv, None);
    srv.repo_ref("acme", "Tools", "v1.0.0", PLUGIN);
    srv.repo_ref("acme", "Tools", "release/v1", PLUGIN);
    let sha = "0123456789abcdef0123456789abcdef01234567";
    std::fs::write(
        srv.root.path().join("github/acme/Tools/commits"),
        format!("{sha} v1.0.0\n"),
    )
    .unwrap();

    let (s, b) = install(
        &app,
        &f.workspace,
        r#"{"source":"github://acme/Tools#v1.0.0"}"#,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["plugin"], "gh-plugin");
    assert_eq!(b["name_from"], "plugin.yaml");
    assert_eq!(b["source"], "github://acme/Tools#v1.0.0");
    assert_eq!(b["version"], "3.1.0");
    // The top-level directory GitHub adds is gone; the tree is exact.
    let t = tree(&f.plugin_dir("gh-plugin"));
    let got: Vec<(&str, &[u8])> = t
        .iter()
        .map(|(p, v)| (p.as_str(), v.0.as_slice()))
        .collect();
    let mut want = PLUGIN.to_vec();
    want.sort();
    assert_eq!(got, want);
    assert!(
        f.keys(&format!("staged/{}.tar.gz", b["digest"].as_str().unwrap()))
            .await
            .len()
            == 1
    );

    for src in [
        "github://acme/Tools#release/v1".to_string(),
        format!("github://acme/Tools#{sha}"),
    ] {
        let (s, b) = install(&app, &f.workspace, &format!(r#"{{"source":"{src}"}}"#)).await;
        assert_eq!(s, 200, "{src}: {b}");
        assert_eq!(
            b["status"], "unchanged",
            "same tree, same canonical archive: {b}"
        );
    }

    let (s, b) = install(&app, &f.workspace, r#"{"source":"github://acme/Tools"}"#).await;
    assert_eq!(s, 422, "{b}");
    assert!(
        b["error"].as_str().unwrap().contains("#"),
        "says how to pin: {b}"
    );
    for missing in ["github://acme/Nope#v1.0.0", "github://acme/Tools#v9"] {
        let (s, b) = install(&app, &f.workspace, &format!(r#"{{"source":"{missing}"}}"#)).await;
        assert_eq!(s, 404, "{missing}: {b}");
    }
    for bad in [
        "github://acme#v1",
        "github://-x/y#v1",
        "github://a/b#-rf",
        "github://a/b#",
    ] {
        let (s, b) = install(&app, &f.workspace, &format!(r#"{{"source":"{bad}"}}"#)).await;
        assert_eq!(s, 400, "{bad}: {b}");
    }

    // No valid name in plugin.yaml: the repository name (lowercased).
    srv.repo_ref(
        "acme",
        "Nameless",
        "v1",
        &[("plugin.yaml", b"version: 1\n"), ("a.md", b"a\n")],
    );
    let (s, b) = install(
        &app,
        &f.workspace,
        r#"{"source":"github://acme/Nameless#v1"}"#,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["plugin"].as_str(), b["name_from"].as_str()),
        (Some("nameless"), Some("source"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_github_repository_uses_the_orgs_own_token_from_ssm() {
    let f = Fixture::new().await;
    let srv = SourceServer::start();
    srv.repo_ref("acme", "secret", "v2", PLUGIN);
    std::fs::write(
        srv.root.path().join("github/acme/secret/token"),
        "s3cr3t-token",
    )
    .unwrap();
    let path = format!("/plugin-delivery-test/{}", unique("creds"));
    let app = app_for(&f, &srv, Some(&path));
    let body = r#"{"source":"github://acme/secret#v2"}"#;
    let (s, b) = install(&app, &f.workspace, body).await;
    assert_eq!(
        s, 404,
        "without the org's token a private repository is not found: {b}"
    );
    f.ssm
        .put_parameter()
        .name(format!("{path}/{TEST_ORG}/github-token"))
        .value("s3cr3t-token")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    let (s, b) = install(&app, &f.workspace, body).await;
    assert_eq!(s, 200, "{b}");
    assert!(!b.to_string().contains("s3cr3t"));

    // The workspace moves to another org, whose admin asks for the same
    // repository: fetched without acme's token, so not found; nothing of
    // it is staged again and the download route answers alike.
    let (_, uninstalled) = uninstall(&app, &f.workspace, "gh-plugin").await;
    assert_eq!(uninstalled["status"], "uninstalled");
    set_tag(&f.ec2, &f.host.instance_id, "molecule:org-id", "globex").await;
    let globex = token("globex", None, "read write admin");
    let req = as_caller(install_req(&f.workspace, body), Some(&globex));
    let (s, b) = api(&app, req).await;
    assert_eq!(s, 404, "another org never gets acme's token: {b}");
    let dl = as_caller(
        download_req(&f.workspace, "gh-plugin", "github://acme/secret#v2"),
        Some(&globex),
    );
    let (s, b) = api(&app, dl).await;
    assert_eq!(s, 404, "{b}");
    assert!(!f.plugin_dir("gh-plugin").exists());
}

/// The download function's own wiring (`App::for_downloads`) fetches a
/// GitHub source and stages it; the read functions' wiring cannot fetch at
/// all: the same request there is an internal error with nothing staged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_download_functions_wiring_fetches_sources_and_the_read_wiring_cannot() {
    let f = Fixture::new().await;
    let srv = SourceServer::start();
    srv.repo_ref("acme", "Tools", "v1.0.0", PLUGIN);
    let mut cfg = f.config();
    cfg.github_api = srv.base();
    cfg.extra_ca_pem = Some(std::fs::read(srv.tls.join("ca.pem")).unwrap());
    let clients = || (f.s3.clone(), f.ec2.clone(), f.ssm.clone());
    let (s3, ec2, ssm) = clients();
    let reads = plugin_delivery::App::for_reads_with_clients(cfg.clone(), s3, ec2, ssm);
    let (s3, ec2, ssm) = clients();
    let downloads = plugin_delivery::App::for_downloads_with_clients(cfg, s3, ec2, ssm).unwrap();
    let source = "github://acme/Tools%23v1.0.0";

    let (resp, _) = send_unchecked(&reads, download_req(&f.workspace, "gh-plugin", source)).await;
    let (s, b) = parts(resp);
    assert_eq!((s, &b["error"]), (500, &json!("internal error")), "{b}");
    assert!(f.keys("staged/").await.is_empty());

    let resp = send(&downloads, download_req(&f.workspace, "gh-plugin", source)).await;
    assert_eq!(resp.status().as_u16(), 302);
    let url = resp.headers()["location"].to_str().unwrap().to_string();
    let staged = f.staged_archives().await;
    assert_eq!(staged.len(), 1, "{staged:?}");
    assert!(url.contains(staged[0].as_str()), "{url}");
    assert!(!f.touched(), "a download reached the host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_sources_are_pinned_and_checked() {
    let f = Fixture::new().await;
    let srv = SourceServer::start();
    let app = app_for(&f, &srv, None);
    let good = tarball(
        &[("plugin.yaml", b"version: 1.0.0\n"), ("rules/x.md", b"x\n")],
        &[("link", "/etc/passwd")],
    );
    srv.file("archives/web-tool.tar.gz", &good);
    let pin = sha256_hex(&good);
    let url = format!("{}/files/archives/web-tool.tar.gz", srv.base());

    let (s, b) = install(
        &app,
        &f.workspace,
        &format!(r#"{{"source":"{url}#sha256={}"}}"#, pin.to_uppercase()),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["plugin"].as_str(), b["name_from"].as_str()),
        (Some("web-tool"), Some("source"))
    );
    assert_eq!(
        b["skipped"],
        serde_json::json!([{"path": "link", "reason": "symlink"}])
    );
    assert!(!f.plugin_dir("web-tool").join("link").exists());

    let (s, b) = install(
        &app,
        &f.workspace,
        &format!(r#"{{"source":"{url}#sha256={}"}}"#, "0".repeat(64)),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    let (s, b) = install(&app, &f.workspace, &format!(r#"{{"source":"{url}"}}"#)).await;
    assert_eq!(s, 422, "{b}");
    let plain = format!(
        "http://127.0.0.1:{}/files/archives/web-tool.tar.gz#sha256={pin}",
        srv.plain_port
    );
    let (s, b) = install(&app, &f.workspace, &format!(r#"{{"source":"{plain}"}}"#)).await;
    assert_eq!(s, 400, "{b}");
    let redirect = format!(
        "{}/redirect-to-http/archives/web-tool.tar.gz#sha256={pin}",
        srv.base()
    );
    let (s, b) = install(&app, &f.workspace, &format!(r#"{{"source":"{redirect}"}}"#)).await;
    assert_eq!(s, 502, "{b}");
    assert_eq!(b["scheme"], "https");
    assert!(
        !b.to_string().contains("redirect to a non-https"),
        "no upstream text: {b}"
    );
    let missing = format!("{}/files/nope.tar.gz#sha256={pin}", srv.base());
    assert_eq!(
        install(&app, &f.workspace, &format!(r#"{{"source":"{missing}"}}"#))
            .await
            .0,
        404
    );

    // Hostile: a traversal entry is refused, nothing staged.
    let staged_before = f.keys("staged/").await;
    let mut evil = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..6].copy_from_slice(b"../x.m");
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    evil.append(&h, &b"x"[..]).unwrap();
    let evil = evil.into_inner().unwrap().finish().unwrap();
    srv.file("evil.tar.gz", &evil);
    let src = format!(
        "{}/files/evil.tar.gz#sha256={}",
        srv.base(),
        sha256_hex(&evil)
    );
    let (s, b) = install(&app, &f.workspace, &format!(r#"{{"source":"{src}"}}"#)).await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(f.keys("staged/").await, staged_before);
}

/// One raw tar entry whose header is written by hand, so that names and
/// types the `tar` crate would refuse to write can be built.
fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: u8, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    {
        let g = h.as_gnu_mut().unwrap();
        g.name[..name.len()].copy_from_slice(name);
    }
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn gz(tar_bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(tar_bytes).unwrap();
    e.finish().unwrap()
}

fn tar_of(entries: &[(&[u8], u8, &[u8], u32)]) -> Vec<u8> {
    let mut t = Vec::new();
    for (n, k, d, m) in entries {
        raw_entry(&mut t, n, *k, d, *m);
    }
    t.extend_from_slice(&[0u8; 1024]);
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_archives_are_refused_with_nothing_staged_or_written() {
    let f = Fixture::new().await;
    let srv = SourceServer::start();
    let mut cfg = f.config();
    cfg.github_api = srv.base();
    cfg.extra_ca_pem = Some(std::fs::read(srv.tls.join("ca.pem")).unwrap());
    cfg.max_tree_bytes = 1 << 20;
    let app = f.app_with(cfg);
    let ok: &[u8] = b"name: x\n";
    let long = vec![b'a'; 1100];
    let mut bomb = Vec::new();
    raw_entry(&mut bomb, b"zeros.bin", b'0', &vec![0u8; 64 << 20], 0o644);
    let mut many = Vec::new();
    for i in 0..10_001 {
        raw_entry(&mut many, format!("f{i}").as_bytes(), b'0', b"", 0o644);
    }
    many.extend_from_slice(&[0u8; 1024]);
    let mut many_more = Vec::new();
    for i in 0..100_000 {
        raw_entry(&mut many_more, format!("t{i}").as_bytes(), b'0', b"", 0o644);
    }
    many_more.extend_from_slice(&[0u8; 1024]);
    // A PAX record `<len> path=<value>\n`, where len counts the whole record.
    let pax = |value: &str| {
        let body = format!(" path={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    };
    let pax_traversal = {
        let mut t = Vec::new();
        raw_entry(&mut t, b"PaxHeaders/x", b'x', &pax("../escape.md"), 0o644);
        raw_entry(&mut t, b"innocent.md", b'0', ok, 0o644);
        t.extend_from_slice(&[0u8; 1024]);
        gz(&t)
    };
    let name300 = format!("{}.md", "n".repeat(300));
    let valid = gz(&tar_of(&[(b"plugin.yaml", b'0', ok, 0o644)]));
    let mut two_members = valid.clone();
    two_members.extend_from_slice(&valid);
    let mut trailing = valid.clone();
    trailing.extend_from_slice(b"garbage");
    let truncated = valid[..valid.len() - 10].to_vec();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "traversal",
            gz(&tar_of(&[(b"../evil", b'0', ok, 0o644)])),
            422,
        ),
        (
            "nested-traversal",
            gz(&tar_of(&[(b"a/../../evil", b'0', ok, 0o644)])),
            422,
        ),
        (
            "absolute",
            gz(&tar_of(&[(b"/etc/evil", b'0', ok, 0o644)])),
            422,
        ),
        (
            "char-device",
            gz(&tar_of(&[(b"dev", b'3', b"", 0o644)])),
            422,
        ),
        (
            "block-device",
            gz(&tar_of(&[(b"blk", b'4', b"", 0o644)])),
            422,
        ),
        ("fifo", gz(&tar_of(&[(b"pipe", b'6', b"", 0o644)])), 422),
        (
            "non-utf8",
            gz(&tar_of(&[(b"bad\xff.md", b'0', ok, 0o644)])),
            422,
        ),
        (
            "control-char",
            gz(&tar_of(&[(b"bad\x07.md", b'0', ok, 0o644)])),
            422,
        ),
        (
            "duplicate",
            gz(&tar_of(&[
                (b"a.md", b'0', ok, 0o644),
                (b"a.md", b'0', ok, 0o644),
            ])),
            422,
        ),
        (
            "file-and-dir",
            gz(&tar_of(&[
                (b"a", b'0', ok, 0o644),
                (b"a/b", b'0', ok, 0o644),
            ])),
            422,
        ),
        (
            "long-path",
            {
                let mut t = Vec::new();
                raw_entry(
                    &mut t,
                    b"././@LongLink",
                    b'L',
                    &[long.as_slice(), b"\0"].concat(),
                    0o644,
                );
                raw_entry(&mut t, b"short", b'0', ok, 0o644);
                t.extend_from_slice(&[0u8; 1024]);
                gz(&t)
            },
            422,
        ),
        ("too-many-entries", gz(&many), 422),
        ("gzip-bomb", gz(&bomb), 413),
        ("trailing-garbage", trailing, 422),
        ("truncated", truncated, 422),
        ("not-gzip", b"this is not an archive".to_vec(), 422),
        ("second-gzip-member", two_members, 422),
        ("pax-path-traversal", pax_traversal, 422),
        (
            "name-300-bytes",
            {
                let mut t = Vec::new();
                raw_entry(
                    &mut t,
                    b"././@LongLink",
                    b'L',
                    &[name300.as_bytes(), b"\0"].concat(),
                    0o644,
                );
                raw_entry(&mut t, b"short", b'0', ok, 0o644);
                t.extend_from_slice(&[0u8; 1024]);
                gz(&t)
            },
            422,
        ),
        ("entries-100000", gz(&many_more), 422),
        ("sparse", gz(&tar_of(&[(b"sparse", b'S', b"", 0o644)])), 422),
        (
            "contiguous",
            gz(&tar_of(&[(b"contig", b'7', b"", 0o644)])),
            422,
        ),
    ];
    assert!(cases.len() >= 20, "the corpus has {} archives", cases.len());
    for (label, bytes, want) in &cases {
        srv.file(&format!("{label}.tar.gz"), bytes);
        let src = format!(
            "{}/files/{label}.tar.gz#sha256={}",
            srv.base(),
            sha256_hex(bytes)
        );
        let t = std::time::Instant::now();
        let (s, b) = install(&app, &f.workspace, &format!(r#"{{"source":"{src}"}}"#)).await;
        assert_eq!(s, *want, "{label}: {b}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "{label} took {:?}",
            t.elapsed()
        );
    }
    assert!(f.keys("staged/").await.is_empty(), "nothing staged");
    assert!(!f.touched(), "nothing written on the host");

    // Links are dropped (listed), setuid is stripped, the exec bit kept;
    // nothing lands outside the plugin dir.
    let mut linked = Vec::new();
    raw_entry(&mut linked, b"plugin.yaml", b'0', ok, 0o644);
    raw_entry(&mut linked, b"run.sh", b'0', b"#!/bin/sh\n", 0o4755);
    let links: [(&[u8], u8, &[u8]); 3] = [
        (b"out", b'2', b"../../../../etc/passwd"),
        (b"abs", b'2', b"/etc/shadow"),
        (b"hard", b'1', b"/etc/passwd"),
    ];
    for (name, kind, target) in links {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(tar::EntryType::new(kind));
        h.as_gnu_mut().unwrap().linkname[..target.len()].copy_from_slice(target);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_cksum();
        linked.extend_from_slice(h.as_bytes());
    }
    linked.extend_from_slice(&[0u8; 1024]);
    let modes = gz(&linked);
    srv.file("modes.tar.gz", &modes);
    let src = format!(
        "{}/files/modes.tar.gz#sha256={}",
        srv.base(),
        sha256_hex(&modes)
    );
    let (s, b) = install(&app, &f.workspace, &format!(r#"{{"source":"{src}"}}"#)).await;
    assert_eq!(s, 200, "{b}");
    let skipped: Vec<&str> = b["skipped"]
        .as_array()
        .unwrap_or_else(|| panic!("no skipped list: {b}"))
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(skipped, ["abs", "hard", "out"]);
    let t = tree(&f.plugin_dir("x"));
    assert_eq!(t.keys().collect::<Vec<_>>(), ["plugin.yaml", "run.sh"]);
    assert_eq!(t["run.sh"].1, 0o755);
    let top: Vec<String> = std::fs::read_dir(&f.config_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        top.iter().all(|n| n == "plugins"
            || n == ".plugin-delivery"
            || n == "skills"
            || n == "CLAUDE.md"
            || n == ".claude"),
        "{top:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_past_its_deadline_is_504() {
    let f = Fixture::new().await;
    let srv = SourceServer::start();
    let slow = tarball(&[("plugin.yaml", b"name: slow\n")], &[]);
    srv.file("slow.tar.gz", &slow);
    let mut cfg = f.config();
    cfg.extra_ca_pem = Some(std::fs::read(srv.tls.join("ca.pem")).unwrap());
    cfg.fetch_timeout = std::time::Duration::from_secs(2);
    let app = f.app_with(cfg);
    let src = format!(
        "{}/slow/slow.tar.gz#sha256={}",
        srv.base(),
        sha256_hex(&slow)
    );
    let (s, b) = install(&app, &f.workspace, &format!(r#"{{"source":"{src}"}}"#)).await;
    assert_eq!(s, 504, "{b}");
    assert_eq!(b["scheme"], "https");
    assert!(f.keys("staged/").await.is_empty());
}

/// The fetch guard, without the tests' loopback allowance: a source aimed
/// at loopback (by address or by a name resolving to it) or redirected
/// off the allowed hosts is refused with 403 naming the rule, and the
/// server never sees a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_never_reach_non_public_addresses() {
    let f = Fixture::new().await;
    let srv = SourceServer::start();
    let archive = tarball(&[("plugin.yaml", b"name: guarded\n")], &[]);
    srv.file("g/guarded.tar.gz", &archive);
    srv.repo_ref(
        "acme",
        "guarded",
        "v1",
        &[("plugin.yaml", b"name: guarded\n")],
    );
    let pin = sha256_hex(&archive);
    let mut cfg = f.config();
    cfg.extra_ca_pem = Some(std::fs::read(srv.tls.join("ca.pem")).unwrap());
    cfg.fetch_policy.test_allowed_addresses.clear();
    cfg.github_api = srv.base();
    let app = f.app_with(cfg.clone());
    let cases = [
        (
            format!("{}/files/g/guarded.tar.gz#sha256={pin}", srv.base()),
            "loopback",
        ),
        (
            format!(
                "https://localhost:{}/files/g/guarded.tar.gz#sha256={pin}",
                srv.port
            ),
            "loopback",
        ),
        (
            format!(
                "https://[::1]:{}/files/g/guarded.tar.gz#sha256={pin}",
                srv.port
            ),
            "loopback",
        ),
        (
            format!("https://169.254.169.254/latest/meta-data#sha256={pin}"),
            "link-local",
        ),
        ("github://acme/guarded#v1".to_string(), "loopback"),
    ];
    for (source, rule) in &cases {
        let (s, b) = install(&app, &f.workspace, &json!({"source": source}).to_string()).await;
        assert_eq!(s, 403, "{source}: {b}");
        assert!(b["rule"].as_str().unwrap().contains(rule), "{source}: {b}");
        assert!(
            b["error"].as_str().unwrap().starts_with("fetching from "),
            "{b}"
        );
    }
    assert_eq!(srv.requests(), 0, "the server was never contacted");
    assert!(f.keys("staged/").await.is_empty());

    // Allowed hosts: localhost may be asked (on loopback, with the test
    // allowance back), but its redirect to 127.0.0.1 leaves the list.
    cfg.fetch_policy.test_allowed_addresses = vec!["127.0.0.1".parse().unwrap()];
    cfg.fetch_policy.allowed_hosts = vec!["localhost".into()];
    let app = f.app_with(cfg);
    let source = format!(
        "https://localhost:{}/redirect/g/guarded.tar.gz#sha256={pin}",
        srv.port
    );
    let (s, b) = install(&app, &f.workspace, &json!({"source": source}).to_string()).await;
    assert_eq!(s, 403, "{b}");
    assert_eq!(b["rule"], "not in the allowed hosts", "{b}");
    assert_eq!(srv.requests(), 1, "only the first hop was made");
    assert!(!f.touched());
}

/// A signed URL's query string is a credential: it is used for the fetch
/// but never appears in an error, a record or the log detail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_strings_stay_out_of_records_and_errors() {
    let f = Fixture::new().await;
    let srv = SourceServer::start();
    let app = app_for(&f, &srv, None);
    let good = tarball(&[("plugin.yaml", b"name: signed\nversion: 1.0.0\n")], &[]);
    srv.file("s/signed.tar.gz", &good);
    let pin = sha256_hex(&good);
    let secret = "X-Amz-Signature=s3cr3t0123";
    let url = format!("{}/files/s/signed.tar.gz?{secret}#sha256={pin}", srv.base());
    let (s, b) = install(&app, &f.workspace, &json!({"source": url}).to_string()).await;
    assert_eq!(s, 200, "{b}");
    assert!(!b.to_string().contains("s3cr3t"), "{b}");
    let (_, listed) = list(&app, &f.workspace).await;
    assert!(!listed.to_string().contains("s3cr3t"), "{listed}");
    // The desired state keeps it: a reinstall may have to fetch again.
    assert!(f.desired().await.to_string().contains("s3cr3t"));
    let missing = format!("{}/files/s/none.tar.gz?{secret}#sha256={pin}", srv.base());
    let (s, b) = install(&app, &f.workspace, &json!({"source": missing}).to_string()).await;
    assert_eq!(s, 404, "{b}");
    assert!(!b.to_string().contains("s3cr3t"), "{b}");
    assert!(b["error"].as_str().unwrap().contains("?<redacted>"), "{b}");
    for key in f
        .keys(&format!("workspaces/{}/operations/", f.workspace))
        .await
    {
        let rec = String::from_utf8(f.get(&key).await.unwrap()).unwrap();
        assert!(!rec.contains("s3cr3t"), "{rec}");
        assert!(rec.contains("?<redacted>"), "{rec}");
    }
}
