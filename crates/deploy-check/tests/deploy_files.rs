//! The real deploy files pass every check, and a broken copy of each is caught (so a check
//! that silently passes everything would fail here).

use mailsuite_deploy_check::k8s::Expect;
use mailsuite_deploy_check::{
    SERVICES, compose, dockerfile, k8s, kustomize, repo_root, workspace, yaml,
};
use serde_json::{Value, json};

fn dockerfile() -> dockerfile::Dockerfile {
    let text = std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).unwrap();
    dockerfile::parse(&text).unwrap()
}

fn compose_file() -> Value {
    yaml::load_one(&repo_root().join("docker-compose.yml")).unwrap()
}

/// The longest drain period a service's `main` gives `Shutdown::drain`, read from the code.
fn drain_seconds() -> u64 {
    SERVICES
        .iter()
        .map(|s| {
            let src = repo_root().join("crates").join(s.name).join("src");
            let main = std::fs::read_to_string(src.join("main.rs")).unwrap();
            let config = std::fs::read_to_string(src.join("config.rs"))
                .or_else(|_| std::fs::read_to_string(src.join("config/mod.rs")))
                .unwrap_or_default();
            workspace::drain_seconds(&main, &config)
                .unwrap_or_else(|e| panic!("{}: drain period: {e}", s.name))
        })
        .max()
        .unwrap()
}

fn expect(pinned: bool) -> Expect {
    Expect {
        drain_seconds: drain_seconds(),
        pinned_images: pinned,
    }
}

/// `45s`, `1m30s` → seconds.
fn compose_duration(s: &str) -> u64 {
    let mut total = 0;
    let mut n = 0;
    for c in s.chars() {
        match c {
            '0'..='9' => n = n * 10 + u64::from(c.to_digit(10).unwrap()),
            'h' => (total, n) = (total + n * 3600, 0),
            'm' => (total, n) = (total + n * 60, 0),
            's' => (total, n) = (total + n, 0),
            _ => panic!("unexpected duration {s}"),
        }
    }
    total + n
}

#[test]
fn stop_grace_covers_the_drain_period() {
    let drain = drain_seconds();
    assert!(drain >= 10, "the services drain for {drain}s");
    let c = compose_file();
    for s in SERVICES {
        let grace = c["services"][s.name]["stop_grace_period"]
            .as_str()
            .map(compose_duration)
            .unwrap_or(10);
        assert!(
            grace > drain,
            "{}: stop_grace_period {grace}s <= drain {drain}s",
            s.name
        );
    }
    assert_eq!(compose_duration("1m30s"), 90);
}

/// Every MAILSUITE_* variable the deploy files set is a configuration key some service has
/// (or one of the few process-level switches), so a typo cannot be silently ignored.
#[test]
fn environment_variables_name_real_settings() {
    let keys = workspace::config_keys(&repo_root()).unwrap();
    for k in [
        "hostname",
        "store_url",
        "queue_url",
        "tls",
        "cert",
        "key",
        "limits",
    ] {
        assert!(keys.contains(k), "config key {k} not found in {keys:?}");
    }
    let process_level = ["log", "log_json", "config"];
    let check = |origin: &str, vars: Vec<String>| {
        assert!(!vars.is_empty(), "{origin}: no variables");
        for var in vars {
            let Some(rest) = var.strip_prefix("MAILSUITE_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            let path: Vec<&str> = rest.split("__").collect();
            let ok = process_level.contains(&rest.as_str())
                || path.iter().all(|seg| keys.contains(*seg));
            assert!(ok, "{origin}: {var} sets no known configuration key");
        }
    };
    let c = compose_file();
    for s in SERVICES {
        let env = c["services"][s.name]["environment"].as_object().unwrap();
        check(
            &format!("compose {}", s.name),
            env.keys().cloned().collect(),
        );
    }
    for overlay in ["base", "overlays/dev", "overlays/production"] {
        let objs = render(overlay);
        let cm = objs.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
        check(
            overlay,
            cm["data"].as_object().unwrap().keys().cloned().collect(),
        );
    }
    // The check has teeth.
    let typo = std::panic::catch_unwind(|| check("typo", vec!["MAILSUITE_HOSTNAMES".into()]));
    assert!(typo.is_err());
}

fn assert_clean(what: &str, problems: Vec<String>) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

fn assert_caught(problems: &[String], needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "expected a problem mentioning {needle:?}, got {problems:#?}"
    );
}

#[test]
fn dockerfile_targets_match_workspace_binaries() {
    let bins = workspace::binaries(&repo_root()).unwrap();
    for s in SERVICES {
        assert!(
            bins.contains_key(s.name),
            "workspace has no binary {}: {bins:?}",
            s.name
        );
    }
    let df = dockerfile();
    assert_clean("deploy/Dockerfile", dockerfile::check(&df, &bins));

    // A binary the workspace does not define is caught...
    let mut fewer = bins.clone();
    fewer.remove("imap-gateway");
    assert_caught(
        &dockerfile::check(&df, &fewer),
        "imap-gateway, which no workspace package defines",
    );
    // ...so is a target that runs the wrong program, or as root.
    let text = std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).unwrap();
    let wrong = text.replace(
        "ENTRYPOINT [\"pop3-gateway\"]",
        "ENTRYPOINT [\"imap-gateway\"]",
    );
    assert_caught(
        &dockerfile::check(&dockerfile::parse(&wrong).unwrap(), &bins),
        "target pop3-gateway: ENTRYPOINT",
    );
    let root = text.replace("USER 10001:10001", "USER root");
    assert_caught(
        &dockerfile::check(&dockerfile::parse(&root).unwrap(), &bins),
        "not a non-root user",
    );
    // ...and sources copied before the dependency layer is cooked.
    let uncached = text
        .replacen("COPY . .\nRUN cargo build", "RUN cargo build", 1)
        .replacen("RUN cargo chef cook", "COPY . .\nRUN cargo chef cook", 1);
    assert_caught(
        &dockerfile::check(&dockerfile::parse(&uncached).unwrap(), &bins),
        "cached layer",
    );
}

#[test]
fn compose_file_is_consistent() {
    let c = compose_file();
    let df = dockerfile();
    assert_clean("docker-compose.yml", compose::check(&c, &df, &repo_root()));

    let mut broken = c.clone();
    broken["services"]["imap-gateway"]["build"]["target"] = json!("imap");
    broken["services"]["pop3-gateway"]["ports"] = json!(["110:110"]);
    broken["services"]["smtp-ingress"]["container_name"] = json!("smtp");
    broken["services"]["relay-queue"]
        .as_object_mut()
        .unwrap()
        .remove("healthcheck");
    broken["services"]["postgres"]["image"] = json!("postgres:latest");
    broken["services"]["postgres"]
        .as_object_mut()
        .unwrap()
        .remove("build");
    broken["services"]["postgres"]["healthcheck"]["intervall"] = json!("5s");
    broken["services"]["smtp-ingress"]["stop_grace_periode"] = json!("45s");
    let problems = compose::check(&broken, &df, &repo_root());
    assert_caught(&problems, "imap-gateway: build target Some(\"imap\")");
    assert_caught(&problems, "pop3-gateway: publishes host ports");
    assert_caught(&problems, "mail port 110 is published by 2 services");
    assert_caught(&problems, "smtp-ingress: container_name");
    assert_caught(&problems, "but relay-queue has no healthcheck");
    assert_caught(&problems, "not pinned to a major version");
    assert_caught(&problems, "postgres.healthcheck: unknown key \"intervall\"");
    assert_caught(
        &problems,
        "smtp-ingress: unknown key \"stop_grace_periode\"",
    );

    let mut no_migrate = c.clone();
    no_migrate["services"]["mailbox-store"]["depends_on"]
        .as_object_mut()
        .unwrap()
        .remove("migrate");
    assert_caught(
        &compose::check(&no_migrate, &df, &repo_root()),
        "mailbox-store: does not wait for migrate",
    );
}

#[test]
fn haproxy_backends_are_mail_ports_of_services() {
    let c = compose_file();
    let services = c["services"].as_object().unwrap();
    let text = std::fs::read_to_string(repo_root().join("deploy/compose/haproxy.cfg")).unwrap();
    assert_clean("haproxy.cfg", compose::check_haproxy(&text, services));
    let wrong = text.replace("imap-gateway:993", "imap-gateway:143");
    assert_caught(
        &compose::check_haproxy(&wrong, services),
        "mail port 993 is not both bound and served",
    );
}

fn render(overlay: &str) -> Vec<Value> {
    kustomize::build(&repo_root().join("deploy/k8s").join(overlay))
        .unwrap_or_else(|e| panic!("{overlay}: {e}"))
}

#[test]
fn kubernetes_base_and_overlays_pass_checks() {
    assert_clean("base", k8s::check(&render("base"), expect(false)));
    assert_clean(
        "overlays/dev",
        k8s::check(&render("overlays/dev"), expect(false)),
    );
    let prod = render("overlays/production");
    assert_clean("overlays/production", k8s::check(&prod, expect(true)));

    // The overlays did what they say.
    let dev = render("overlays/dev");
    let store = dev
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "mailbox-store")
        .unwrap();
    assert_eq!(store["metadata"]["namespace"], "mailsuite-dev");
    assert_eq!(store["spec"]["replicas"], 1);
    assert_eq!(
        store["spec"]["template"]["spec"]["containers"][0]["image"],
        "mailsuite/mailbox-store:dev"
    );
    let cm = dev.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
    assert_eq!(
        cm["data"]["MAILSUITE_TLS__CERT"], "",
        "dev uses a self-signed certificate"
    );
    assert!(
        dev.iter()
            .all(|o| o["kind"] != "HorizontalPodAutoscaler" || o["spec"]["minReplicas"] == 1)
    );
    let dev_db = dev.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
    assert_eq!(
        dev_db["metadata"]["labels"]["mailsuite.io/dev-only"],
        "true"
    );
    assert!(
        prod.iter().all(|o| o["kind"] != "StatefulSet"),
        "production has no in-cluster database"
    );
    let imap = prod
        .iter()
        .find(|o| o["kind"] == "HorizontalPodAutoscaler" && o["metadata"]["name"] == "imap-gateway")
        .unwrap();
    assert_eq!(imap["spec"]["maxReplicas"], 30);
}

fn find_mut<'a>(objs: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
    objs.iter_mut()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn kubernetes_checks_catch_breakage() {
    let base = render("base");

    let mut objs = base.clone();
    let c = &mut find_mut(&mut objs, "Deployment", "imap-gateway")["spec"]["template"]["spec"]["containers"]
        [0];
    c.as_object_mut().unwrap().remove("readinessProbe");
    c["livenessProbe"]["httpGet"]["port"] = json!("nope");
    c["resources"].as_object_mut().unwrap().remove("limits");
    let problems = k8s::check(&objs, expect(false));
    assert_caught(&problems, "imap-gateway: readinessProbe");
    assert_caught(&problems, "imap-gateway: livenessProbe");
    assert_caught(&problems, "imap-gateway: no resources.limits.cpu");

    let mut objs = base.clone();
    find_mut(&mut objs, "Deployment", "pop3-gateway")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] =
        json!(10);
    assert_caught(
        &k8s::check(&objs, expect(false)),
        "pop3-gateway: terminationGracePeriodSeconds 10",
    );
    assert_caught(
        &k8s::check(
            &base,
            Expect {
                drain_seconds: 60,
                pinned_images: false,
            },
        ),
        "the service drains for 60s",
    );

    let mut objs = base.clone();
    objs.retain(|o| {
        !(o["kind"] == "HorizontalPodAutoscaler" && o["metadata"]["name"] == "relay-queue")
    });
    objs.retain(|o| {
        !(o["kind"] == "PodDisruptionBudget" && o["metadata"]["name"] == "smtp-ingress")
    });
    let problems = k8s::check(&objs, expect(false));
    assert_caught(&problems, "relay-queue: no HorizontalPodAutoscaler");
    assert_caught(&problems, "smtp-ingress: no PodDisruptionBudget");

    // Opening the queue's gRPC port to the IMAP gateway, or to everyone, is refused.
    let mut objs = base.clone();
    let np = find_mut(&mut objs, "NetworkPolicy", "relay-queue");
    np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"] =
        json!(["smtp-ingress", "imap-gateway"]);
    assert_caught(
        &k8s::check(&objs, expect(false)),
        "relay-queue: NetworkPolicy relay-queue lets",
    );
    let mut objs = base.clone();
    find_mut(&mut objs, "NetworkPolicy", "mailbox-store")["spec"]["ingress"][0]
        .as_object_mut()
        .unwrap()
        .remove("from");
    assert_caught(
        &k8s::check(&objs, expect(false)),
        "opens gRPC port 50051 to everyone",
    );
    // Shutting relay-queue out of the store breaks local delivery: caught too.
    let mut objs = base.clone();
    find_mut(&mut objs, "NetworkPolicy", "mailbox-store")["spec"]["ingress"][0]["from"][0]["podSelector"]
        ["matchExpressions"][0]["values"] = json!(["smtp-ingress", "pop3-gateway", "imap-gateway"]);
    assert_caught(&k8s::check(&objs, expect(false)), "keeps out relay-queue");

    let mut objs = base.clone();
    objs.retain(|o| o["kind"] != "Job");
    find_mut(&mut objs, "Service", "smtp-ingress")["spec"]["ports"][0]["targetPort"] =
        json!("smtpx");
    let problems = k8s::check(&objs, expect(false));
    assert_caught(&problems, "mailctl migrate");
    assert_caught(&problems, "Service smtp-ingress: targetPort \"smtpx\"");
    assert_caught(&problems, "no LoadBalancer Service reaches mail port 25");

    // The base's :latest images are fine for a base, not for an overlay meant for production.
    assert_caught(&k8s::check(&base, expect(true)), "is not pinned to a tag");
}

/// `kubectl kustomize` (where installed) renders exactly what this checker renders, so the
/// checks above judge what `kubectl apply -k` would apply.
#[test]
fn rendering_matches_kubectl_kustomize() {
    let probe = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("kubectl not installed: skipping the cross-check (the checks above still ran)");
        return;
    }
    for overlay in ["base", "overlays/dev", "overlays/production"] {
        let dir = repo_root().join("deploy/k8s").join(overlay);
        let out = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{overlay}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs = yaml::parse_all(&String::from_utf8(out.stdout).unwrap()).unwrap();
        let ours = render(overlay);
        let key = |o: &Value| {
            format!(
                "{}/{}/{}",
                o["kind"].as_str().unwrap_or(""),
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("")
            )
        };
        let mut a: Vec<(String, &Value)> = theirs.iter().map(|o| (key(o), o)).collect();
        let mut b: Vec<(String, &Value)> = ours.iter().map(|o| (key(o), o)).collect();
        a.sort_by(|x, y| x.0.cmp(&y.0));
        b.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            a.iter().map(|x| &x.0).collect::<Vec<_>>(),
            b.iter().map(|x| &x.0).collect::<Vec<_>>(),
            "{overlay}: object sets differ"
        );
        for ((k, t), (_, o)) in a.iter().zip(&b) {
            assert_eq!(t, o, "{overlay}: {k} renders differently");
        }
    }
}

#[test]
fn collector_and_dashboard_files_parse() {
    let collector = yaml::load_one(&repo_root().join("deploy/otel-collector.yaml")).unwrap();
    let c = compose_file();
    assert_clean(
        "otel-collector.yaml",
        compose::check_collector(&collector, c["services"].as_object().unwrap()),
    );
    let dash_dir = repo_root().join("deploy/grafana");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dash_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("json") {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                v["panels"].as_array().is_some_and(|p| !p.is_empty()),
                "{}",
                path.display()
            );
            seen += 1;
        }
    }
    assert!(seen > 0, "no dashboard in {}", dash_dir.display());
}

/// A Secret the manifests expect but do not contain is one the operator must create: the
/// deployment guide names each one (with the command that creates it).
#[test]
fn external_secrets_are_documented() {
    let guide = std::fs::read_to_string(repo_root().join("deploy/README.md")).unwrap();
    for s in mailsuite_deploy_check::k8s::EXTERNAL_SECRETS {
        assert!(
            guide.contains(&format!("secret generic {s}"))
                || guide.contains(&format!("secret tls {s}")),
            "deploy/README.md does not show how to create Secret {s}"
        );
    }
}
