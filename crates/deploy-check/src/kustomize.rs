//! The subset of kustomize that `deploy/k8s` uses: `resources` (files and kustomization
//! directories), `namespace`, `images`, `replicas` and `patches` (strategic-merge documents,
//! or RFC 6902 operations with a `target`). A field outside that subset is an error, not
//! silently ignored, so the rendering checked here is the one `kubectl apply -k` would apply;
//! the tests compare it with `kubectl kustomize` wherever kubectl is installed.

use std::path::Path;

use serde_json::{Map, Value};

use crate::Error;
use crate::yaml;

const SUPPORTED: &[&str] = &[
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "replicas",
    "patches",
];

/// Kinds that live outside any namespace (the `namespace` field leaves them alone).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "ClusterIssuer",
    "IngressClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
];

/// Render the kustomization in `dir`.
pub fn build(dir: &Path) -> Result<Vec<Value>, Error> {
    let kfile = dir.join("kustomization.yaml");
    let k = yaml::load_one(&kfile)?;
    let Some(kmap) = k.as_object() else {
        return Err(Error::invalid(&kfile, "not a mapping"));
    };
    if let Some(bad) = kmap.keys().find(|key| !SUPPORTED.contains(&key.as_str())) {
        return Err(Error::invalid(
            &kfile,
            format!("field {bad:?} is not supported by this checker: extend kustomize.rs"),
        ));
    }

    let mut objects = Vec::new();
    for r in yaml::list_at(&k, &["resources"]) {
        let rel = r
            .as_str()
            .ok_or_else(|| Error::invalid(&kfile, "resource entries must be paths"))?;
        if rel.contains("://") {
            return Err(Error::invalid(
                &kfile,
                format!("remote resource {rel} not supported"),
            ));
        }
        let path = dir.join(rel);
        if path.is_dir() {
            objects.extend(build(&path)?);
        } else {
            objects.extend(yaml::load_all(&path)?);
        }
    }
    for o in &objects {
        if o["kind"].as_str().is_none() || o["metadata"]["name"].as_str().is_none() {
            return Err(Error::invalid(
                dir,
                format!("object without kind or name: {o}"),
            ));
        }
    }

    for p in yaml::list_at(&k, &["patches"]) {
        apply_patch(dir, &kfile, p, &mut objects)?;
    }
    if let Some(ns) = k["namespace"].as_str() {
        for o in &mut objects {
            if !CLUSTER_SCOPED.contains(&o["kind"].as_str().unwrap_or_default()) {
                o["metadata"]["namespace"] = Value::String(ns.to_string());
            }
        }
    }
    for img in yaml::list_at(&k, &["images"]) {
        set_image(img, &mut objects).map_err(|m| Error::invalid(&kfile, m))?;
    }
    for r in yaml::list_at(&k, &["replicas"]) {
        let (Some(name), Some(count)) = (r["name"].as_str(), r["count"].as_u64()) else {
            return Err(Error::invalid(&kfile, format!("bad replicas entry {r}")));
        };
        let mut found = false;
        for o in &mut objects {
            let scalable = matches!(
                o["kind"].as_str(),
                Some("Deployment" | "StatefulSet" | "ReplicaSet")
            );
            if scalable && o["metadata"]["name"] == name {
                o["spec"]["replicas"] = Value::from(count);
                found = true;
            }
        }
        if !found {
            return Err(Error::invalid(
                &kfile,
                format!("replicas: no workload named {name}"),
            ));
        }
    }
    Ok(objects)
}

fn matches_target(o: &Value, target: &Value) -> Result<bool, String> {
    let Some(t) = target.as_object() else {
        return Err("patch target must be a mapping".into());
    };
    for (k, v) in t {
        let want = v.as_str().ok_or("patch target values must be strings")?;
        let ok = match k.as_str() {
            "kind" => o["kind"] == want,
            "name" => o["metadata"]["name"] == want,
            "namespace" => o["metadata"]["namespace"] == want,
            "group" => api_group(o) == want,
            "version" => o["apiVersion"].as_str().unwrap_or("").rsplit('/').next() == Some(want),
            other => return Err(format!("patch target field {other:?} not supported")),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn api_group(o: &Value) -> &str {
    match o["apiVersion"].as_str().unwrap_or("").split_once('/') {
        Some((g, _)) => g,
        None => "",
    }
}

fn apply_patch(dir: &Path, kfile: &Path, p: &Value, objects: &mut [Value]) -> Result<(), Error> {
    let text = match (p["path"].as_str(), p["patch"].as_str()) {
        (Some(rel), None) => crate::read(&dir.join(rel))?,
        (None, Some(inline)) => inline.to_string(),
        _ => {
            return Err(Error::invalid(
                kfile,
                "a patch needs exactly one of path, patch",
            ));
        }
    };
    let docs = yaml::parse_all(&text).map_err(|m| Error::invalid(kfile, m))?;
    let target = p.get("target");
    // RFC 6902: one document holding a list of operations, applied to every target match.
    if let [Value::Array(_)] = docs.as_slice() {
        let Some(target) = target else {
            return Err(Error::invalid(kfile, "a JSON 6902 patch needs a target"));
        };
        let ops: json_patch::Patch = serde_json::from_value(docs[0].clone())
            .map_err(|e| Error::invalid(kfile, format!("bad JSON patch: {e}")))?;
        let mut hit = false;
        for o in objects.iter_mut() {
            if matches_target(o, target).map_err(|m| Error::invalid(kfile, m))? {
                json_patch::patch(o, &ops).map_err(|e| Error::invalid(kfile, e.to_string()))?;
                hit = true;
            }
        }
        if !hit {
            return Err(Error::invalid(
                kfile,
                format!("patch target {target} matches nothing"),
            ));
        }
        return Ok(());
    }
    // Strategic merge: each document names its object by kind and name, or a target selects.
    for doc in docs {
        let mut hit = false;
        for o in objects.iter_mut() {
            let selected = match target {
                Some(t) => matches_target(o, t).map_err(|m| Error::invalid(kfile, m))?,
                None => {
                    o["kind"] == doc["kind"] && o["metadata"]["name"] == doc["metadata"]["name"]
                }
            };
            if selected {
                strategic_merge(o, &doc).map_err(|m| Error::invalid(kfile, m))?;
                hit = true;
            }
        }
        if !hit {
            return Err(Error::invalid(
                kfile,
                format!(
                    "patch for {} {} matches nothing",
                    doc["kind"], doc["metadata"]["name"]
                ),
            ));
        }
    }
    Ok(())
}

/// Kubernetes' merge keys for the lists `deploy/k8s` patches.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "volumes" | "env" | "imagePullSecrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => None, // containerPort for pods, port for Services: merged below by either
        _ => None,
    }
}

/// A strategic merge patch: maps merge, `null` deletes, lists of named items merge by their
/// key, other lists are replaced. `$patch` directives are refused.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), String> {
    merge_value(target, patch, "")
}

fn merge_value(target: &mut Value, patch: &Value, field: &str) -> Result<(), String> {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => merge_map(t, p),
        (Value::Array(t), Value::Array(p)) => {
            let key = merge_key(field).or_else(|| {
                (field == "ports").then(|| {
                    if p.iter().all(|i| i.get("containerPort").is_some()) {
                        "containerPort"
                    } else {
                        "port"
                    }
                })
            });
            let Some(key) = key else {
                *t = p.clone();
                return Ok(());
            };
            for item in p {
                let Some(id) = item.get(key) else {
                    return Err(format!("{field} item without its merge key {key}"));
                };
                match t.iter_mut().find(|x| x.get(key) == Some(id)) {
                    Some(existing) => merge_value(existing, item, "")?,
                    None => t.push(item.clone()),
                }
            }
            Ok(())
        }
        (t, p) => {
            *t = p.clone();
            Ok(())
        }
    }
}

fn merge_map(t: &mut Map<String, Value>, p: &Map<String, Value>) -> Result<(), String> {
    for (k, v) in p {
        if k.starts_with("$patch")
            || k.starts_with("$setElementOrder")
            || k.starts_with("$retainKeys")
        {
            return Err(format!("strategic-merge directive {k} not supported"));
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match t.get_mut(k) {
            Some(existing) => merge_value(existing, v, k)?,
            None => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

/// Pod specs of workloads: where images live.
pub fn pod_spec(o: &Value) -> Option<&Value> {
    match o["kind"].as_str()? {
        "Pod" => o.get("spec"),
        "CronJob" => yaml::at(o, &["spec", "jobTemplate", "spec", "template", "spec"]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            yaml::at(o, &["spec", "template", "spec"])
        }
        _ => None,
    }
}

fn pod_spec_mut(o: &mut Value) -> Option<&mut Value> {
    let path: &[&str] = match o["kind"].as_str()? {
        "Pod" => &["spec"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "spec"],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            &["spec", "template", "spec"]
        }
        _ => return None,
    };
    path.iter().try_fold(o, |v, k| v.get_mut(*k))
}

/// `name[:tag][@digest]` → parts (a registry port is not a tag).
pub fn split_image(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    match rest.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, Some(t), digest),
        _ => (rest, None, digest),
    }
}

fn set_image(img: &Value, objects: &mut [Value]) -> Result<(), String> {
    let name = img["name"].as_str().ok_or("images entry without name")?;
    for o in objects.iter_mut() {
        let Some(spec) = pod_spec_mut(o) else {
            continue;
        };
        for list in ["containers", "initContainers"] {
            let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) else {
                continue;
            };
            for c in cs {
                let Some(current) = c["image"].as_str() else {
                    continue;
                };
                let (n, tag, digest) = split_image(current);
                if n != name {
                    continue;
                }
                let new_name = img["newName"].as_str().unwrap_or(n);
                let new = if let Some(d) = img["digest"].as_str() {
                    format!("{new_name}@{d}")
                } else if let Some(t) = img["newTag"].as_str() {
                    format!("{new_name}:{t}")
                } else {
                    match (tag, digest) {
                        (_, Some(d)) => format!("{new_name}@{d}"),
                        (Some(t), None) => format!("{new_name}:{t}"),
                        (None, None) => new_name.to_string(),
                    }
                };
                c["image"] = Value::String(new);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_by_name_and_null_deletes() {
        let mut d = json!({"spec": {"containers": [
            {"name": "a", "image": "x", "env": [{"name": "K", "value": "1"}]},
            {"name": "b", "image": "y"}
        ], "drop": 1, "args": ["1", "2"]}});
        strategic_merge(
            &mut d,
            &json!({"spec": {"containers": [
                {"name": "a", "env": [{"name": "L", "value": "2"}]},
                {"name": "c", "image": "z"}
            ], "drop": null, "args": ["3"]}}),
        )
        .unwrap();
        assert_eq!(d["spec"]["containers"].as_array().unwrap().len(), 3);
        assert_eq!(d["spec"]["containers"][0]["image"], "x");
        assert_eq!(
            d["spec"]["containers"][0]["env"].as_array().unwrap().len(),
            2
        );
        assert!(d["spec"].get("drop").is_none());
        assert_eq!(d["spec"]["args"], json!(["3"]));
        assert!(strategic_merge(&mut d, &json!({"$patch": "delete"})).is_err());
    }

    #[test]
    fn image_names_split_and_set() {
        assert_eq!(
            split_image("reg:5000/a/b:1.2"),
            ("reg:5000/a/b", Some("1.2"), None)
        );
        assert_eq!(split_image("reg:5000/a/b"), ("reg:5000/a/b", None, None));
        assert_eq!(split_image("a@sha256:ff"), ("a", None, Some("sha256:ff")));
        let mut objs = vec![json!({"kind": "Job", "metadata": {"name": "j"},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "m/x:latest"}]}}}})];
        set_image(
            &json!({"name": "m/x", "newName": "r/m/x", "newTag": "9"}),
            &mut objs,
        )
        .unwrap();
        assert_eq!(
            objs[0]["spec"]["template"]["spec"]["containers"][0]["image"],
            "r/m/x:9"
        );
    }
}
