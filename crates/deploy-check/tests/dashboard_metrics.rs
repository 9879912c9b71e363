//! Every metric the Grafana dashboard and deploy/README.md's table query is one the code
//! records (a string literal passed to `mailsuite_runtime::metrics`), so the dashboard cannot
//! drift into empty panels when a metric is renamed.

use std::collections::BTreeSet;
use std::path::Path;

use mailsuite_deploy_check::repo_root;

/// `mailsuite_*` identifiers in `text`, with the Prometheus histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("mailsuite_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let preceded_by_ident = rest[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !preceded_by_ident {
            let mut name = &tail[..end];
            for suffix in ["_bucket", "_count", "_sum"] {
                name = name.strip_suffix(suffix).unwrap_or(name);
            }
            out.insert(name.to_string());
        }
        rest = &tail[end..];
    }
    out
}

fn rust_sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Metric names that appear as string literals in the services' and the runtime's code.
fn recorded_metrics() -> BTreeSet<String> {
    let mut files = Vec::new();
    for krate in std::fs::read_dir(repo_root().join("crates"))
        .unwrap()
        .flatten()
    {
        let src = krate.path().join("src");
        if src.is_dir() && krate.file_name() != "deploy-check" {
            rust_sources(&src, &mut files);
        }
    }
    let mut names = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        // Doc comments (examples) record nothing.
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for lit in code.split('"').skip(1).step_by(2) {
            if lit.starts_with("mailsuite_")
                && lit.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                names.insert(lit.to_string());
            }
        }
    }
    names
}

#[test]
fn dashboard_and_readme_metrics_are_recorded_by_the_code() {
    let recorded = recorded_metrics();
    let dashboard =
        std::fs::read_to_string(repo_root().join("deploy/grafana/mailsuite.json")).unwrap();
    let readme = std::fs::read_to_string(repo_root().join("deploy/README.md")).unwrap();
    let wanted = metric_names(&dashboard);
    assert!(wanted.len() >= 10, "dashboard queries only {wanted:?}");
    let mut missing: Vec<String> = wanted.difference(&recorded).cloned().collect();
    let table: BTreeSet<String> = readme
        .lines()
        .filter(|l| l.starts_with("| `mailsuite_"))
        .flat_map(metric_names)
        .collect();
    assert!(table.len() >= 10, "README table lists only {table:?}");
    missing.extend(table.difference(&recorded).cloned());
    assert!(
        missing.is_empty(),
        "queried but never recorded: {missing:?}\nrecorded: {recorded:?}"
    );
}

#[test]
fn metric_name_extraction() {
    let n = metric_names(
        r#"rate(mailsuite_a_total[5m]) + x_mailsuite_b + histogram_quantile(0.9, mailsuite_c_seconds_bucket)"#,
    );
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        ["mailsuite_a_total", "mailsuite_c_seconds"]
    );
}
