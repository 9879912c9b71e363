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

fn number_after(line: &str, marker: &str) -> Option<u64> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// How long a service's `main` lets `Shutdown::drain` wait: the literal in
/// `drain(Duration::from_secs(N))`, or the `default_value_t` of the flag it passes there.
pub fn drain_seconds(main_rs: &str) -> Option<u64> {
    let lines: Vec<&str> = main_rs.lines().collect();
    let line = lines.iter().find(|l| l.contains(".drain("))?;
    if let Some(n) = number_after(line, "from_secs(") {
        return Some(n);
    }
    let arg = line.split("from_secs(").nth(1)?.split(')').next()?;
    let field = arg.rsplit('.').next()?.trim();
    let idx = lines
        .iter()
        .position(|l| l.trim_start().starts_with(&format!("{field}:")))?;
    lines[idx.saturating_sub(3)..idx]
        .iter()
        .rev()
        .find_map(|l| number_after(l, "default_value_t = "))
}

/// Every `pub name:` field declared in the services' configuration modules: the keys a
/// `MAILSUITE_<NAME>` variable can set.
pub fn config_keys(root: &Path) -> Result<std::collections::BTreeSet<String>, Error> {
    let mut keys = std::collections::BTreeSet::new();
    let crates = root.join("crates");
    let entries = std::fs::read_dir(&crates).map_err(|source| Error::Io {
        path: crates.clone(),
        source,
    })?;
    for krate in entries.flatten() {
        let src = krate.path().join("src");
        let mut files = vec![src.join("config.rs")];
        if let Ok(dir) = std::fs::read_dir(src.join("config")) {
            files.extend(dir.flatten().map(|e| e.path()));
        }
        // The runtime's shared sections (tls, listener limits).
        files.push(src.join("tls.rs"));
        files.push(src.join("listener.rs"));
        for f in files.iter().filter(|f| f.is_file()) {
            for line in crate::read(f)?.lines() {
                let Some(rest) = line.trim_start().strip_prefix("pub ") else {
                    continue;
                };
                if let Some((name, _)) = rest.split_once(':')
                    && !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                {
                    keys.insert(name.to_string());
                }
            }
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_from_literal_or_flag_default() {
        assert_eq!(
            drain_seconds("x\n    sd.drain(std::time::Duration::from_secs(30)).await;\n"),
            Some(30)
        );
        let flag = "struct A {\n    /// Seconds.\n    #[arg(long, default_value_t = 12)]\n    grace_secs: u64,\n}\nfn m() { sd.drain(Duration::from_secs(args.grace_secs)).await; }\n";
        assert_eq!(drain_seconds(flag), Some(12));
        assert_eq!(drain_seconds("fn main() {}"), None);
    }
}
