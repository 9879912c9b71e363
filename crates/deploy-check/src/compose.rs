//! Checks on `docker-compose.yml`: it parses; every service builds from a Dockerfile target
//! that exists; PostgreSQL is pinned, checked and persistent; migrations run once before the
//! services; every service has a health check and waits on real conditions; nothing that
//! scales has a fixed name or host port; the mail ports are published by a balancer whose
//! backends are the services; observability (collector, trace viewer, Prometheus) is wired to
//! services and ports that exist.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::dockerfile::Dockerfile;
use crate::yaml::{list_at, str_at};
use crate::{MAIL_PORTS, SERVICES};

/// Compose's variable interpolation with every variable unset: `${X:-d}` and `${X-d}` give
/// `d`, `${X}` and `$X` give "", `$$` is a literal `$`.
pub fn interpolate(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(a) = after.strip_prefix('{') {
            let Some(end) = a.find('}') else {
                out.push_str(&rest[i..]);
                return out;
            };
            let expr = &a[..end];
            if let Some((_, d)) = expr.split_once(":-").or_else(|| expr.split_once('-')) {
                out.push_str(d);
            }
            rest = &a[end + 1..];
        } else {
            let n = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            rest = &after[n..];
        }
    }
    out.push_str(rest);
    out
}

/// The published host port of a `ports:` entry (`[ip:]host:container[/proto]` or long form).
pub fn published_port(entry: &Value) -> Option<u16> {
    if let Some(p) = entry.get("published") {
        return match p {
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Value::String(s) => interpolate(s).parse().ok(),
            _ => None,
        };
    }
    let s = interpolate(entry.as_str()?);
    let s = s.split('/').next()?;
    let parts: Vec<&str> = s.rsplitn(3, ':').collect();
    match parts.as_slice() {
        [_container, host, ..] => host.parse().ok(),
        _ => None,
    }
}

fn depends_on(svc: &Value) -> Vec<(String, Option<String>)> {
    match svc.get("depends_on") {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| (k.clone(), v["condition"].as_str().map(str::to_string)))
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(|s| (s.to_string(), None)))
            .collect(),
        _ => Vec::new(),
    }
}

fn profiles(svc: &Value) -> Vec<&str> {
    list_at(svc, &["profiles"])
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

fn healthcheck_text(svc: &Value) -> Option<String> {
    match svc.get("healthcheck")?.get("test")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => Some(
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    }
}

/// Bind-mount (source, target) pairs of a service, sources interpolated.
pub fn bind_mounts(svc: &Value) -> Vec<(String, String)> {
    list_at(svc, &["volumes"])
        .iter()
        .filter_map(|v| match v {
            Value::String(s) => {
                let s = interpolate(s);
                let mut it = s.splitn(3, ':');
                let (src, dst) = (it.next()?.to_string(), it.next()?.to_string());
                (src.starts_with('.') || src.starts_with('/')).then_some((src, dst))
            }
            Value::Object(_) if v["type"] == "bind" => Some((
                interpolate(v["source"].as_str()?),
                v["target"].as_str()?.to_string(),
            )),
            _ => None,
        })
        .collect()
}

/// Service attributes of the Compose Specification that `docker-compose.yml` may use: a
/// misspelt key is otherwise silently ignored by nothing but this check.
pub const SERVICE_KEYS: &[&str] = &[
    "build",
    "cap_add",
    "cap_drop",
    "command",
    "configs",
    "container_name",
    "depends_on",
    "deploy",
    "entrypoint",
    "env_file",
    "environment",
    "expose",
    "extra_hosts",
    "healthcheck",
    "hostname",
    "image",
    "init",
    "labels",
    "logging",
    "networks",
    "pid",
    "platform",
    "ports",
    "profiles",
    "pull_policy",
    "read_only",
    "restart",
    "secrets",
    "security_opt",
    "shm_size",
    "stop_grace_period",
    "stop_signal",
    "sysctls",
    "tmpfs",
    "ulimits",
    "user",
    "volumes",
    "working_dir",
];
const TOP_KEYS: &[&str] = &[
    "name", "services", "volumes", "networks", "configs", "secrets",
];
const HEALTHCHECK_KEYS: &[&str] = &[
    "test",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "start_interval",
    "disable",
];
const BUILD_KEYS: &[&str] = &[
    "context",
    "dockerfile",
    "target",
    "args",
    "cache_from",
    "cache_to",
    "labels",
    "platforms",
    "secrets",
    "ssh",
    "tags",
    "network",
    "shm_size",
    "additional_contexts",
    "no_cache",
    "pull",
];

fn unknown_keys(v: &Value, known: &[&str], what: &str, p: &mut impl FnMut(String)) {
    for k in v.as_object().into_iter().flat_map(|m| m.keys()) {
        if !k.starts_with("x-") && !known.contains(&k.as_str()) {
            p(format!("{what}: unknown key {k:?}"));
        }
    }
}

/// Problems with the compose file `c`, whose relative paths start at `root`.
pub fn check(c: &Value, df: &Dockerfile, root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let mut p = |m: String| problems.push(m);
    let Some(services) = c["services"].as_object() else {
        return vec!["no services".into()];
    };
    let named_volumes: BTreeSet<&str> = c["volumes"]
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();

    unknown_keys(c, TOP_KEYS, "top level", &mut p);
    for (name, svc) in services {
        unknown_keys(svc, SERVICE_KEYS, name, &mut p);
        if let Some(h) = svc.get("healthcheck") {
            unknown_keys(h, HEALTHCHECK_KEYS, &format!("{name}.healthcheck"), &mut p);
        }
        if let Some(b) = svc.get("build").filter(|b| b.is_object()) {
            unknown_keys(b, BUILD_KEYS, &format!("{name}.build"), &mut p);
        }
        if svc.get("container_name").is_some() {
            p(format!(
                "{name}: container_name prevents scaling and parallel projects"
            ));
        }
        if let Some(b) = svc.get("build") {
            let ctx = root.join(interpolate(b["context"].as_str().unwrap_or(".")));
            let file = ctx.join(b["dockerfile"].as_str().unwrap_or("Dockerfile"));
            if !file.is_file() {
                p(format!(
                    "{name}: Dockerfile {} does not exist",
                    file.display()
                ));
            }
            // The services' images come from deploy/Dockerfile's targets; PostgreSQL and the
            // balancer have small Dockerfiles of their own (checked to exist above).
            let main_dockerfile = b["dockerfile"].as_str() == Some("deploy/Dockerfile");
            match b["target"].as_str() {
                Some(t) if main_dockerfile && df.stage(t).is_some() => {}
                None if !main_dockerfile => {}
                t => p(format!(
                    "{name}: build target {t:?} is not a deploy/Dockerfile stage"
                )),
            }
        }
        for (dep, cond) in depends_on(svc) {
            let Some(target) = services.get(&dep) else {
                p(format!("{name}: depends on unknown service {dep}"));
                continue;
            };
            if profiles(svc).is_empty() && !profiles(target).is_empty() {
                p(format!(
                    "{name}: depends on {dep}, which only runs in a profile"
                ));
            }
            match cond.as_deref() {
                Some("service_healthy") if target.get("healthcheck").is_none() => p(format!(
                    "{name}: waits for {dep} to be healthy, but {dep} has no healthcheck"
                )),
                Some("service_completed_successfully")
                    if !matches!(target["restart"].as_str(), Some("no")) =>
                {
                    p(format!(
                        "{name}: waits for {dep} to complete, but {dep} is not one-shot (restart: \"no\")"
                    ))
                }
                Some("service_healthy" | "service_completed_successfully" | "service_started") => {}
                other => p(format!("{name}: depends_on {dep} with condition {other:?}")),
            }
        }
        for (src, _) in bind_mounts(svc) {
            if src.starts_with("./deploy/") && !root.join(&src).exists() {
                p(format!("{name}: mounts {src}, which does not exist"));
            }
        }
    }

    // PostgreSQL.
    match services.get("postgres") {
        None => p("no postgres service".into()),
        Some(pg) => {
            // Built here from Debian's packages (one major version per Debian release), or an
            // official image pinned to a major version.
            let image = pg["image"].as_str().unwrap_or_default();
            let tag = image.strip_prefix("postgres:").unwrap_or_default();
            let built = pg["build"]["context"].as_str() == Some("deploy/postgres");
            if !built && !tag.starts_with(|c: char| c.is_ascii_digit()) {
                p(format!(
                    "postgres image {image:?} is not pinned to a major version"
                ));
            }
            if pg.get("healthcheck").is_none() {
                p("postgres has no healthcheck".into());
            }
            let persistent = list_at(pg, &["volumes"]).iter().any(|v| {
                let src = v
                    .as_str()
                    .and_then(|s| s.split(':').next())
                    .or(v["source"].as_str());
                src.is_some_and(|s| named_volumes.contains(s))
            });
            if !persistent {
                p("postgres data is not on a named volume".into());
            }
        }
    }

    // One-shot migration before the database owners start.
    let migrate = services.iter().find(|(_, s)| {
        let cmd = match &s["command"] {
            Value::String(x) => x.clone(),
            Value::Array(a) => a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        };
        cmd.split_whitespace().any(|w| w == "migrate")
            && str_at(s, &["build", "target"]) == Some("mailctl")
    });
    match migrate {
        None => p("no one-shot service runs `mailctl migrate`".into()),
        Some((mname, m)) => {
            if m["restart"] != "no" {
                p(format!("{mname}: a one-shot step needs restart: \"no\""));
            }
            if !depends_on(m)
                .iter()
                .any(|(d, c)| d == "postgres" && c.as_deref() == Some("service_healthy"))
            {
                p(format!("{mname}: does not wait for postgres to be healthy"));
            }
            for owner in ["mailbox-store", "relay-queue"] {
                let waits = services.get(owner).is_some_and(|s| {
                    depends_on(s).iter().any(|(d, c)| {
                        d == mname && c.as_deref() == Some("service_completed_successfully")
                    })
                });
                if !waits {
                    p(format!("{owner}: does not wait for {mname} to complete"));
                }
            }
        }
    }

    // The five services.
    for s in SERVICES {
        let Some(svc) = services.get(s.name) else {
            p(format!("no compose service {}", s.name));
            continue;
        };
        if str_at(svc, &["build", "target"]) != Some(s.name) {
            p(format!(
                "{}: does not build Dockerfile target {}",
                s.name, s.name
            ));
        }
        match healthcheck_text(svc) {
            Some(t) if t.contains(&s.ops_port.to_string()) => {}
            t => p(format!(
                "{}: healthcheck {t:?} does not probe ops port {}",
                s.name, s.ops_port
            )),
        }
        if depends_on(svc).is_empty() {
            p(format!("{}: starts without waiting for anything", s.name));
        }
        if svc.get("ports").is_some() {
            p(format!(
                "{}: publishes host ports, so it cannot be scaled",
                s.name
            ));
        }
        if !s.mail_ports.is_empty() {
            let tls_dir = bind_mounts(svc)
                .into_iter()
                .find(|(_, dst)| dst.contains("tls"))
                .map(|(_, d)| d);
            let cert = str_at(svc, &["environment", "MAILSUITE_TLS__CERT"]).unwrap_or_default();
            match tls_dir {
                Some(d) if cert.starts_with(&d) => {}
                d => p(format!(
                    "{}: TLS certificate {cert:?} is not in a mounted directory ({d:?})",
                    s.name
                )),
            }
        }
    }

    // Mail ports published once, by a balancer whose backends are the right services.
    let publishers: Vec<(&String, &Value)> = services
        .iter()
        .filter(|(_, s)| {
            list_at(s, &["ports"])
                .iter()
                .any(|e| published_port(e).is_some_and(|p| MAIL_PORTS.contains(&p)))
        })
        .collect();
    for port in MAIL_PORTS {
        let n = publishers
            .iter()
            .filter(|(_, s)| {
                list_at(s, &["ports"])
                    .iter()
                    .any(|e| published_port(e) == Some(*port))
            })
            .count();
        if n != 1 {
            p(format!("mail port {port} is published by {n} services"));
        }
    }
    for (lbname, lb) in &publishers {
        let cfg = bind_mounts(lb)
            .into_iter()
            .find(|(_, d)| d.ends_with("haproxy.cfg"));
        let Some((src, _)) = cfg else {
            p(format!(
                "{lbname}: publishes mail ports but mounts no haproxy.cfg"
            ));
            continue;
        };
        match std::fs::read_to_string(root.join(&src)) {
            Ok(text) => p_all(&mut p, check_haproxy(&text, services)),
            Err(e) => p(format!("{lbname}: {src}: {e}")),
        }
    }

    // Observability profile.
    for name in ["otel-collector", "jaeger"] {
        match services.get(name) {
            Some(s) if profiles(s).contains(&"observability") => {}
            Some(_) => p(format!("{name}: not on the observability profile")),
            None => p(format!("no {name} service")),
        }
    }
    if let Some(col) = services.get("otel-collector") {
        let cfg = bind_mounts(col)
            .into_iter()
            .find(|(src, _)| src.ends_with(".yaml") || src.ends_with(".yml"));
        match cfg {
            None => p("otel-collector: no mounted configuration".into()),
            Some((src, _)) => match crate::yaml::load_one(&root.join(&src)) {
                Ok(v) => p_all(&mut p, check_collector(&v, services)),
                Err(e) => p(format!("otel-collector: {e}")),
            },
        }
    }
    if let Some(prom) = services.get("prometheus") {
        for (src, dst) in bind_mounts(prom) {
            if dst.ends_with("prometheus.yml") {
                match crate::yaml::load_one(&root.join(&src)) {
                    Ok(v) => p_all(&mut p, check_prometheus(&v)),
                    Err(e) => p(format!("prometheus: {e}")),
                }
            }
        }
    }
    problems
}

fn p_all(p: &mut impl FnMut(String), ms: Vec<String>) {
    for m in ms {
        p(m);
    }
}

/// Every `bind :PORT` frontend is a mail port and every backend server points at a compose
/// service on the same mail port.
pub fn check_haproxy(text: &str, services: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut bound = BTreeSet::new();
    let mut served = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["bind", addr, ..] => {
                if let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) {
                    bound.insert(port);
                }
            }
            ["server-template", _, _, target, ..] | ["server", _, target, ..] => {
                let Some((host, port)) = target.rsplit_once(':') else {
                    problems.push(format!("haproxy: server {target} has no port"));
                    continue;
                };
                let port: u16 = port.parse().unwrap_or(0);
                match crate::service(host) {
                    Some(s) if s.mail_ports.contains(&port) && services.contains_key(host) => {
                        served.insert(port);
                    }
                    _ => problems.push(format!(
                        "haproxy: backend {target} is not a mail port of a compose service"
                    )),
                }
            }
            _ => {}
        }
    }
    for port in MAIL_PORTS {
        if !bound.contains(port) || !served.contains(port) {
            problems.push(format!(
                "haproxy: mail port {port} is not both bound and served"
            ));
        }
    }
    problems
}

/// Traces go from an OTLP receiver to the Jaeger service; metrics have a pipeline too.
pub fn check_collector(cfg: &Value, services: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut problems = Vec::new();
    let pipelines = &cfg["service"]["pipelines"];
    for (kind, need_jaeger) in [("traces", true), ("metrics", false)] {
        let pl = &pipelines[kind];
        if !list_at(pl, &["receivers"]).iter().any(|r| r == "otlp") {
            problems.push(format!("collector: {kind} pipeline does not receive OTLP"));
        }
        let exporters: Vec<&str> = list_at(pl, &["exporters"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if exporters.is_empty() {
            problems.push(format!("collector: {kind} pipeline exports nowhere"));
        }
        for list in ["receivers", "processors", "exporters"] {
            for comp in list_at(pl, &[list]).iter().filter_map(Value::as_str) {
                if cfg[list].get(comp).is_none() {
                    problems.push(format!(
                        "collector: {kind} pipeline uses undefined {list} {comp}"
                    ));
                }
            }
        }
        if need_jaeger {
            let to_jaeger = exporters.iter().any(|e| {
                cfg["exporters"][*e]["endpoint"]
                    .as_str()
                    .and_then(|ep| ep.split("://").last()?.split(':').next())
                    .is_some_and(|host| host == "jaeger" && services.contains_key(host))
            });
            if !to_jaeger {
                problems.push("collector: traces are not exported to the jaeger service".into());
            }
        }
    }
    problems
}

/// Every service's ops port is scraped under its own name.
pub fn check_prometheus(cfg: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for s in SERVICES {
        let scraped = list_at(cfg, &["scrape_configs"]).iter().any(|sc| {
            list_at(sc, &["dns_sd_configs"]).iter().any(|d| {
                d["port"].as_u64() == Some(u64::from(s.ops_port))
                    && list_at(d, &["names"]).iter().any(|n| n == s.name)
            }) || list_at(sc, &["static_configs"]).iter().any(|st| {
                list_at(st, &["targets"])
                    .iter()
                    .any(|t| t.as_str() == Some(&format!("{}:{}", s.name, s.ops_port)))
            })
        });
        if !scraped {
            problems.push(format!(
                "prometheus: {} ops port {} is not scraped",
                s.name, s.ops_port
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn interpolation() {
        assert_eq!(interpolate("${A:-0.0.0.0}:25:25"), "0.0.0.0:25:25");
        assert_eq!(interpolate("x${B}y$C.z"), "xy.z");
        assert_eq!(interpolate("$$HOME ${D-./certs}"), "$HOME ./certs");
    }

    #[test]
    fn published_ports() {
        assert_eq!(
            published_port(&json!("${MAIL_BIND:-0.0.0.0}:993:993")),
            Some(993)
        );
        assert_eq!(
            published_port(&json!("127.0.0.1:4317:4317/tcp")),
            Some(4317)
        );
        assert_eq!(published_port(&json!("2525:25")), Some(2525));
        assert_eq!(published_port(&json!("25")), None);
        assert_eq!(
            published_port(&json!({"target": 25, "published": "25"})),
            Some(25)
        );
    }
}
