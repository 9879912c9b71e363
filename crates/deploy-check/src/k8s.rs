//! Checks on a rendered set of Kubernetes objects: every service has a Deployment with
//! probes on real ports, resources, a non-root security context, graceful termination that
//! covers the drain period, a PodDisruptionBudget, an autoscaler where it scales, Services
//! that reach it, NetworkPolicies that let only the gateways reach the gRPC backends, and a
//! migration Job.

use serde_json::Value;

use crate::kustomize::{pod_spec, split_image};
use crate::yaml::{at, list_at, str_at};
use crate::{SERVICES, ServiceSpec};

/// Secrets the manifests reference but do not contain: created by the operator (or
/// cert-manager) in the namespace, as deploy/README.md explains.
pub const EXTERNAL_SECRETS: &[&str] =
    &["mailsuite-database", "mailsuite-tls", "mailsuite-internal"];

/// Which workloads may call each gRPC backend.
pub fn allowed_clients(backend: &str) -> &'static [&'static str] {
    match backend {
        "mailbox-store" => &[
            "smtp-ingress",
            "relay-queue",
            "pop3-gateway",
            "imap-gateway",
        ],
        "relay-queue" => &["smtp-ingress"],
        _ => &[],
    }
}

/// Label that lets an ad-hoc admin pod (mailctl) through the NetworkPolicies.
pub const ADMIN_LABEL: (&str, &str) = ("mailsuite.io/admin", "true");

/// Options for [`check`].
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Seconds a service needs to drain after SIGTERM (its `Shutdown::drain` grace).
    pub drain_seconds: u64,
    /// Overlays meant for real use must pin image tags.
    pub pinned_images: bool,
}

fn kind_name(o: &Value) -> (&str, &str) {
    (
        o["kind"].as_str().unwrap_or_default(),
        str_at(o, &["metadata", "name"]).unwrap_or_default(),
    )
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objs.iter().find(|o| kind_name(o) == (kind, name))
}

fn of_kind<'a>(objs: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objs.iter().filter(move |o| o["kind"] == kind)
}

/// Does `selector` (a LabelSelector, or a plain map for Services) select `labels`?
pub fn selects(selector: &Value, labels: &Value) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    let Some(sel) = selector.as_object() else {
        return false;
    };
    if sel.is_empty() {
        return true;
    }
    let is_label_selector = sel.contains_key("matchLabels") || sel.contains_key("matchExpressions");
    let match_labels = if is_label_selector {
        sel.get("matchLabels").and_then(Value::as_object)
    } else {
        Some(sel)
    };
    let labels_ok = match_labels
        .into_iter()
        .flatten()
        .all(|(k, v)| get(k) == v.as_str());
    let exprs_ok = list_at(selector, &["matchExpressions"]).iter().all(|e| {
        let key = e["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = list_at(e, &["values"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        match e["operator"].as_str() {
            Some("In") => get(key).is_some_and(|v| values.contains(&v)),
            Some("NotIn") => get(key).is_none_or(|v| !values.contains(&v)),
            Some("Exists") => get(key).is_some(),
            Some("DoesNotExist") => get(key).is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

fn pod_labels(workload: &Value) -> &Value {
    at(workload, &["spec", "template", "metadata", "labels"]).unwrap_or(&Value::Null)
}

/// A container port named or numbered `port`, resolved to its number.
fn resolve_port(container: &Value, port: &Value) -> Option<u64> {
    let ports = list_at(container, &["ports"]);
    match port {
        Value::Number(n) => ports
            .iter()
            .find(|p| p["containerPort"].as_u64() == n.as_u64())
            .and(n.as_u64()),
        Value::String(name) => ports
            .iter()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64()),
        _ => None,
    }
}

fn probe_target(container: &Value, probe: &Value) -> Option<(&'static str, u64, String)> {
    if let Some(h) = probe.get("httpGet") {
        let path = h["path"].as_str().unwrap_or("/").to_string();
        return Some(("http", resolve_port(container, &h["port"])?, path));
    }
    if let Some(g) = probe.get("grpc") {
        return Some(("grpc", resolve_port(container, &g["port"])?, String::new()));
    }
    if let Some(t) = probe.get("tcpSocket") {
        return Some(("tcp", resolve_port(container, &t["port"])?, String::new()));
    }
    None
}

fn prestop_sleep(container: &Value) -> u64 {
    let cmd: Vec<&str> = list_at(container, &["lifecycle", "preStop", "exec", "command"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if let ["sleep", n] = cmd.as_slice() {
        return n.parse().unwrap_or(0);
    }
    at(container, &["lifecycle", "preStop", "sleep", "seconds"])
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Problems with the rendered objects.
pub fn check(objs: &[Value], expect: Expect) -> Vec<String> {
    let mut problems = Vec::new();
    for s in SERVICES {
        check_service(objs, s, expect, &mut problems);
    }
    check_network_policies(objs, &mut problems);
    check_services_reach_pods(objs, &mut problems);
    check_references(objs, expect, &mut problems);
    check_migration_job(objs, &mut problems);
    let public: Vec<u64> = of_kind(objs, "Service")
        .filter(|o| o["spec"]["type"] == "LoadBalancer")
        .flat_map(|o| {
            list_at(o, &["spec", "ports"])
                .iter()
                .filter_map(|p| p["port"].as_u64())
        })
        .collect();
    for p in crate::MAIL_PORTS {
        if !public.contains(&u64::from(*p)) {
            problems.push(format!("mail port {p} is not on any LoadBalancer Service"));
        }
    }
    problems
}

fn check_service(objs: &[Value], s: &ServiceSpec, expect: Expect, problems: &mut Vec<String>) {
    let mut p = |m: String| problems.push(format!("{}: {m}", s.name));
    let Some(dep) = find(objs, "Deployment", s.name) else {
        p("no Deployment".into());
        return;
    };
    let spec = pod_spec(dep).unwrap_or(&Value::Null);
    let labels = pod_labels(dep);
    if !selects(
        at(dep, &["spec", "selector"]).unwrap_or(&Value::Null),
        labels,
    ) {
        p("the Deployment's selector does not select its own pods".into());
    }
    let containers = list_at(spec, &["containers"]);
    let Some(c) = containers.iter().find(|c| c["name"] == s.name) else {
        p(format!("no container named {}", s.name));
        return;
    };
    let image = c["image"].as_str().unwrap_or_default();
    let (image_name, tag, digest) = split_image(image);
    if image_name.rsplit('/').next() != Some(s.name) {
        p(format!(
            "container image {image} is not the {} image",
            s.name
        ));
    }
    if expect.pinned_images && digest.is_none() && matches!(tag, None | Some("latest")) {
        p(format!("image {image} is not pinned to a tag"));
    }

    let mut want_ports: Vec<u64> = s.mail_ports.iter().map(|p| u64::from(*p)).collect();
    want_ports.push(u64::from(s.ops_port));
    want_ports.extend(s.grpc_port.map(u64::from));
    for port in want_ports {
        if resolve_port(c, &Value::from(port)).is_none() {
            p(format!("container does not declare port {port}"));
        }
    }

    // Probes: liveness on /healthz, readiness on /readyz or the gRPC health service.
    let ops = u64::from(s.ops_port);
    match c.get("livenessProbe").and_then(|pr| probe_target(c, pr)) {
        Some(("http", port, path)) if port == ops && path == "/healthz" => {}
        other => p(format!(
            "livenessProbe should GET /healthz on {ops}, is {other:?}"
        )),
    }
    let readiness = c.get("readinessProbe").and_then(|pr| probe_target(c, pr));
    let readiness_ok = match &readiness {
        Some(("http", port, path)) => *port == ops && path == "/readyz",
        Some(("grpc", port, _)) => Some(*port) == s.grpc_port.map(u64::from),
        _ => false,
    };
    if !readiness_ok {
        p(format!(
            "readinessProbe should be GET /readyz on {ops} or gRPC health, is {readiness:?}"
        ));
    }

    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            if at(c, &["resources", kind, res]).is_none() {
                p(format!("no resources.{kind}.{res}"));
            }
        }
    }

    let non_root = at(spec, &["securityContext", "runAsNonRoot"]) == Some(&Value::Bool(true))
        || at(c, &["securityContext", "runAsNonRoot"]) == Some(&Value::Bool(true));
    if !non_root {
        p("not runAsNonRoot".into());
    }
    if at(c, &["securityContext", "allowPrivilegeEscalation"]) != Some(&Value::Bool(false)) {
        p("allowPrivilegeEscalation is not false".into());
    }
    if s.mail_ports.iter().any(|port| *port < 1024) {
        let unprivileged = list_at(spec, &["securityContext", "sysctls"])
            .iter()
            .any(|x| x["name"] == "net.ipv4.ip_unprivileged_port_start" && x["value"] == "0");
        if !unprivileged {
            p(
                "binds ports below 1024 as non-root without net.ipv4.ip_unprivileged_port_start=0"
                    .into(),
            );
        }
    }

    // Graceful termination: the kubelet must wait for preStop plus the service's drain.
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    let annotated = str_at(
        dep,
        &[
            "spec",
            "template",
            "metadata",
            "annotations",
            "mailsuite.io/drain-seconds",
        ],
    )
    .and_then(|v| v.parse::<u64>().ok());
    match annotated {
        Some(d) if d >= expect.drain_seconds => {}
        other => p(format!(
            "annotation mailsuite.io/drain-seconds is {other:?}, the service drains for {}s",
            expect.drain_seconds
        )),
    }
    let needed = prestop_sleep(c) + annotated.unwrap_or(0).max(expect.drain_seconds);
    if grace < needed {
        p(format!(
            "terminationGracePeriodSeconds {grace} < preStop {} + drain {}",
            prestop_sleep(c),
            needed - prestop_sleep(c)
        ));
    }

    if !of_kind(objs, "PodDisruptionBudget").any(|pdb| selects(&pdb["spec"]["selector"], labels)) {
        p("no PodDisruptionBudget selects its pods".into());
    }
    let hpa = of_kind(objs, "HorizontalPodAutoscaler").find(|h| {
        h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
            && h["spec"]["scaleTargetRef"]["name"] == s.name
    });
    match (s.autoscaled, hpa) {
        (true, None) => p("no HorizontalPodAutoscaler".into()),
        (true, Some(h)) => {
            let min = h["spec"]["minReplicas"].as_u64().unwrap_or(1);
            let max = h["spec"]["maxReplicas"].as_u64().unwrap_or(0);
            if min < 1 || max < min {
                p(format!("HPA bounds {min}..{max} are not sensible"));
            }
            if list_at(h, &["spec", "metrics"]).is_empty() {
                p("HPA has no metrics".into());
            }
        }
        (false, _) => {}
    }

    // Services: ClusterIP for gRPC, LoadBalancer for mail.
    let services: Vec<&Value> = of_kind(objs, "Service")
        .filter(|svc| selects(&svc["spec"]["selector"], labels))
        .collect();
    let exposes = |port: u16, lb: bool| {
        services.iter().any(|svc| {
            let is_lb = svc["spec"]["type"] == "LoadBalancer";
            let cluster_ip = svc["spec"]["type"]
                .as_str()
                .is_none_or(|t| t == "ClusterIP");
            (if lb { is_lb } else { cluster_ip })
                && list_at(svc, &["spec", "ports"]).iter().any(|sp| {
                    sp["port"].as_u64() == Some(u64::from(port))
                        && resolve_port(c, sp.get("targetPort").unwrap_or(&sp["port"]))
                            == Some(u64::from(port))
                })
        })
    };
    if let Some(g) = s.grpc_port
        && !exposes(g, false)
    {
        p(format!("no ClusterIP Service reaches gRPC port {g}"));
    }
    for port in s.mail_ports {
        if !exposes(*port, true) {
            p(format!("no LoadBalancer Service reaches mail port {port}"));
        }
    }
}

/// A `from` peer the backend's gRPC port may accept.
fn peer_allowed(peer: &Value, allowed: &[&str]) -> bool {
    if peer.get("namespaceSelector").is_some() || peer.get("ipBlock").is_some() {
        return false;
    }
    let Some(sel) = peer.get("podSelector") else {
        return false;
    };
    let admin = serde_json::json!({ "matchLabels": { ADMIN_LABEL.0: ADMIN_LABEL.1 } });
    if sel == &admin {
        return true;
    }
    // Every pod this peer could select must be one of the allowed workloads: the selector
    // must pin app.kubernetes.io/name to allowed values.
    let name_label = "app.kubernetes.io/name";
    let pinned_by_labels = sel["matchLabels"][name_label]
        .as_str()
        .map(|n| allowed.contains(&n));
    let pinned_by_expr = list_at(sel, &["matchExpressions"]).iter().find_map(|e| {
        (e["key"] == name_label && e["operator"] == "In").then(|| {
            list_at(e, &["values"])
                .iter()
                .all(|v| v.as_str().is_some_and(|v| allowed.contains(&v)))
        })
    });
    pinned_by_labels.or(pinned_by_expr).unwrap_or(false)
}

fn check_network_policies(objs: &[Value], problems: &mut Vec<String>) {
    for s in SERVICES {
        let Some(grpc) = s.grpc_port else { continue };
        let Some(dep) = find(objs, "Deployment", s.name) else {
            continue;
        };
        let labels = pod_labels(dep);
        let allowed = allowed_clients(s.name);
        let policies: Vec<&Value> = of_kind(objs, "NetworkPolicy")
            .filter(|np| selects(&np["spec"]["podSelector"], labels))
            .filter(|np| {
                let types = list_at(np, &["spec", "policyTypes"]);
                types.is_empty() || types.iter().any(|t| t == "Ingress")
            })
            .collect();
        if policies.is_empty() {
            problems.push(format!(
                "{}: no NetworkPolicy restricts its ingress",
                s.name
            ));
            continue;
        }
        let covers_grpc = |rule: &Value| {
            let ports = list_at(rule, &["ports"]);
            ports.is_empty()
                || ports
                    .iter()
                    .any(|p| p["port"].as_u64() == Some(u64::from(grpc)))
        };
        for np in &policies {
            for rule in list_at(np, &["spec", "ingress"]) {
                if !covers_grpc(rule) {
                    continue;
                }
                let from = list_at(rule, &["from"]);
                if from.is_empty() {
                    problems.push(format!(
                        "{}: NetworkPolicy {} opens gRPC port {grpc} to everyone",
                        s.name,
                        np["metadata"]["name"].as_str().unwrap_or_default()
                    ));
                }
                for peer in from {
                    if !peer_allowed(peer, allowed) {
                        problems.push(format!(
                            "{}: NetworkPolicy {} lets {peer} reach gRPC port {grpc}",
                            s.name,
                            np["metadata"]["name"].as_str().unwrap_or_default()
                        ));
                    }
                }
            }
        }
        // And the clients that need it are let in.
        for client in allowed {
            let Some(cdep) = find(objs, "Deployment", client) else {
                continue;
            };
            let clabels = pod_labels(cdep);
            let admitted = policies.iter().any(|np| {
                list_at(np, &["spec", "ingress"]).iter().any(|rule| {
                    covers_grpc(rule)
                        && list_at(rule, &["from"]).iter().any(|peer| {
                            peer.get("podSelector")
                                .is_some_and(|sel| selects(sel, clabels))
                        })
                })
            });
            if !admitted {
                problems.push(format!(
                    "{}: NetworkPolicy keeps out {client}, which must reach gRPC port {grpc}",
                    s.name
                ));
            }
        }
    }
}

fn check_services_reach_pods(objs: &[Value], problems: &mut Vec<String>) {
    let workloads: Vec<&Value> = objs.iter().filter(|o| pod_spec(o).is_some()).collect();
    for svc in of_kind(objs, "Service") {
        let name = svc["metadata"]["name"].as_str().unwrap_or_default();
        let sel = &svc["spec"]["selector"];
        let targets: Vec<&&Value> = workloads
            .iter()
            .filter(|w| w["kind"] != "Job" && selects(sel, pod_labels(w)))
            .collect();
        if targets.is_empty() {
            problems.push(format!("Service {name} selects no workload"));
            continue;
        }
        for sp in list_at(svc, &["spec", "ports"]) {
            let tp = sp.get("targetPort").unwrap_or(&sp["port"]);
            let reachable = targets.iter().any(|w| {
                list_at(pod_spec(w).unwrap_or(&Value::Null), &["containers"])
                    .iter()
                    .any(|c| resolve_port(c, tp).is_some())
            });
            if !reachable {
                problems.push(format!(
                    "Service {name}: targetPort {tp} is no container port"
                ));
            }
        }
    }
}

fn check_references(objs: &[Value], expect: Expect, problems: &mut Vec<String>) {
    for w in objs.iter().filter(|o| pod_spec(o).is_some()) {
        let (kind, name) = kind_name(w);
        let spec = pod_spec(w).unwrap_or(&Value::Null);
        for c in list_at(spec, &["containers"]) {
            for ef in list_at(c, &["envFrom"]) {
                if let Some(cm) = str_at(ef, &["configMapRef", "name"])
                    && find(objs, "ConfigMap", cm).is_none()
                {
                    problems.push(format!("{kind} {name}: ConfigMap {cm} does not exist"));
                }
            }
            for e in list_at(c, &["env"]) {
                if let Some(sec) = str_at(e, &["valueFrom", "secretKeyRef", "name"])
                    && find(objs, "Secret", sec).is_none()
                    && !EXTERNAL_SECRETS.contains(&sec)
                {
                    problems.push(format!(
                        "{kind} {name}: Secret {sec} is neither here nor documented"
                    ));
                }
            }
            if expect.pinned_images && w["kind"] != "StatefulSet" {
                let (_, tag, digest) = split_image(c["image"].as_str().unwrap_or_default());
                if digest.is_none() && matches!(tag, None | Some("latest")) {
                    problems.push(format!("{kind} {name}: image {} not pinned", c["image"]));
                }
            }
        }
    }
    for s in SERVICES.iter().filter(|s| s.grpc_port.is_some()) {
        let Some(dep) = find(objs, "Deployment", s.name) else {
            continue;
        };
        let has_db = list_at(pod_spec(dep).unwrap_or(&Value::Null), &["containers"])
            .iter()
            .any(|c| {
                list_at(c, &["env"])
                    .iter()
                    .any(|e| e["name"] == "DATABASE_URL")
            });
        if !has_db {
            problems.push(format!("{}: no DATABASE_URL", s.name));
        }
    }
}

fn check_migration_job(objs: &[Value], problems: &mut Vec<String>) {
    let ok = of_kind(objs, "Job").any(|j| {
        list_at(pod_spec(j).unwrap_or(&Value::Null), &["containers"])
            .iter()
            .any(|c| {
                let (image, _, _) = split_image(c["image"].as_str().unwrap_or_default());
                let argv: Vec<&str> = list_at(c, &["command"])
                    .iter()
                    .chain(list_at(c, &["args"]))
                    .filter_map(Value::as_str)
                    .collect();
                image.rsplit('/').next() == Some("mailctl")
                    && argv.contains(&"migrate")
                    && list_at(c, &["env"])
                        .iter()
                        .any(|e| e["name"] == "DATABASE_URL")
            })
    });
    if !ok {
        problems.push("no Job runs `mailctl migrate` with DATABASE_URL".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors() {
        let labels = json!({"app.kubernetes.io/name": "imap-gateway", "tier": "x"});
        assert!(selects(
            &json!({"app.kubernetes.io/name": "imap-gateway"}),
            &labels
        ));
        assert!(selects(
            &json!({"matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In", "values": ["a", "imap-gateway"]}]}),
            &labels
        ));
        assert!(!selects(&json!({"matchLabels": {"tier": "y"}}), &labels));
        assert!(selects(
            &json!({"matchExpressions": [{"key": "z", "operator": "DoesNotExist"}]}),
            &labels
        ));
        assert!(selects(&json!({}), &labels));
    }

    #[test]
    fn peers() {
        let allowed = allowed_clients("relay-queue");
        assert!(peer_allowed(
            &json!({"podSelector": {"matchLabels": {"app.kubernetes.io/name": "smtp-ingress"}}}),
            allowed
        ));
        assert!(!peer_allowed(
            &json!({"podSelector": {"matchLabels": {"app.kubernetes.io/name": "imap-gateway"}}}),
            allowed
        ));
        assert!(!peer_allowed(&json!({"podSelector": {}}), allowed));
        assert!(!peer_allowed(&json!({"namespaceSelector": {}}), allowed));
        assert!(peer_allowed(
            &json!({"podSelector": {"matchLabels": {"mailsuite.io/admin": "true"}}}),
            allowed
        ));
    }
}
