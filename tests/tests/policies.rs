//! What template.yaml grants, read as a reviewer would: no function may
//! write the shared registry or the org allowlists except the allowlist
//! function (its own route), and reading a workspace's tenant is possible
//! wherever a route must check it.

use acceptance::repo_root;

fn template() -> serde_yaml::Value {
    let text = std::fs::read_to_string(repo_root().join("template.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// (function, action, resource text) of every inline policy statement.
fn grants() -> Vec<(String, String, String)> {
    let doc = template();
    let mut out = Vec::new();
    for (name, res) in doc["Resources"].as_mapping().unwrap() {
        if res["Type"].as_str() != Some("AWS::Serverless::Function") {
            continue;
        }
        let name = name.as_str().unwrap().to_string();
        for policy in res["Properties"]["Policies"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            for st in policy["Statement"].as_sequence().into_iter().flatten() {
                if st["Effect"].as_str() != Some("Allow") {
                    continue;
                }
                let resource = serde_yaml::to_string(&st["Resource"]).unwrap();
                for a in actions(st) {
                    out.push((name.clone(), a, resource.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn only_the_allowlist_function_writes_org_settings_and_nobody_the_registry() {
    let g = grants();
    assert!(g.len() > 20, "{g:?}");
    for (f, action, resource) in &g {
        if action == "s3:PutObject" || action == "s3:*" {
            assert!(
                !resource.contains("registry/"),
                "{f} may write the registry: {resource}"
            );
            if resource.contains("orgs/") {
                assert_eq!(f, "AllowlistFunction", "{f} may write org allowlists");
            }
        }
    }
}

#[test]
fn every_function_that_checks_a_workspace_can_read_its_tenant() {
    let g = grants();
    for f in ["ListFunction", "CatalogFunction", "OperationsFunction"] {
        assert!(
            g.iter()
                .any(|(n, a, _)| n == f && a == "ec2:DescribeInstances"),
            "{f} cannot read the org tag"
        );
    }
}

#[test]
fn records_expire_by_the_tag_the_functions_write_and_old_versions_go() {
    let doc = template();
    let rules = doc["Resources"]["PluginBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
        .as_sequence()
        .unwrap()
        .clone();
    let (key, value) = plugin_delivery::adapters::s3::RECORD_TAG;
    let records = rules
        .iter()
        .find(|r| r["Id"].as_str() == Some("ExpireOperationRecords"))
        .expect("a rule for records");
    assert_eq!(records["TagFilters"][0]["Key"].as_str(), Some(key));
    assert_eq!(records["TagFilters"][0]["Value"].as_str(), Some(value));
    assert!(records.get("Prefix").is_none(), "records share no prefix");
    // `!Ref NoncurrentVersionDays`: a tagged value, present.
    assert!(rules
        .iter()
        .any(|r| !r["NoncurrentVersionExpiration"]["NoncurrentDays"].is_null()));
    // Whoever writes records may tag them.
    let g = grants();
    for f in ["InstallFunction", "UninstallFunction", "ReinstallFunction"] {
        assert!(
            g.iter()
                .any(|(n, a, _)| n == f && a == "s3:PutObjectTagging"),
            "{f} cannot tag its records"
        );
    }
}

#[test]
fn functions_that_build_or_download_archives_get_disk_for_them() {
    let doc = template();
    let size = |f: &str| doc["Resources"][f]["Properties"]["EphemeralStorage"]["Size"].as_u64();
    // Twice the 100 MiB size cap for one operation, with room; the
    // reinstall function runs up to 10 hosts at once.
    assert!(size("InstallFunction").unwrap() >= 1024);
    assert!(size("DownloadFunction").unwrap() >= 1024);
    assert!(size("ReinstallFunction").unwrap() >= 2048);
    // The reinstall function bounds its hosts at once by what it was given.
    let told = doc["Resources"]["ReinstallFunction"]["Properties"]["Environment"]["Variables"]
        ["PLUGIN_TEMP_SPACE_MIB"]
        .as_str()
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(told, size("ReinstallFunction"));
}

/// The statements of every resource (function inline policies and managed
/// policies alike), with the resource's name.
fn statements() -> Vec<(String, serde_yaml::Value)> {
    let doc = template();
    let mut out = Vec::new();
    for (name, res) in doc["Resources"].as_mapping().unwrap() {
        let name = name.as_str().unwrap().to_string();
        let props = &res["Properties"];
        let docs: Vec<&serde_yaml::Value> = match res["Type"].as_str() {
            Some("AWS::Serverless::Function") => props["Policies"]
                .as_sequence()
                .into_iter()
                .flatten()
                .collect(),
            Some("AWS::IAM::ManagedPolicy") => vec![&props["PolicyDocument"]],
            _ => vec![],
        };
        for d in docs {
            for st in d["Statement"].as_sequence().into_iter().flatten() {
                out.push((name.clone(), st.clone()));
            }
        }
    }
    out
}

fn actions(st: &serde_yaml::Value) -> Vec<String> {
    strings(&st["Action"])
}

fn strings(v: &serde_yaml::Value) -> Vec<String> {
    let mut out: Vec<String> = match v {
        serde_yaml::Value::String(s) => vec![s.clone()],
        serde_yaml::Value::Sequence(v) => v
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect(),
        _ => vec![],
    };
    out.sort();
    out
}

/// What each function lists, read from the code (`adapters/s3.rs`: the
/// registry by name and as a whole, `workspaces/` for repair and rollouts,
/// a workspace's `operations/`, `staged/` for the sweep): a list naming
/// another prefix is refused. (`StringLikeIfExists`: a list naming no prefix
/// stays allowed, which the 404-not-403 check for missing keys needs.)
#[test]
fn listing_is_held_to_the_prefixes_each_function_lists() {
    let expected: &[(&str, &[&str])] = &[
        ("InstallFunction", &["registry/*"]),
        ("UninstallFunction", &["workspaces/*"]),
        ("ListFunction", &["workspaces/*"]),
        ("CatalogFunction", &["registry/*"]),
        ("DownloadFunction", &["registry/*"]),
        ("AllowlistFunction", &["orgs/*"]),
        ("OperationsFunction", &["workspaces/*"]),
        (
            "ReinstallFunction",
            &["registry/*", "staged/*", "workspaces/*"],
        ),
    ];
    let mut seen = Vec::new();
    for (f, st) in statements() {
        let acts = actions(&st);
        if acts.iter().any(|a| a == "s3:ListBucket" || a == "s3:*") {
            assert_eq!(acts, ["s3:ListBucket"], "{f}: listing shares a statement");
            let prefixes = strings(&st["Condition"]["StringLikeIfExists"]["s3:prefix"]);
            let want = expected
                .iter()
                .find(|(name, _)| *name == f)
                .unwrap_or_else(|| panic!("{f} lists the bucket but is not in the table"));
            assert_eq!(prefixes, want.1, "{f}: ListBucket prefixes");
            seen.push(f.clone());
        }
        if acts.iter().any(|a| a == "s3:ListBucketVersions") {
            assert_eq!(f, "ReinstallFunction");
            assert_eq!(
                strings(&st["Condition"]["StringLike"]["s3:prefix"]),
                ["staged/*"]
            );
        }
    }
    seen.sort();
    let mut all: Vec<String> = expected.iter().map(|(n, _)| n.to_string()).collect();
    all.sort();
    assert_eq!(seen, all);
}

/// GetCommandInvocation, CancelCommand and DescribeInstanceInformation have
/// no resource type in Systems Manager's authorization reference, so their
/// resource is "*": held to the deployment's region, and granted to no
/// function that never runs a command.
#[test]
fn command_follow_up_grants_are_held_to_the_region() {
    let mut found = 0;
    for (name, st) in statements() {
        let acts = actions(&st);
        if acts
            .iter()
            .any(|a| a == "ssm:GetCommandInvocation" || a == "ssm:CancelCommand")
        {
            found += 1;
            let region = &st["Condition"]["StringEquals"]["aws:RequestedRegion"];
            assert!(
                serde_yaml::to_string(region)
                    .unwrap()
                    .contains("AWS::Region"),
                "{name}: {st:?}"
            );
            assert!(!acts.iter().any(|a| a == "ssm:*" || a == "ssm:SendCommand"));
        }
    }
    assert_eq!(found, 1, "one statement grants the command follow-up");
}
