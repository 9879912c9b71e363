//! YAML files as `serde_json::Value`s (Kubernetes objects and compose files are JSON-shaped;
//! comparing and patching them as JSON keeps one value type throughout).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::Error;

/// Every non-empty document of a (multi-document) YAML text, with merge keys (`<<: *anchor`,
/// as compose files use them) applied.
pub fn parse_all(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let mut y = serde_yaml_ng::Value::deserialize(doc).map_err(|e| e.to_string())?;
        y.apply_merge().map_err(|e| e.to_string())?;
        let v = serde_json::to_value(y).map_err(|e| e.to_string())?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

pub fn load_all(path: &Path) -> Result<Vec<Value>, Error> {
    parse_all(&crate::read(path)?).map_err(|m| Error::invalid(path, m))
}

/// A file that must hold exactly one document.
pub fn load_one(path: &Path) -> Result<Value, Error> {
    let mut docs = load_all(path)?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        n => Err(Error::invalid(
            path,
            format!("expected one YAML document, found {n}"),
        )),
    }
}

/// `v[a][b]...` as a string, if present.
pub fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

pub fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

/// A list at `path`, or an empty slice.
pub fn list_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keys_are_applied() {
        let v = parse_all("x: &e {A: '1', B: '2'}\ny:\n  <<: *e\n  B: '3'\n").unwrap();
        assert_eq!(v[0]["y"], serde_json::json!({"A": "1", "B": "3"}));
    }

    #[test]
    fn multi_document_with_anchors() {
        let docs = parse_all("a: &x {k: 1}\nb: *x\n---\n---\nc: [1, 2]\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["b"]["k"], 1);
        assert_eq!(list_at(&docs[1], &["c"]).len(), 2);
        assert!(parse_all("a: [1, 2\n").is_err());
    }
}
