//! The functions' temp space as template.yaml grants it: an install of a
//! plugin at the size cap fits in the install function's EphemeralStorage,
//! and every exit path frees what it used. The test's own process gets a
//! tmpfs of exactly that size as its temp dir (its own test binary, so no
//! other test shares the setting).

use std::path::Path;
use std::process::Command;

use acceptance::*;

/// The install function's EphemeralStorage, in MiB, from template.yaml.
fn granted_mib() -> u64 {
    let text = std::fs::read_to_string(repo_root().join("template.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    doc["Resources"]["InstallFunction"]["Properties"]["EphemeralStorage"]["Size"]
        .as_u64()
        .expect("InstallFunction has an EphemeralStorage size")
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("pd-tmpfs-")
            .tempdir()
            .unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=1777"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "mounting a tmpfs needs root, as the stack does"
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_at_the_size_cap_fits_the_granted_temp_space_and_leaves_it_empty() {
    let f = Fixture::new().await;
    let cfg = f.config();
    let cap = cfg.max_tree_bytes;
    assert_eq!(cap, 100 * 1024 * 1024, "the deployment's cap");
    // Exactly the cap: plugin.yaml plus incompressible files.
    let manifest = b"name: biggest\nversion: 1.0.0\n".to_vec();
    let mut files: Vec<(String, Vec<u8>)> = vec![("plugin.yaml".into(), manifest.clone())];
    let mut left = cap as usize - manifest.len();
    let mut i = 0;
    while left > 0 {
        let n = left.min(20 * 1024 * 1024);
        files.push((format!("assets/blob{i:02}.bin"), noise(n, i as u64 + 7)));
        left -= n;
        i += 1;
    }
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    f.publish("biggest", &refs).await;

    let tmp = Tmpfs::mount(granted_mib());
    std::env::set_var("TMPDIR", tmp.0.path());
    assert_eq!(std::env::temp_dir(), tmp.0.path());
    let app = f.app_with(cfg);
    let (s, b) = install(&app, &f.workspace, r#"{"source":"biggest"}"#).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        std::fs::metadata(f.plugin_dir("biggest").join("assets/blob00.bin"))
            .unwrap()
            .len(),
        20 * 1024 * 1024
    );
    assert_eq!(
        entries(tmp.0.path()),
        Vec::<String>::new(),
        "freed after success"
    );

    // One byte over the cap: refused, and nothing left behind either.
    let mut over = files.clone();
    over.push(("assets/one-more".into(), b"x".to_vec()));
    let refs: Vec<(&str, &[u8])> = over
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    f.publish("biggest", &refs).await;
    let (s, b) = install(&app, &f.workspace, r#"{"source":"biggest"}"#).await;
    assert_eq!(s, 413, "{b}");
    assert_eq!(
        entries(tmp.0.path()),
        Vec::<String>::new(),
        "freed after a refusal"
    );
}
