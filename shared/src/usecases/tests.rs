//! Unit tests of the use cases on the in-memory adapters: no stack, no
//! network, virtual time. Each asserts what was (and was not) touched:
//! stored states, staged archives, records, host calls, clock sleeps.

use std::sync::Arc;
use std::time::Duration;

use crate::adapters::clock::SystemClock;
use crate::adapters::memory::{result_line, Memory, SimHost, MEMORY_ORG};
use crate::domain::allowlist::{AllowEntry, Allowlist};
use crate::domain::caller::{unknown_workspace, Caller, Claims};
use crate::domain::config::Config;
use crate::domain::error::{Error, Result};
use crate::domain::host::Access;
use crate::domain::job::Work;
use crate::domain::plugin::{DesiredState, InstalledPlugin, Manifest, PluginInfo};
use crate::domain::records::{Kind, OperationRecord, PluginState, Status, Trigger};
use crate::domain::rollout::{RolloutLimits, RolloutRequest, Threshold};
use crate::ports::{AllowlistStore, Clock, Deps};
use crate::usecases::background::{self, Done};
use crate::usecases::install::{self, InstallRequest, InstallStatus, UninstallStatus};
use crate::usecases::reinstall::{reinstall_workspace, Readiness};
use crate::usecases::{query, repair, rollout};

const MANIFEST: &[u8] = b"name: hello\nversion: 1.2.0\nruntimes: [claude-code]\n";

/// A registry with `hello` published and one SSH workspace `ws-1`.
fn world() -> (Memory, Deps) {
    let m = Memory::default();
    m.store.publish(
        "hello",
        &[
            ("plugin.yaml", MANIFEST),
            ("skills/greet/SKILL.md", b"# greet\n"),
        ],
    );
    m.fleet.add("ws-1", "vpc-a");
    let deps = m.deps(Config::new("bucket"));
    (m, deps)
}

/// A user of the workspaces' org with every scope.
fn owner() -> Caller {
    Caller::from_claims(Claims {
        org_id: Some(MEMORY_ORG.into()),
        scope: Some("read write admin".into()),
        ..Default::default()
    })
    .unwrap()
}

/// An authorized change of ws-1 (org-1) by `caller`.
fn change(caller: &Caller, work: Work) -> background::Change<'_> {
    background::Change {
        caller,
        workspace: "ws-1",
        org: Some(MEMORY_ORG),
        work,
        spent: Duration::ZERO,
    }
}

fn req(source: &str) -> InstallRequest {
    InstallRequest {
        source: source.into(),
        sha256: None,
    }
}

fn entry(name: &str, digest: &str) -> InstalledPlugin {
    InstalledPlugin {
        info: PluginInfo::from_manifest(name, Manifest::default()),
        digest: digest.into(),
        source: format!("local://{name}"),
        installed_at: "2026-01-01T00:00:00Z".into(),
    }
}

fn state(entries: &[(&str, &str)]) -> DesiredState {
    DesiredState {
        plugins: entries
            .iter()
            .map(|(n, d)| (n.to_string(), entry(n, d)))
            .collect(),
    }
}

fn busy() -> Result<crate::domain::hostscript::HostOutput> {
    Ok(result_line(
        r#"{"status":"error","code":"busy","message":"x"}"#,
        75,
    ))
}

/// Nothing was staged, recorded or sent to a host.
fn untouched(m: &Memory) {
    assert!(m.store.staged_digests().is_empty(), "staged");
    assert!(m.store.records_of("ws-1").is_empty(), "records");
    assert!(m.hosts.calls().is_empty(), "host calls");
    assert_eq!(m.store.state_of("ws-1"), DesiredState::default(), "state");
}

#[tokio::test]
async fn bad_requests_are_refused_before_anything_is_looked_up() {
    let (m, deps) = world();
    let cases = [
        ("../x", req("hello"), "invalid workspace id"),
        ("ws-1", req("ftp://x"), "unsupported plugin source scheme"),
        ("ws-1", req("local://../etc"), "invalid plugin name"),
        (
            "ws-1",
            InstallRequest {
                source: "hello".into(),
                sha256: Some("zz".into()),
            },
            "sha256 must be",
        ),
    ];
    for (ws, r, msg) in cases {
        let e = install::install(&deps, &owner(), ws, r).await.unwrap_err();
        assert_eq!(e.status(), 400, "{e}");
        assert!(e.message.contains(msg), "{}", e.message);
    }
    assert_eq!(
        m.fleet.locates.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(m.store.requests(), 0);
    untouched(&m);
}

#[tokio::test]
async fn refusals_leave_no_trace() {
    let (m, deps) = world();
    // Unknown workspace, unknown plugin.
    let e = install::install(&deps, &owner(), "ws-9", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 404);
    let e = install::install(&deps, &owner(), "ws-1", req("nope"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.status(), e.message.contains("not in the registry")),
        (404, true)
    );
    untouched(&m);

    // The org's allowlist refuses; an unreadable one refuses too (503).
    let mut host = m.fleet.add("ws-1", "vpc-a");
    host.org_id = Some("org-1".into());
    m.fleet.put("ws-1", host);
    let list = Allowlist {
        plugins: vec![AllowEntry::registry("other".into())],
    };
    assert!(m.store.save_allowlist("org-1", &list, None).await.unwrap());
    let e = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 403);
    m.store.set_allowlists_down(true);
    let e = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 503);
    untouched(&m);
    m.store.set_allowlists_down(false);

    // A pin that does not match the plugin.yaml: 422, nothing staged.
    let (_, etag) = m.store.load_allowlist("org-1").await.unwrap();
    let everything = Allowlist::default();
    assert!(m
        .store
        .save_allowlist("org-1", &everything, etag.as_deref())
        .await
        .unwrap());
    let pinned = InstallRequest {
        source: "hello".into(),
        sha256: Some("a".repeat(64)),
    };
    let e = install::install(&deps, &owner(), "ws-1", pinned)
        .await
        .unwrap_err();
    assert_eq!(e.status(), 422);
    assert!(m.store.staged_digests().is_empty() && m.hosts.calls().is_empty());
}

#[tokio::test]
async fn install_stages_runs_on_the_host_then_records_the_state() {
    let (m, deps) = world();
    let out = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    assert_eq!(out.status, InstallStatus::Installed);
    assert_eq!(
        (out.plugin.as_str(), out.version.as_str()),
        ("hello", "1.2.0")
    );
    assert_eq!(m.store.staged_digests(), std::slice::from_ref(&out.digest));
    let calls = m.hosts.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].op(), "install");
    assert_eq!(
        calls[0].args[2..4],
        ["hello".to_string(), out.digest.clone()]
    );
    assert_eq!(calls[0].payload.as_deref(), Some(out.digest.as_str()));
    assert_eq!(m.store.state_of("ws-1").plugins["hello"].digest, out.digest);
    let recs = m.store.records_of("ws-1");
    assert_eq!(recs.len(), 1);
    assert_eq!(
        (recs[0].kind, recs[0].status),
        (Kind::Install, Status::Succeeded)
    );
    assert_eq!(recs[0].result.as_ref().unwrap()["status"], "installed");
    assert_eq!(recs[0].result.as_ref().unwrap()["name_from"], "registry");

    // The same plugin again: unchanged, and the original install time kept.
    let at = m.store.state_of("ws-1").plugins["hello"]
        .installed_at
        .clone();
    let again = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    assert_eq!(again.status, InstallStatus::Unchanged);
    assert_eq!(m.store.state_of("ws-1").plugins["hello"].installed_at, at);
}

#[tokio::test]
async fn host_errors_map_to_statuses_and_leave_the_state_alone() {
    let (m, deps) = world();
    m.hosts.script(|_, _| Some(busy()));
    let e = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 409);
    m.hosts
        .script(|_, _| Some(Err(Error::unavailable("the host is not reachable"))));
    let e = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 503);
    m.hosts.script(|_, _| {
        Some(Ok(result_line(
            r#"{"status":"error","code":"bad_archive","message":"x"}"#,
            65,
        )))
    });
    let e = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 502);
    assert_eq!(m.store.state_of("ws-1"), DesiredState::default());
    let recs = m.store.records_of("ws-1");
    assert_eq!(recs.len(), 3);
    let statuses: Vec<_> = recs
        .iter()
        .map(|r| (r.status, r.result.as_ref().unwrap()["status"].as_u64()))
        .collect();
    assert!(statuses.iter().all(|(s, _)| *s == Status::Failed));
    let mut codes: Vec<_> = statuses.iter().filter_map(|(_, c)| *c).collect();
    codes.sort();
    assert_eq!(codes, [409, 502, 503]);
}

#[tokio::test]
async fn uninstall_reports_what_the_host_and_the_state_had() {
    let (m, deps) = world();
    let out = install::uninstall(&deps, &owner(), "ws-1", "hello")
        .await
        .unwrap();
    assert_eq!(out.status, UninstallStatus::Absent);
    install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    let out = install::uninstall(&deps, &owner(), "ws-1", "hello")
        .await
        .unwrap();
    assert_eq!(out.status, UninstallStatus::Uninstalled);
    assert!(m.store.state_of("ws-1").plugins.is_empty());
    assert!(m.hosts.host("i-ws-1").installed.is_empty());
    // Desired but already gone from the host: still "uninstalled".
    m.store.set_state("ws-1", state(&[("hello", "d1")]));
    let out = install::uninstall(&deps, &owner(), "ws-1", "hello")
        .await
        .unwrap();
    assert_eq!(out.status, UninstallStatus::Uninstalled);
    // A result the uninstall cannot have: 502, state untouched.
    m.store.set_state("ws-1", state(&[("hello", "d1")]));
    m.hosts
        .script(|_, _| Some(Ok(result_line(r#"{"status":"restarted"}"#, 0))));
    let e = install::uninstall(&deps, &owner(), "ws-1", "hello")
        .await
        .unwrap_err();
    assert_eq!(e.status(), 502);
    assert!(m.store.state_of("ws-1").plugins.contains_key("hello"));
    let e = install::uninstall(&deps, &owner(), "ws-1", "Bad/Name")
        .await
        .unwrap_err();
    assert_eq!(e.status(), 400);
}

#[tokio::test]
async fn desired_state_writes_retry_on_conflicts_and_give_up_with_409() {
    let (m, deps) = world();
    m.store.conflict_next_saves(20);
    install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    assert!(m.store.state_of("ws-1").plugins.contains_key("hello"));
    assert_eq!(m.clock.slept().len(), 20, "one backoff per lost race");

    m.store.set_state("ws-1", DesiredState::default());
    m.store.conflict_next_saves(1000);
    let e = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 409);
    assert!(e.message.contains("changing too fast"));
    let failed = m
        .store
        .records_of("ws-1")
        .into_iter()
        .filter(|r| r.status == Status::Failed)
        .count();
    assert_eq!(failed, 1);
    m.store.conflict_next_saves(0);
}

#[tokio::test]
async fn a_brief_store_outage_after_the_host_changed_loses_no_update() {
    let (m, deps) = world();
    // Three failed saves (past the SDK's own retries): retried, with
    // growing pauses, and the update lands.
    m.store.fail_next_saves(3);
    install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    assert!(m.store.state_of("ws-1").plugins.contains_key("hello"));
    assert_eq!(m.clock.slept(), [100, 200, 400].map(Duration::from_millis));
}

/// An install of `hello` to ws-1 that fails with 503 after the host got
/// it, and is taken off the host again: nothing of it stays anywhere.
async fn install_fails_and_is_undone(m: &Memory, deps: &Deps) {
    let e = install::install(deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 503);
    assert!(
        e.message.contains("taken off the host again"),
        "{}",
        e.message
    );
    assert!(!m.store.state_of("ws-1").plugins.contains_key("hello"));
    assert!(m.hosts.host("i-ws-1").installed.is_empty(), "undone");
    let ops: Vec<String> = m.hosts.calls().iter().map(|c| c.op().to_string()).collect();
    assert_eq!(ops, ["install", "uninstall"]);
}

#[tokio::test]
async fn a_new_plugin_whose_state_cannot_be_written_is_taken_off_the_host_again() {
    let (m, deps) = world();
    m.store.fail_next_saves(100);
    install_fails_and_is_undone(&m, &deps).await;

    // An upgrade is left for the repair: the desired state still names the
    // old digest, which the repair puts back.
    m.store.fail_next_saves(0);
    install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    let old = m.hosts.host("i-ws-1").installed["hello"].clone();
    m.store.publish(
        "hello",
        &[("plugin.yaml", b"name: hello\nversion: 2.0.0\n")],
    );
    m.store.fail_next_saves(100);
    let e = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 503);
    assert!(!e.message.contains("taken off"), "{}", e.message);
    assert_ne!(m.hosts.host("i-ws-1").installed["hello"], old);
    assert_eq!(m.store.state_of("ws-1").plugins["hello"].digest, old);
    m.store.fail_next_saves(0);
}

/// Over SSH the archive is staged in S3 while it goes to the host: when
/// staging fails, the install fails as a lost desired-state write does (a
/// state must not name an archive S3 does not hold), and a plugin new to
/// the host is taken off it again. An SSM host gets nothing: it downloads
/// the staged copy, so staging comes first.
#[tokio::test]
async fn staging_beside_the_delivery_fails_the_install_and_undoes_it() {
    let (m, deps) = world();
    m.store.fail_next_stages(1);
    install_fails_and_is_undone(&m, &deps).await;
    // Then it works, and the state names a staged archive.
    let out = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    assert_eq!(m.store.staged_digests(), vec![out.digest.clone()]);
    assert_eq!(m.store.state_of("ws-1").plugins["hello"].digest, out.digest);

    // An SSM host: the failed staging comes first, the host sees nothing.
    let (m, deps) = world();
    let mut host = m.fleet.add("ws-1", "vpc-a");
    host.access = Access::Ssm;
    m.fleet.put("ws-1", host);
    m.store.fail_next_stages(1);
    let e = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 503);
    assert!(m.hosts.calls().is_empty(), "nothing sent to the host");
    assert!(m.store.staged_digests().is_empty());
}

#[tokio::test]
async fn what_was_at_the_plugin_path_or_is_desired_is_never_undone() {
    let (m, deps) = world();
    // A hand-made (legacy) directory was replaced: the undo would leave the
    // user with nothing, so the plugin stays and repair reports it.
    m.hosts.script(|_, cmd| {
        (cmd.args[0] == "install").then(|| {
            Ok(result_line(
                &format!(
                    r#"{{"status":"installed","plugin":"hello","digest":"{}","previous":"","previous_kind":"legacy","restarted":true}}"#,
                    cmd.args[3]
                ),
                0,
            ))
        })
    });
    m.store.fail_next_saves(100);
    let e = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 503);
    let ops: Vec<String> = m.hosts.calls().iter().map(|c| c.op().to_string()).collect();
    assert_eq!(ops, ["install"], "no undo over a replaced directory");
    m.store.fail_next_saves(0);

    // Desired already (another request recorded it meanwhile): kept.
    let (m, deps) = world();
    let mut desired = DesiredState::default();
    install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    desired.plugins = m.store.state_of("ws-1").plugins;
    // Named at another digest, so the install has a state to write.
    desired.plugins.get_mut("hello").unwrap().digest = "0".repeat(64);
    m.hosts.set_host("i-ws-1", SimHost::default());
    m.store.set_state("ws-1", desired);
    m.store.fail_next_saves(100);
    let e = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 503);
    assert!(m.hosts.host("i-ws-1").installed.contains_key("hello"));
    m.store.fail_next_saves(0);
}

#[tokio::test]
async fn a_save_that_landed_but_timed_out_counts_once() {
    let (m, deps) = world();
    install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    // The removal lands, its reply is lost: the retry must see it landed,
    // not conclude the plugin was never desired.
    m.store.lose_next_save_replies(1);
    let out = install::uninstall(&deps, &owner(), "ws-1", "hello")
        .await
        .unwrap();
    assert_eq!(out.status, install::UninstallStatus::Uninstalled);
    assert!(!m.store.state_of("ws-1").plugins.contains_key("hello"));
}

#[tokio::test]
async fn slow_operations_are_handed_off_with_202_and_finished_by_the_worker() {
    let m = Memory::default();
    m.store.publish("hello", &[("plugin.yaml", MANIFEST)]);
    m.fleet.add("ws-1", "vpc-a");
    let mut config = Config::new("bucket");
    // The deadline is real time: one second before the hand-off.
    config.operation_timeout = Duration::from_secs(3);
    let deps = m.deps_with_handoff(config);
    let real: Arc<dyn Clock> = Arc::new(SystemClock);
    m.hosts.delay(real.clone(), || Duration::from_secs(60));
    let work = Work::Install {
        source: "hello".into(),
        sha256: None,
    };
    let me = owner();
    let fut = install::install(&deps, &me, "ws-1", req("hello"));
    let done = background::within_or_hand_off(&deps, change(&me, work), fut)
        .await
        .unwrap();
    let Done::Accepted(id) = done else {
        panic!("expected a hand-off, got {done:?}");
    };
    let jobs = m.handoff.jobs.lock().unwrap().clone();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].operation_id.as_str(), jobs[0].workspace.as_str()),
        (id.as_str(), "ws-1")
    );
    let running: Vec<_> = m
        .store
        .records_of("ws-1")
        .into_iter()
        .filter(|r| r.id == id)
        .collect();
    assert_eq!(running[0].status, Status::Running);

    // The worker runs the same job to the end, on the same record; a second
    // delivery of it changes nothing.
    m.hosts.delay(real.clone(), || Duration::ZERO);
    background::run(&deps, &jobs[0]).await.unwrap();
    let rec = m
        .store
        .records_of("ws-1")
        .into_iter()
        .find(|r| r.id == id)
        .unwrap();
    assert_eq!(rec.status, Status::Succeeded);
    assert!(m.store.state_of("ws-1").plugins.contains_key("hello"));
    background::run(&deps, &jobs[0]).await.unwrap();
    assert_eq!(
        m.hosts.calls().len(),
        2,
        "one cut off, one finished; none after"
    );

    // A busy host: the job stays running for the queue's next delivery.
    m.hosts.script(|_, _| Some(busy()));
    let me = owner();
    let id2 = background::start(
        &deps,
        m.handoff.as_ref(),
        &change(
            &me,
            Work::Uninstall {
                plugin: "hello".into(),
            },
        ),
    )
    .await
    .unwrap();
    let job2 = m.handoff.jobs.lock().unwrap()[1].clone();
    assert_eq!(
        background::run(&deps, &job2).await.unwrap_err().status(),
        409
    );
    let rec = m
        .store
        .records_of("ws-1")
        .into_iter()
        .find(|r| r.id == id2)
        .unwrap();
    assert_eq!(rec.status, Status::Running);

    // A queue that refuses: the deadline's 504 stands, no record stays running.
    m.handoff
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    m.hosts.delay(real, || Duration::from_secs(60));
    let work = Work::Uninstall {
        plugin: "hello".into(),
    };
    let me = owner();
    let fut = install::uninstall(&deps, &me, "ws-1", "hello");
    let e = background::within_or_hand_off(&deps, change(&me, work), fut)
        .await
        .unwrap_err();
    assert_eq!(e.status(), 504);
    let stuck = m
        .store
        .records_of("ws-1")
        .into_iter()
        .filter(|r| r.status == Status::Running && r.id != id2)
        .count();
    assert_eq!(stuck, 0);
}

#[tokio::test]
async fn reinstall_waits_for_a_new_host_with_backoff() {
    let (m, deps) = world();
    m.store.set_state("ws-1", state(&[]));
    install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    // The replacement instance is empty and not there for three tries.
    m.hosts.set_host("i-ws-1", SimHost::default());
    m.fleet.fail_next([
        Error::not_found("no instance"),
        Error::unavailable("starting"),
        Error::conflict("two instances"),
    ]);
    let slept_before = m.clock.slept().len();
    let rec = reinstall_workspace(
        &deps,
        "ws-1",
        Some("i-ws-1"),
        Trigger::InstanceStart,
        Readiness::default(),
    )
    .await
    .unwrap();
    assert_eq!(rec.status, Status::Succeeded);
    let s = |n| Duration::from_secs(n);
    assert_eq!(m.clock.slept()[slept_before..], [s(2), s(4), s(8)]);
    let host = m.hosts.host("i-ws-1");
    assert!(host.installed.contains_key("hello"));
    assert_eq!(
        (host.restarts, host.pending_restart),
        (1, false),
        "one restart for the batch"
    );
    assert_eq!(rec.plugins[0].result, PluginState::Installed);

    // A host that never comes: 503 after the budget, and a failed record.
    let budget = Readiness {
        budget: s(10),
        ..Readiness::default()
    };
    // Tries at 0, 2 and 6 s; the next (14 s) is past the budget.
    m.fleet
        .fail_next((0..3).map(|_| Error::unavailable("down")));
    let slept_before = m.clock.slept().len();
    let e = reinstall_workspace(&deps, "ws-1", None, Trigger::Request, budget)
        .await
        .unwrap_err();
    assert_eq!(e.status(), 503);
    assert!(e.message.contains("not ready within 10 s"));
    assert_eq!(m.clock.slept()[slept_before..], [s(2), s(4)]);

    // An event about an instance the workspace no longer runs on: skipped.
    let rec = reinstall_workspace(
        &deps,
        "ws-1",
        Some("i-old"),
        Trigger::InstanceStart,
        Readiness::none(),
    )
    .await
    .unwrap();
    assert_eq!(
        rec.result.unwrap()["skipped"],
        "the workspace runs on another instance now"
    );
}

/// A repair of `ws-1` that has something to report: its record and the
/// host operations it ran.
async fn repair_ws1(m: &Memory, deps: &Deps) -> (OperationRecord, Vec<String>) {
    let n = m.hosts.calls().len();
    let rec = repair::repair_workspace(deps, "ws-1", Trigger::Schedule, None)
        .await
        .unwrap()
        .expect("a record");
    let ops = m.hosts.calls()[n..]
        .iter()
        .map(|c| c.op().to_string())
        .collect();
    (rec, ops)
}

#[tokio::test]
async fn repair_reinstalls_missing_and_different_reports_extra_and_restarts_once() {
    let (m, deps) = world();
    install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    let digest = m.store.state_of("ws-1").plugins["hello"].digest.clone();
    // No drift: no record, one inventory call.
    let n = m.hosts.calls().len();
    assert!(
        repair::repair_workspace(&deps, "ws-1", Trigger::Schedule, None)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        m.hosts.calls()[n..]
            .iter()
            .map(|c| c.op())
            .collect::<Vec<_>>(),
        ["inventory"]
    );

    // Different digest on the host, plus an extra someone put there.
    let mut h = SimHost::default();
    h.installed.insert("hello".into(), "0".repeat(64));
    h.installed.insert("extra".into(), "e".repeat(64));
    m.hosts.set_host("i-ws-1", h);
    let (rec, ops) = repair_ws1(&m, &deps).await;
    assert_eq!(ops, ["inventory", "install", "restart"]);
    let found: Vec<_> = rec
        .plugins
        .iter()
        .map(|p| (p.plugin.as_str(), p.result))
        .collect();
    assert_eq!(
        found,
        [
            ("hello", PluginState::Different),
            ("extra", PluginState::Extra),
            ("hello", PluginState::Installed),
        ]
    );
    assert_eq!(rec.result.as_ref().unwrap()["restarted"], true);
    let host = m.hosts.host("i-ws-1");
    assert_eq!(host.installed["hello"], digest);
    assert!(
        host.installed.contains_key("extra"),
        "extras are never removed"
    );

    // Missing from the host.
    m.hosts.set_host("i-ws-1", SimHost::default());
    let (rec, _) = repair_ws1(&m, &deps).await;
    assert_eq!(rec.plugins[0].result, PluginState::Missing);

    // In line, but a restart an earlier run missed is made up.
    let mut h = m.hosts.host("i-ws-1");
    h.pending_restart = true;
    m.hosts.set_host("i-ws-1", h);
    let (rec, ops) = repair_ws1(&m, &deps).await;
    assert_eq!(ops, ["inventory", "restart"]);
    assert!(rec.plugins.is_empty());
    assert_eq!(rec.result.as_ref().unwrap()["restarted"], true);

    // A stopped workspace is left for its next start: no record.
    m.fleet.remove("ws-1");
    assert!(
        repair::repair_workspace(&deps, "ws-1", Trigger::Schedule, None)
            .await
            .unwrap()
            .is_none()
    );
}

/// `n` workspaces `ws-00..` with `hello` at an old digest, spread over
/// `vpcs` VPCs, and the rollout request for the registry's version.
fn fleet(n: usize, vpcs: usize) -> (Memory, Deps, RolloutRequest) {
    let (m, deps) = world();
    m.fleet.remove("ws-1");
    for i in 0..n {
        let ws = format!("ws-{i:02}");
        m.fleet.add(&ws, &format!("vpc-{}", i % vpcs));
        m.store.set_state(&ws, state(&[("hello", "old")]));
    }
    let r = RolloutRequest {
        plugin: "hello".into(),
        source: "local://hello".into(),
        org_id: None,
        max_concurrency: None,
        error_threshold: None,
    };
    (m, deps, r)
}

fn limits(max_concurrency: usize, per_vpc: usize, threshold: Threshold) -> RolloutLimits {
    RolloutLimits {
        max_concurrency,
        per_vpc,
        threshold,
    }
}

fn progress(parent: &OperationRecord) -> crate::domain::records::Progress {
    parent.progress.clone().unwrap()
}

#[tokio::test]
async fn rollout_bounds_hosts_at_once_overall_and_per_vpc() {
    let (m, deps, r) = fleet(30, 3);
    m.hosts.delay(m.clock.clone(), || Duration::from_secs(1));
    let parent = rollout::rollout(&deps, &r, limits(8, 2, Threshold::Count(0)))
        .await
        .unwrap();
    assert_eq!(parent.status, Status::Succeeded);
    assert_eq!(progress(&parent).done, 30);
    let max = m
        .hosts
        .max_running
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(max, 6, "three VPCs of two slots bind before the eight");
    for v in 0..3 {
        assert_eq!(m.hosts.max_per_vpc(&format!("vpc-{v}")), 2);
    }
    let (m, deps, r) = fleet(30, 10);
    m.hosts.delay(m.clock.clone(), || Duration::from_secs(1));
    rollout::rollout(&deps, &r, limits(4, 20, Threshold::Count(0)))
        .await
        .unwrap();
    assert_eq!(
        m.hosts
            .max_running
            .load(std::sync::atomic::Ordering::SeqCst),
        4
    );
    let digest = m.store.state_of("ws-00").plugins["hello"].digest.clone();
    assert_ne!(digest, "old");
    assert_eq!(m.hosts.host("i-ws-29").installed["hello"], digest);
}

/// Installs on these workspaces fail (the host refuses).
fn failing_on(m: &Memory, bad: &'static [&'static str]) {
    m.hosts.script(move |h, cmd| {
        let bad = bad.iter().any(|w| h.instance_id == format!("i-{w}"));
        (bad && cmd.args[0] == "install").then(|| {
            Ok(result_line(
                r#"{"status":"error","code":"bad_archive","message":"x"}"#,
                65,
            ))
        })
    });
}

#[tokio::test]
async fn rollout_stops_starting_hosts_past_the_error_threshold() {
    // A count: one failure tolerated, the second stops new starts.
    let (m, deps, r) = fleet(10, 1);
    failing_on(&m, &["ws-01", "ws-02", "ws-03"]);
    let parent = rollout::rollout(&deps, &r, limits(1, 20, Threshold::Count(1)))
        .await
        .unwrap();
    let p = progress(&parent);
    assert_eq!(parent.status, Status::Failed);
    assert_eq!((p.done, p.failed), (1, 2));
    assert_eq!(p.failed_workspaces, ["ws-01", "ws-02"]);
    assert_eq!(p.not_started.len(), 7);
    assert_eq!(
        parent.result.as_ref().unwrap()["stopped_at_error_threshold"],
        true
    );
    assert_eq!(m.store.state_of("ws-05").plugins["hello"].digest, "old");
    assert!(
        m.store.records_of("ws-05").is_empty(),
        "not started: no child record"
    );

    // A percentage: 10% of 20 tolerates two failures, and all are tried.
    let (m, deps, r) = fleet(20, 1);
    failing_on(&m, &["ws-03", "ws-07"]);
    let parent = rollout::rollout(&deps, &r, limits(1, 20, Threshold::Percent(10)))
        .await
        .unwrap();
    let p = progress(&parent);
    assert_eq!(
        (parent.status, p.done, p.failed, p.not_started.len()),
        (Status::Succeeded, 18, 2, 0)
    );
    let child = &m.store.records_of("ws-03")[0];
    assert_eq!(
        (child.status, child.parent.as_deref()),
        (Status::Failed, Some(parent.id.as_str()))
    );
}

#[tokio::test]
async fn rollout_defers_stopped_workspaces_and_never_adds_back_an_uninstalled_plugin() {
    let (m, deps, r) = fleet(3, 1);
    m.fleet.remove("ws-01");
    // ws-02's user uninstalls the plugin while the rollout is on its host.
    let store = m.store.clone();
    m.hosts.script(move |h, _| {
        if h.instance_id == "i-ws-02" {
            store.set_state("ws-02", DesiredState::default());
        }
        None
    });
    let parent = rollout::rollout(&deps, &r, limits(1, 20, Threshold::Count(0)))
        .await
        .unwrap();
    let p = progress(&parent);
    assert_eq!(
        (parent.status, p.done, p.deferred.clone()),
        (Status::Succeeded, 3, vec!["ws-01".to_string()])
    );
    let new = m.store.state_of("ws-00").plugins["hello"].digest.clone();
    assert_eq!(
        m.store.state_of("ws-01").plugins["hello"].digest,
        new,
        "deferred: desired"
    );
    assert!(m.hosts.calls().iter().all(|c| c.instance != "i-ws-01"));
    assert!(
        m.store.state_of("ws-02").plugins.is_empty(),
        "not added back"
    );
    let child = &m.store.records_of("ws-01")[0];
    assert_eq!(child.result.as_ref().unwrap()["status"], "deferred");
}

#[tokio::test]
async fn rollout_refuses_a_source_of_another_plugin_before_any_host() {
    let (m, deps, mut r) = fleet(2, 1);
    m.store
        .publish("other", &[("plugin.yaml", b"name: other\n")]);
    r.source = "local://other".into();
    let e = rollout::rollout(&deps, &r, limits(1, 1, Threshold::Count(0)))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(m.hosts.calls().is_empty() && m.store.parents().is_empty());
}

#[tokio::test]
async fn a_fetched_archive_names_itself_and_must_match_its_pin() {
    let (m, deps) = world();
    let tgz = tar_gz(&[
        ("pkg/plugin.yaml", b"name: fetched\nversion: 2\n"),
        ("pkg/rules/a.md", b"a"),
    ]);
    let sha = crate::domain::archive::sha256_hex(&tgz);
    m.fetcher.serve("https://example.test/p.tar.gz", tgz);
    let src = format!("https://example.test/p.tar.gz#sha256={sha}");
    // The tarball has a top folder only GitHub strips; https keeps it, so
    // plugin.yaml is not at the top and the name comes from the file.
    let e = install::install(&deps, &owner(), "ws-1", req(&src)).await;
    let out = e.unwrap();
    assert_eq!(
        (out.plugin.as_str(), out.name_from),
        ("p", crate::domain::source::NameFrom::Source)
    );
    m.fetcher.serve(
        "acme/tools#v1",
        tar_gz(&[("acme-tools-abc/plugin.yaml", b"name: fetched\n")]),
    );
    let out = install::install(&deps, &owner(), "ws-1", req("github://acme/tools#v1"))
        .await
        .unwrap();
    assert_eq!(
        (out.plugin.as_str(), out.name_from),
        ("fetched", crate::domain::source::NameFrom::PluginYaml)
    );
    let bad = format!("https://example.test/p.tar.gz#sha256={}", "0".repeat(64));
    let e = install::install(&deps, &owner(), "ws-1", req(&bad))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 422);
}

fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (path, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, path, *bytes).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

fn caller_of(org: &str, ws: Option<&str>, scope: &str) -> Caller {
    Caller::from_claims(Claims {
        org_id: Some(org.into()),
        workspace_id: ws.map(str::to_string),
        scope: Some(scope.into()),
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test]
async fn other_tenants_get_the_unknown_workspace_answer_and_touch_nothing() {
    let (m, deps) = world();
    m.fetcher.serve(
        "acme/tools#v1",
        tar_gz(&[("x/plugin.yaml", b"name: tools\n")]),
    );
    let unknown = install::install(&deps, &owner(), "ws-9", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(
        (unknown.status(), unknown.message),
        (404, unknown_workspace("ws-9").message)
    );
    let strangers = [
        caller_of("org-2", None, "read write admin"),
        caller_of(MEMORY_ORG, Some("ws-2"), "read write"),
    ];
    for c in &strangers {
        for source in ["hello", "github://acme/tools#v1"] {
            let e = install::install(&deps, c, "ws-1", req(source))
                .await
                .unwrap_err();
            assert_eq!(
                (e.status(), &e.message),
                (404, &unknown_workspace("ws-1").message)
            );
        }
        let e = install::uninstall(&deps, c, "ws-1", "hello")
            .await
            .unwrap_err();
        assert_eq!(e.status(), 404);
        let e = install::download(&deps, c, "ws-1", "hello", None)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 404);
        for e in [
            query::list(&deps, c, "ws-1").await.unwrap_err(),
            query::operations(&deps, c, "ws-1", 10, None)
                .await
                .unwrap_err(),
        ] {
            assert_eq!(
                (e.status(), &e.message),
                (404, &unknown_workspace("ws-1").message)
            );
        }
    }
    // Too little scope: 403 before the workspace is even looked up.
    let reader = caller_of(MEMORY_ORG, None, "read");
    let e = install::install(&deps, &reader, "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 403);
    assert_eq!(
        query::list(&deps, &caller_of(MEMORY_ORG, None, "write"), "ws-1")
            .await
            .unwrap_err()
            .status(),
        403
    );
    // A workspace without an org tag is nobody's, the platform's included.
    let mut host = m.fleet.add("ws-1", "vpc-a");
    host.org_id = None;
    m.fleet.put("ws-1", host);
    for c in [owner(), Caller::system()] {
        let e = install::install(&deps, &c, "ws-1", req("hello"))
            .await
            .unwrap_err();
        assert_eq!(e.status(), 404);
    }
    assert_eq!(
        m.fetcher.fetches.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    untouched(&m);
    // The workspace token of ws-1 does act on ws-1.
    m.fleet.add("ws-1", "vpc-a");
    let own = caller_of(MEMORY_ORG, Some("ws-1"), "read write");
    install::install(&deps, &own, "ws-1", req("hello"))
        .await
        .unwrap();
    assert_eq!(query::list(&deps, &own, "ws-1").await.unwrap().len(), 1);
}

#[tokio::test]
async fn an_allowlisted_name_cannot_be_borrowed_and_nothing_is_fetched_first() {
    let (m, deps) = world();
    // Only the registry's hello is allowed.
    let list = Allowlist::new(vec![AllowEntry::registry("hello".into())]).unwrap();
    assert!(m
        .store
        .save_allowlist(MEMORY_ORG, &list, None)
        .await
        .unwrap());
    m.fetcher.serve(
        "evil/x#main",
        tar_gz(&[("x/plugin.yaml", b"name: hello\n")]),
    );
    let e = install::install(&deps, &owner(), "ws-1", req("github://evil/x#main"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 403);
    assert_eq!(
        m.fetcher.fetches.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "refused before the fetch"
    );
    untouched(&m);
    // A prefix admitting github://evil/ for another name: fetched, then
    // refused for calling itself hello; nothing staged or sent.
    let list = Allowlist::new(vec![
        AllowEntry::registry("hello".into()),
        AllowEntry {
            name: "tools".into(),
            sources: vec!["github://evil/".into()],
            digest: None,
        },
    ])
    .unwrap();
    let (_, etag) = m.store.load_allowlist(MEMORY_ORG).await.unwrap();
    assert!(m
        .store
        .save_allowlist(MEMORY_ORG, &list, etag.as_deref())
        .await
        .unwrap());
    let e = install::install(&deps, &owner(), "ws-1", req("github://evil/x#main"))
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.message.contains("\"hello\"")), (403, true));
    assert!(m.store.staged_digests().is_empty() && m.hosts.calls().is_empty());
    // The registry's hello still installs.
    install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
}

#[tokio::test]
async fn github_fetches_carry_the_workspace_orgs_own_token_only() {
    let (m, deps) = world();
    m.credentials.set_github(MEMORY_ORG, "token-of-org-1");
    m.credentials.set_github("org-2", "token-of-org-2");
    m.fetcher.serve(
        "acme/tools#v1",
        tar_gz(&[("x/plugin.yaml", b"name: tools\n")]),
    );
    install::install(&deps, &owner(), "ws-1", req("github://acme/tools#v1"))
        .await
        .unwrap();
    let mut host = m.fleet.add("ws-2", "vpc-a");
    host.org_id = Some("org-3".into());
    m.fleet.put("ws-2", host);
    let org3 = caller_of("org-3", None, "write");
    install::install(&deps, &org3, "ws-2", req("github://acme/tools#v1"))
        .await
        .unwrap();
    assert_eq!(
        *m.fetcher.github_tokens.lock().unwrap(),
        vec![Some("token-of-org-1".to_string()), None]
    );
}

#[tokio::test]
async fn an_org_rollout_touches_that_orgs_workspaces_only() {
    let (m, deps, mut r) = fleet(4, 1);
    for ws in ["ws-02", "ws-03"] {
        let mut host = m.fleet.add(ws, "vpc-0");
        host.org_id = Some("org-2".into());
        m.fleet.put(ws, host);
    }
    r.org_id = Some(MEMORY_ORG.into());
    let parent = rollout::rollout(&deps, &r, limits(4, 4, Threshold::Count(0)))
        .await
        .unwrap();
    let p = parent.progress.unwrap();
    assert_eq!(
        (p.total, p.done, parent.org_id.as_deref()),
        (2, 2, Some(MEMORY_ORG))
    );
    let touched: Vec<String> = m.hosts.calls().iter().map(|c| c.instance.clone()).collect();
    assert!(
        touched.iter().all(|i| i == "i-ws-00" || i == "i-ws-01"),
        "{touched:?}"
    );
    assert_eq!(m.store.state_of("ws-02").plugins["hello"].digest, "old");
}

#[tokio::test]
async fn a_cross_org_rollout_parent_names_only_the_workspace_asked_about() {
    let (m, deps) = world();
    let mut other = m.fleet.add("ws-2", "vpc-a");
    other.org_id = Some("org-2".into());
    m.fleet.put("ws-2", other);
    let mut parent = OperationRecord::start(Kind::Rollout, Trigger::Request, None);
    parent.progress = Some(crate::domain::records::Progress {
        total: 3,
        failed: 2,
        failed_workspaces: vec!["ws-1".into(), "ws-2".into()],
        not_started: vec!["ws-3".into()],
        ..Default::default()
    });
    deps.records.put_record(&parent).await.unwrap();
    let seen = query::operation(&deps, &owner(), "ws-1", &parent.id)
        .await
        .unwrap();
    let p = seen.progress.unwrap();
    assert_eq!(
        (p.failed_workspaces, p.not_started),
        (vec!["ws-1".to_string()], vec![])
    );
    // The platform sees it whole; so does the org an org rollout was for.
    let whole = query::operation(&deps, &Caller::system(), "ws-1", &parent.id)
        .await
        .unwrap();
    assert_eq!(whole.progress.unwrap().failed_workspaces.len(), 2);
    parent.org_id = Some(MEMORY_ORG.into());
    deps.records.put_record(&parent).await.unwrap();
    let own = query::operation(&deps, &owner(), "ws-1", &parent.id)
        .await
        .unwrap();
    assert_eq!(own.progress.unwrap().not_started, vec!["ws-3".to_string()]);
    // Another org cannot reach it through a workspace of its own that it
    // did not touch, nor through ws-1.
    let org2 = caller_of("org-2", None, "read");
    assert_eq!(
        query::operation(&deps, &org2, "ws-1", &parent.id)
            .await
            .unwrap_err()
            .status(),
        404
    );
}

#[tokio::test]
async fn the_sweep_removes_only_old_unreferenced_archives() {
    let (m, deps) = world();
    install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    let kept = m.store.state_of("ws-1").plugins["hello"].digest.clone();
    m.store
        .publish("other", &[("plugin.yaml", b"name: other\n")]);
    install::install(&deps, &owner(), "ws-1", req("other"))
        .await
        .unwrap();
    install::uninstall(&deps, &owner(), "ws-1", "other")
        .await
        .unwrap();
    assert_eq!(m.store.staged_digests().len(), 2);
    // Young: kept.
    m.store.set_staged_age(Duration::from_secs(3600));
    let r = crate::usecases::sweep::sweep(&deps, Duration::from_secs(86400))
        .await
        .unwrap();
    assert_eq!(
        (
            r.objects_before,
            r.removed,
            r.kept_recent,
            r.kept_referenced
        ),
        (2, 0, 1, 1)
    );
    // Old: the unreferenced one goes, the referenced one stays.
    m.store.set_staged_age(Duration::from_secs(2 * 86400));
    let r = crate::usecases::sweep::sweep(&deps, Duration::from_secs(86400))
        .await
        .unwrap();
    assert_eq!((r.removed, r.kept_referenced, r.restored), (1, 1, 0));
    assert!(r.bytes_removed > 0 && r.bytes_removed < r.bytes_before);
    assert_eq!(m.store.staged_digests(), vec![kept]);
}

/// Sweeps `digest` from the staged archives and takes hello off ws-1.
async fn sweep_and_uninstall(deps: &Deps, digest: &str) {
    deps.archives.unstage(digest).await.unwrap();
    install::uninstall(deps, &owner(), "ws-1", "hello")
        .await
        .unwrap();
}

/// Installs hello on ws-1 again: the same archive, staged again. The
/// store requests it took (the check of the staged copy not counted).
async fn reinstall_requests(m: &Memory, deps: &Deps, digest: &str) -> usize {
    let before = m.store.requests();
    let out = install::install(deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    let used = m.store.requests() - before;
    assert_eq!(
        (out.status, out.digest.as_str()),
        (InstallStatus::Installed, digest)
    );
    // Staged again: reinstalls and SSM hosts can fetch it.
    assert!(deps.archives.fetch_staged(digest).await.unwrap().is_some());
    used
}

#[tokio::test]
async fn a_warm_instance_installs_from_its_copy_and_stages_a_swept_archive_again() {
    let (m, deps) = world();
    let first = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    // Swept from S3 meanwhile (a retention sweep): the instance that
    // installed it installs from its own copy and stages it again.
    sweep_and_uninstall(&deps, &first.digest).await;
    let warm = reinstall_requests(&m, &deps, &first.digest).await;
    // A new instance keeps nothing yet: it recalls (a miss: the archive
    // was swept), reads the registry files and builds the archive again.
    sweep_and_uninstall(&deps, &first.digest).await;
    let cold_deps = m.deps(Config::new("bucket"));
    let cold = reinstall_requests(&m, &cold_deps, &first.digest).await;
    assert!(warm + 3 <= cold, "warm {warm} requests, cold {cold}");
}

/// The memory hosts, counting the installs sent while their archive is
/// built; with `no_frames`, hosts that cannot cut frames (no GNU head), which
/// answer such an install before they touch anything.
struct Framing {
    hosts: Arc<crate::adapters::memory::MemoryHosts>,
    framed: std::sync::atomic::AtomicUsize,
    /// The size hint the last of them came with.
    about: std::sync::atomic::AtomicU64,
    no_frames: bool,
}

#[async_trait::async_trait]
impl crate::ports::HostTransport for Framing {
    async fn run(
        &self,
        host: &crate::domain::host::Host,
        cmd: &crate::domain::hostscript::HostCommand,
        payload: Option<&crate::ports::Payload<'_>>,
    ) -> Result<crate::domain::hostscript::HostOutput> {
        self.hosts.run(host, cmd, payload).await
    }

    async fn run_framed(
        &self,
        opened: Option<crate::ports::Opened>,
        host: &crate::domain::host::Host,
        started: &crate::domain::hostscript::HostCommand,
        name: &str,
        growing: crate::ports::Growing,
    ) -> Result<crate::domain::hostscript::HostOutput> {
        self.framed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.about
            .store(growing.borrow().about, std::sync::atomic::Ordering::Relaxed);
        if self.no_frames {
            drop(growing);
            return Ok(result_line(
                r#"{"status":"error","plugin":"hello","code":"no_frames","message":"this host cannot take an archive in frames"}"#,
                78,
            ));
        }
        self.hosts
            .run_framed(opened, host, started, name, growing)
            .await
    }
}

fn framing(m: &Memory, deps: Deps, no_frames: bool) -> (Deps, Arc<Framing>) {
    let t = Arc::new(Framing {
        hosts: m.hosts.clone(),
        framed: Default::default(),
        about: Default::default(),
        no_frames,
    });
    (
        Deps {
            transport: t.clone(),
            ..deps
        },
        t,
    )
}

#[tokio::test]
async fn a_registry_plugin_not_built_yet_is_sent_while_it_is_built_unless_a_check_needs_it_whole() {
    use std::sync::atomic::Ordering::Relaxed;
    let (m, deps) = world();
    let (deps, t) = framing(&m, deps, false);
    let out = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    assert_eq!(out.status, InstallStatus::Installed);
    assert_eq!(t.framed.load(Relaxed), 1);
    // The host is told, ahead, about how large the archive will be: the
    // listed files' bytes.
    let listed = MANIFEST.len() + b"# greet\n".len();
    assert_eq!(t.about.load(Relaxed), listed as u64);
    assert_eq!(m.store.staged_digests(), std::slice::from_ref(&out.digest));
    assert_eq!(m.store.state_of("ws-1").plugins["hello"].digest, out.digest);
    // Built lately: its digest is known first, so it goes whole (and the
    // host can find it unchanged).
    let again = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    assert_eq!(again.status, InstallStatus::Unchanged);
    assert_eq!(t.framed.load(Relaxed), 1);

    // A pin that plugin.yaml does not match: refused before anything is
    // sent (plugin.yaml is read ahead of the build).
    m.store.publish(
        "hello",
        &[
            ("plugin.yaml", b"name: hello\nversion: 1.3.0\n"),
            ("a.md", b"a\n"),
        ],
    );
    let calls = m.hosts.calls().len();
    let pinned = InstallRequest {
        source: "hello".into(),
        sha256: Some("1".repeat(64)),
    };
    let e = install::install(&deps, &owner(), "ws-1", pinned)
        .await
        .unwrap_err();
    assert_eq!(e.status(), 422);
    assert_eq!((t.framed.load(Relaxed), m.hosts.calls().len()), (1, calls));

    // An org allowlist entry that pins the digest: the archive goes whole.
    let list = Allowlist::new(vec![AllowEntry {
        name: "hello".into(),
        sources: vec!["local://hello".into()],
        digest: Some("2".repeat(64)),
    }])
    .unwrap();
    assert!(m
        .store
        .save_allowlist(MEMORY_ORG, &list, None)
        .await
        .unwrap());
    let e = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 403);
    assert_eq!((t.framed.load(Relaxed), m.hosts.calls().len()), (1, calls));
    let (_, etag) = m.store.load_allowlist(MEMORY_ORG).await.unwrap();
    let all = Allowlist::new(vec![]).unwrap();
    assert!(m
        .store
        .save_allowlist(MEMORY_ORG, &all, etag.as_deref())
        .await
        .unwrap());

    // A manifest.json pinning the tree is checked at the archive's end:
    // built whole first.
    m.store.publish(
        "hello",
        &[
            ("manifest.json", b"{}"),
            ("plugin.yaml", b"name: hello\nversion: 1.4.0\n"),
        ],
    );
    let out = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    assert_eq!(out.version, "1.4.0");
    assert_eq!(t.framed.load(Relaxed), 1);
}

#[tokio::test]
async fn a_host_that_cannot_take_frames_gets_the_archive_whole() {
    let (m, deps) = world();
    let (deps, t) = framing(&m, deps, true);
    let out = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap();
    assert_eq!(out.status, InstallStatus::Installed);
    assert_eq!(t.framed.load(std::sync::atomic::Ordering::Relaxed), 1);
    let calls = m.hosts.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].args[2..4],
        ["hello".to_string(), out.digest.clone()]
    );
    assert_eq!(calls[0].payload.as_deref(), Some(out.digest.as_str()));
    assert_eq!(m.store.staged_digests(), std::slice::from_ref(&out.digest));
    assert_eq!(m.store.state_of("ws-1").plugins["hello"].digest, out.digest);
}

#[tokio::test]
async fn a_host_reporting_another_digest_fails_the_install() {
    let (m, deps) = world();
    m.hosts.script(|_, cmd| {
        (cmd.args[0] == "install").then(|| {
            Ok(result_line(
                &format!(
                    r#"{{"status":"unchanged","plugin":"hello","digest":"{}","previous":"","previous_kind":"link","restarted":false,"pending_restart":false}}"#,
                    "3".repeat(64)
                ),
                0,
            ))
        })
    });
    let e = install::install(&deps, &owner(), "ws-1", req("hello"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 502);
    assert!(m.store.state_of("ws-1").plugins.is_empty());
}
