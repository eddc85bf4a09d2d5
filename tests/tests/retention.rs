//! Retention of staged archives on the local stack (moto, a versioned
//! bucket as template.yaml makes it): the scheduled sweep removes the
//! archives no desired state references and keeps the rest; a removed one
//! can be brought back. Figures: objects and bytes before and after.

use std::time::Duration;

use acceptance::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_removes_unreferenced_archives_and_can_bring_one_back() {
    let f = Fixture::new().await;
    f.s3.put_bucket_versioning()
        .bucket(&f.bucket)
        .versioning_configuration(
            aws_sdk_s3::types::VersioningConfiguration::builder()
                .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut cfg = f.config();
    // Everything is old enough here: the test is about what is referenced.
    cfg.staged_retention = Duration::ZERO;
    let app = f.app_with(cfg);
    let body = |n: usize| format!("# {n}\n{}\n", "x".repeat(4096 * n));
    for n in 1..=3usize {
        let name = format!("keep{n}");
        f.publish(
            &name,
            &[
                ("plugin.yaml", format!("name: {name}\n").as_bytes()),
                ("rules/r.md", body(n).as_bytes()),
            ],
        )
        .await;
    }
    // Installed (referenced): keep1. Installed then removed: keep2.
    // Only downloaded (staged, never desired): keep3.
    for n in ["keep1", "keep2"] {
        let (s, b) = install(&app, &f.workspace, &json!({"source": n}).to_string()).await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, b) = uninstall(&app, &f.workspace, "keep2").await;
    assert_eq!(s, 200, "{b}");
    let dl = download_req(&f.workspace, "keep3", "local://keep3");
    assert_eq!(send(&app, dl).await.status().as_u16(), 302);
    let archives = || async {
        let mut k: Vec<String> = f
            .keys("staged/")
            .await
            .into_iter()
            .filter(|k| k.ends_with(".tar.gz") && !k.starts_with("staged/index/"))
            .collect();
        k.sort();
        k
    };
    let before = archives().await;
    assert_eq!(before.len(), 3, "{before:?}");

    let out = plugin_delivery::entry::events::handle(&app.deps, scheduled_event())
        .await
        .unwrap();
    let r = &out["staged"];
    eprintln!("sweep: {r}");
    assert_eq!(r["objects_before"], 3, "{out}");
    assert_eq!(
        (r["removed"].as_u64(), r["kept_referenced"].as_u64()),
        (Some(2), Some(1)),
        "{out}"
    );
    assert!(r["bytes_removed"].as_u64().unwrap() > 0);
    let after = archives().await;
    let kept = f.desired().await["plugins"]["keep1"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(after, vec![format!("staged/{kept}.tar.gz")]);

    // The installed plugin still reinstalls from its staged archive, and a
    // removed one comes back as it was (its bytes were only hidden).
    let gone = before.iter().find(|k| !after.contains(k)).unwrap();
    let digest = gone
        .trim_start_matches("staged/")
        .trim_end_matches(".tar.gz");
    assert!(app.deps.archives.restore(digest).await.unwrap());
    let back = f.get(gone).await.expect("restored");
    assert_eq!(sha256_hex(&back), digest);
    assert!(
        !app.deps.archives.restore(digest).await.unwrap(),
        "nothing left to undo"
    );
    // Sweeping again: the restored one goes again, the kept one stays.
    let out = plugin_delivery::entry::events::handle(&app.deps, scheduled_event())
        .await
        .unwrap();
    assert_eq!(out["staged"]["removed"], 1, "{out}");
    assert_eq!(archives().await, after);
}
