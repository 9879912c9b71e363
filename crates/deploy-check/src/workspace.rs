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

/// How long a service's `main` lets `Shutdown::drain` wait, following the argument of
/// `.drain(..)`: a `Duration::from_secs(N)` literal, a `let` binding, a command-line flag's
/// `default_value_t = N`, or a configuration field's default (`field: N,` in the `Default`
/// impl of `config.rs`).
pub fn drain_seconds(main_rs: &str, config_rs: &str) -> Result<u64, String> {
    if main_rs.contains("service::{Service") || main_rs.contains("service::Service") {
        return service_grace(main_rs, config_rs);
    }
    let lines: Vec<&str> = main_rs.lines().collect();
    let line = lines
        .iter()
        .find(|l| l.contains(".drain("))
        .ok_or("no .drain( call")?;
    let mut expr = line
        .split(".drain(")
        .nth(1)
        .and_then(|r| r.rsplit_once(')'))
        .map(|(a, _)| a.trim().to_string())
        .ok_or("unreadable .drain( call")?;
    for _ in 0..4 {
        if let Some(n) = number_after(&expr, "from_secs(") {
            return Ok(n);
        }
        let inner = match expr.split_once("from_secs(") {
            Some((_, r)) => r.split(')').next().unwrap_or("").trim().to_string(),
            None => expr.trim_end_matches(')').trim().to_string(),
        };
        let ident = inner.rsplit('.').next().unwrap_or("").trim().to_string();
        if ident.is_empty() || !ident.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("cannot follow drain argument {expr:?}"));
        }
        // `let grace = <expr>;` → follow it.
        if let Some(rhs) = lines.iter().find_map(|l| {
            l.trim_start()
                .strip_prefix(&format!("let {ident} = "))
                .map(|r| r.trim_end_matches(';').to_string())
        }) {
            expr = rhs;
            continue;
        }
        // A flag: `#[arg(.., default_value_t = N)]` just above `ident: u64`.
        if let Some(idx) = lines
            .iter()
            .position(|l| l.trim_start().starts_with(&format!("{ident}:")))
            && let Some(n) = lines[idx.saturating_sub(3)..idx]
                .iter()
                .rev()
                .find_map(|l| number_after(l, "default_value_t = "))
        {
            return Ok(n);
        }
        // A configuration field: its default, `ident: N,`.
        if let Some(n) = config_default(config_rs, &ident) {
            return Ok(n);
        }
        return Err(format!("cannot find the value of {ident}"));
    }
    Err(format!("cannot follow drain argument {expr:?}"))
}

/// The default of configuration field `field`: the `field: N,` line of its `Default` impl.
fn config_default(config_rs: &str, field: &str) -> Option<u64> {
    config_rs.lines().find_map(|l| {
        let t = l.trim_start().strip_prefix(&format!("{field}: "))?;
        let digits: String = t
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '_')
            .collect();
        digits.replace('_', "").parse().ok()
    })
}

/// The grace period of a `main` built on the shared `mailsuite_runtime::service::Service`:
/// the configuration field its `config_grace` reads (that field's default), else the
/// `Duration::from_secs(N)` it passes to `Service::new`.
fn service_grace(main_rs: &str, config_rs: &str) -> Result<u64, String> {
    let flat: String = main_rs.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(i) = flat.find("config_grace:") {
        let rest = &flat[i..];
        let field = rest
            .split("from_secs(")
            .nth(1)
            .and_then(|body| body.split(')').next())
            .and_then(|arg| arg.rsplit('.').next())
            .ok_or("unreadable config_grace")?;
        return config_default(config_rs, field)
            .ok_or_else(|| format!("cannot find the default of {field}"));
    }
    let new = flat.find("::new(").ok_or("no Service::new(")?;
    number_after(&flat[new..], "from_secs(").ok_or_else(|| "no grace in Service::new".into())
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
        // The runtime's shared sections (tls, listener limits, PROXY protocol).
        files.push(src.join("tls.rs"));
        files.push(src.join("listener.rs"));
        files.push(src.join("proxy_protocol.rs"));
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
    fn drain_from_literal_flag_binding_or_config() {
        assert_eq!(
            drain_seconds(
                "x\n    sd.drain(std::time::Duration::from_secs(30)).await;\n",
                ""
            ),
            Ok(30)
        );
        let flag = "struct A {\n    /// Seconds.\n    #[arg(long, default_value_t = 12)]\n    grace_secs: u64,\n}\nfn m() { sd.drain(Duration::from_secs(args.grace_secs)).await; }\n";
        assert_eq!(drain_seconds(flag, ""), Ok(12));
        let config = "    let grace = Duration::from_secs(config.shutdown_grace_secs);\n    shutdown.drain(grace).await;\n";
        assert_eq!(
            drain_seconds(
                config,
                "pub shutdown_grace_secs: u64,\n            shutdown_grace_secs: 1_0,\n"
            ),
            Ok(10)
        );
        assert!(drain_seconds("fn main() {}", "").is_err());
        let shared = "use mailsuite_runtime::service::{Service, ServiceArgs};\n    Service::<x::Config>::new(\"imap\", Duration::from_secs(30))\n    .run(args.service, x::start)\n";
        assert_eq!(drain_seconds(shared, ""), Ok(30));
        let from_config = "use mailsuite_runtime::service::{Service, ServiceArgs};\n    Service {\n        config_grace: |c: &x::Config| Some(Duration::from_secs(c.shutdown_grace_secs)),\n        ..Service::<x::Config>::new(\"q\", Duration::from_secs(10))\n    }\n";
        assert_eq!(
            drain_seconds(from_config, "            shutdown_grace_secs: 25,\n"),
            Ok(25)
        );
        assert!(drain_seconds(from_config, "").is_err());
        assert!(drain_seconds("sd.drain(grace).await;", "").is_err());
    }
}
