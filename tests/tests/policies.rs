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
                let actions: Vec<String> = match &st["Action"] {
                    serde_yaml::Value::String(a) => vec![a.clone()],
                    serde_yaml::Value::Sequence(v) => v
                        .iter()
                        .filter_map(|a| a.as_str().map(str::to_string))
                        .collect(),
                    _ => vec![],
                };
                let resource = serde_yaml::to_string(&st["Resource"]).unwrap();
                for a in actions {
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
