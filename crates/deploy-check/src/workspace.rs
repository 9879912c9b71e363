//! What the workspace builds, from `cargo metadata` (the authority on target names, including
//! implicit `src/main.rs` binaries).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::Error;

/// Binary target name → package name, for every workspace member.
pub fn binaries(root: &Path) -> Result<BTreeMap<String, String>, Error> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .output()
        .map_err(|e| Error::Cargo(e.to_string()))?;
    if !out.status.success() {
        return Err(Error::Cargo(String::from_utf8_lossy(&out.stderr).into()));
    }
    let meta: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| Error::Cargo(e.to_string()))?;
    Ok(binaries_from_metadata(&meta))
}

pub fn binaries_from_metadata(meta: &Value) -> BTreeMap<String, String> {
    let mut bins = BTreeMap::new();
    for pkg in meta["packages"].as_array().into_iter().flatten() {
        let pkg_name = pkg["name"].as_str().unwrap_or_default();
        for t in pkg["targets"].as_array().into_iter().flatten() {
            let is_bin = t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"));
            if is_bin && let Some(name) = t["name"].as_str() {
                bins.insert(name.to_string(), pkg_name.to_string());
            }
        }
    }
    bins
}
