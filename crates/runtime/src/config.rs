//! Typed configuration from four layers, later ones winning: defaults < TOML file <
//! environment (`MAILSUITE_*` and `DATABASE_URL`) < command-line `--set key=value` flags.
//!
//! The layers are merged as TOML values and deserialised once into the service's struct,
//! whose `#[serde(deny_unknown_fields)]` rejects unknown keys from the file and from flags.
//! The environment is injected as a map (tests pass their own); a `MAILSUITE_*` variable
//! only applies to a key the struct has, because other tools (e.g. `mailctl`) share the prefix.
//! A list key takes a TOML array (`["a", "b"]`) or, from the environment and flags, a plain
//! comma-separated value (`a,b`; empty: the empty list).

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

pub const ENV_PREFIX: &str = "MAILSUITE_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("bad --set {0:?}: expected key=value")]
    BadOverride(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Where configuration comes from, besides the defaults.
#[derive(Debug, Default, Clone)]
pub struct ConfigSources {
    pub file: Option<PathBuf>,
    pub env: HashMap<String, String>,
    /// `key.path=value` pairs from the command line, applied last.
    pub overrides: Vec<String>,
}

impl ConfigSources {
    /// The process environment, the given file and flags.
    pub fn from_process(file: Option<PathBuf>, overrides: Vec<String>) -> Self {
        ConfigSources {
            file,
            env: std::env::vars().collect(),
            overrides,
        }
    }
}

/// Command-line arguments every binary accepts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "MAILSUITE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override one setting, e.g. `--set listen_smtp=127.0.0.1:2525` (repeatable; wins over
    /// file and environment).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    pub fn sources(&self) -> ConfigSources {
        ConfigSources::from_process(self.config.clone(), self.set.clone())
    }
}

/// Build `T` from its defaults and the given sources.
pub fn load<T>(sources: &ConfigSources) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    load_renamed(sources, &[])
}

/// Keys renamed in this release, as (old dotted path, new dotted path): the old spelling is
/// still read, in the file, the environment and `--set`, with a warning, until the next
/// release. Setting both spellings in one file is an error (which one would win is a guess).
pub type Renamed = [(&'static str, &'static str)];

/// Is every rename in `renamed` from a key `T` no longer has to one it has? (For each
/// service's test of its own list.)
pub fn check_renamed<T: Serialize + Default>(renamed: &Renamed) -> Result<(), String> {
    let defaults = match Value::try_from(T::default()) {
        Ok(Value::Table(t)) => t,
        _ => return Err("config is not a table".into()),
    };
    for (old, new) in renamed {
        let path = |k: &str| k.split('.').map(str::to_owned).collect::<Vec<_>>();
        if get_path(&defaults, &path(new)).is_none() {
            return Err(format!("{new} (new name of {old}) is not a key"));
        }
        if get_path(&defaults, &path(old)).is_some() {
            return Err(format!("{old} is still a key, so it cannot be an old name"));
        }
    }
    Ok(())
}

/// [`load`], reading the old spellings in `renamed` as their new keys.
pub fn load_renamed<T>(sources: &ConfigSources, renamed: &Renamed) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    let new_name = |path: &[String]| -> Option<Vec<String>> {
        let dotted = path.join(".");
        renamed
            .iter()
            .find(|(old, _)| *old == dotted)
            .map(|(_, new)| new.split('.').map(str::to_owned).collect())
    };
    let defaults = match Value::try_from(T::default()) {
        Ok(Value::Table(t)) => t,
        Ok(_) => return Err(ConfigError::Invalid("config is not a table".into())),
        Err(e) => return Err(ConfigError::Invalid(e.to_string())),
    };
    let mut merged = defaults.clone();

    if let Some(path) = &sources.file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let mut file: Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        for (old, new) in renamed {
            let old_path: Vec<String> = old.split('.').map(str::to_owned).collect();
            let new_path: Vec<String> = new.split('.').map(str::to_owned).collect();
            if let Some(v) = take_path(&mut file, &old_path) {
                if get_path(&file, &new_path).is_some() {
                    return Err(ConfigError::Parse {
                        path: path.clone(),
                        message: format!("{old} and {new} are the same setting: keep only {new}"),
                    });
                }
                tracing::warn!(
                    file = %path.display(),
                    "{old} is the old name of {new} and will go in the next release"
                );
                insert_path(&mut file, &new_path, v);
            }
        }
        merge(&mut merged, file);
    }

    let mut env: Vec<(&String, &String)> = sources.env.iter().collect();
    env.sort();
    for (name, value) in env {
        let mut path: Vec<String> = if name == "DATABASE_URL" {
            vec!["database_url".into()]
        } else if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
            rest.to_ascii_lowercase()
                .split("__")
                .map(str::to_owned)
                .collect()
        } else {
            continue;
        };
        if let Some(new) = new_name(&path) {
            tracing::warn!(
                "{name} is the old name of {ENV_PREFIX}{} and will go in the next release",
                new.join("__").to_ascii_uppercase()
            );
            path = new;
        }
        if has_path(&defaults, &path) {
            set_path(&mut merged, &path, parse_scalar(value));
        }
    }

    for o in &sources.overrides {
        let (key, value) = o
            .split_once('=')
            .ok_or_else(|| ConfigError::BadOverride(o.clone()))?;
        let mut path: Vec<String> = key.trim().split('.').map(str::to_owned).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::BadOverride(o.clone()));
        }
        if let Some(new) = new_name(&path) {
            tracing::warn!(
                "--set {} is the old name of {} and will go in the next release",
                key.trim(),
                new.join(".")
            );
            path = new;
        }
        set_path(&mut merged, &path, parse_scalar(value.trim()));
    }

    Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))
}

/// A value as TOML would read it (numbers, booleans, arrays), else a plain string.
fn parse_scalar(raw: &str) -> Value {
    match toml::from_str::<Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| Value::String(raw.into())),
        Err(_) => Value::String(raw.into()),
    }
}

fn merge(into: &mut Table, from: Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Table(a)), Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn get_path<'a>(t: &'a Table, path: &[String]) -> Option<&'a Value> {
    match path {
        [] => None,
        [last] => t.get(last),
        [first, rest @ ..] => match t.get(first) {
            Some(Value::Table(sub)) => get_path(sub, rest),
            _ => None,
        },
    }
}

fn take_path(t: &mut Table, path: &[String]) -> Option<Value> {
    match path {
        [] => None,
        [last] => t.remove(last),
        [first, rest @ ..] => match t.get_mut(first) {
            Some(Value::Table(sub)) => take_path(sub, rest),
            _ => None,
        },
    }
}

/// The table at `parents`, making the tables on the way (a non-table in the way is replaced).
fn table_at<'a>(t: &'a mut Table, parents: &[String]) -> &'a mut Table {
    let Some((first, rest)) = parents.split_first() else {
        return t;
    };
    let entry = t
        .entry(first.clone())
        .or_insert_with(|| Value::Table(Table::new()));
    if !entry.is_table() {
        *entry = Value::Table(Table::new());
    }
    table_at(entry.as_table_mut().expect("made a table just above"), rest)
}

/// Put `value` at `path` as it is (a file's typed value), making the tables on the way.
fn insert_path(t: &mut Table, path: &[String], value: Value) {
    if let Some((last, parents)) = path.split_last() {
        table_at(t, parents).insert(last.clone(), value);
    }
}

fn has_path(t: &Table, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => t.contains_key(last),
        [first, rest @ ..] => match t.get(first) {
            Some(Value::Table(sub)) => has_path(sub, rest) || (rest.len() == 1 && !sub.is_empty()),
            _ => false,
        },
    }
}

fn set_path(t: &mut Table, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let t = table_at(t, parents);
    // Keep strings for keys that are strings by default ("0123" stays a string); a list key
    // given one plain value takes it as a comma-separated list
    // (`MAILSUITE_PROXY_PROTOCOL__TRUSTED=10.0.0.0/8,fd00::/8`; TOML's `["a", "b"]` works
    // too, and an empty value is the empty list).
    let value = match (t.get(last), value) {
        (Some(Value::String(_)), v) if !v.is_str() => Value::String(scalar_text(&v)),
        (Some(Value::Array(_)), v) if !v.is_array() => Value::Array(
            scalar_text(&v)
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        ),
        (_, v) => v,
    };
    t.insert(last.clone(), value);
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        listen: String,
        max_connections: u32,
        hostname: String,
        database_url: String,
        tls: SampleTls,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct SampleTls {
        cert: String,
        required: bool,
    }

    impl Default for Sample {
        fn default() -> Self {
            Sample {
                listen: "127.0.0.1:25".into(),
                max_connections: 100,
                hostname: "default.host".into(),
                database_url: String::new(),
                tls: SampleTls::default(),
            }
        }
    }

    impl Default for SampleTls {
        fn default() -> Self {
            SampleTls {
                cert: String::new(),
                required: true,
            }
        }
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn defaults_alone() {
        let c: Sample = load(&ConfigSources::default()).unwrap();
        assert_eq!(c, Sample::default());
    }

    #[test]
    fn precedence_flag_over_env_over_file_over_default() {
        let f = file(
            "listen = \"file:1\"\nmax_connections = 7\nhostname = \"file.host\"\n[tls]\ncert = \"file.pem\"\n",
        );
        let env: HashMap<String, String> = [
            ("MAILSUITE_LISTEN", "env:2"),
            ("MAILSUITE_MAX_CONNECTIONS", "8"),
            ("MAILSUITE_TLS__REQUIRED", "false"),
            ("DATABASE_URL", "postgres://env/db"),
            ("MAILSUITE_STORE_URL", "ignored: not a key of this struct"),
            ("UNRELATED", "x"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let sources = ConfigSources {
            file: Some(f.path().to_path_buf()),
            env,
            overrides: vec!["listen=flag:3".into()],
        };
        let c: Sample = load(&sources).unwrap();
        assert_eq!(c.listen, "flag:3", "flag wins over env and file");
        assert_eq!(c.max_connections, 8, "env wins over file");
        assert_eq!(c.hostname, "file.host", "file wins over default");
        assert_eq!(c.tls.cert, "file.pem");
        assert!(!c.tls.required, "nested env key applied");
        assert_eq!(c.database_url, "postgres://env/db", "DATABASE_URL honoured");
    }

    #[test]
    fn unknown_keys_rejected_in_file_and_flags() {
        let f = file("listne = \"typo\"\n");
        let err = load::<Sample>(&ConfigSources {
            file: Some(f.path().to_path_buf()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");

        let f = file("[tls]\ncertt = \"x\"\n");
        let err = load::<Sample>(&ConfigSources {
            file: Some(f.path().to_path_buf()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("certt"), "{err}");

        let err = load::<Sample>(&ConfigSources {
            overrides: vec!["nope=1".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");

        let err = load::<Sample>(&ConfigSources {
            overrides: vec!["novalue".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::BadOverride(_)));
    }

    const RENAMED: &Renamed = &[("max_conns", "max_connections"), ("tls.crt", "tls.cert")];

    #[test]
    fn old_key_names_are_read_in_every_layer() {
        let f = file("max_conns = 7\n[tls]\ncrt = \"old.pem\"\n");
        let c: Sample = load_renamed(
            &ConfigSources {
                file: Some(f.path().to_path_buf()),
                ..Default::default()
            },
            RENAMED,
        )
        .unwrap();
        assert_eq!((c.max_connections, c.tls.cert.as_str()), (7, "old.pem"));

        let env = [("MAILSUITE_TLS__CRT".to_string(), "env.pem".to_string())];
        let c: Sample = load_renamed(
            &ConfigSources {
                env: env.into_iter().collect(),
                overrides: vec!["max_conns=9".into()],
                ..Default::default()
            },
            RENAMED,
        )
        .unwrap();
        assert_eq!((c.max_connections, c.tls.cert.as_str()), (9, "env.pem"));

        // Without the rename list the old names are unknown keys, as before.
        let f = file("max_conns = 7\n");
        assert!(
            load::<Sample>(&ConfigSources {
                file: Some(f.path().to_path_buf()),
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn old_and_new_name_together_in_a_file_is_an_error() {
        let f = file("max_conns = 7\nmax_connections = 8\n");
        let err = load_renamed::<Sample>(
            &ConfigSources {
                file: Some(f.path().to_path_buf()),
                ..Default::default()
            },
            RENAMED,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("keep only max_connections"),
            "{err}"
        );
    }

    #[test]
    fn bad_types_and_syntax_are_reported() {
        let err = load::<Sample>(&ConfigSources {
            overrides: vec!["max_connections=lots".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
        let f = file("listen = \n");
        let err = load::<Sample>(&ConfigSources {
            file: Some(f.path().to_path_buf()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct WithLists {
        names: Vec<String>,
        nested: Lists,
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Lists {
        nets: Vec<String>,
        ports: Vec<u16>,
    }

    #[test]
    fn lists_from_env_and_flags_comma_separated_or_toml() {
        let env = |pairs: &[(&str, &str)]| ConfigSources {
            env: pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ..Default::default()
        };
        let c: WithLists = load(&env(&[
            ("MAILSUITE_NAMES", "smtp, submission,submissions"),
            ("MAILSUITE_NESTED__NETS", "172.16.0.0/12"),
        ]))
        .unwrap();
        assert_eq!(c.names, ["smtp", "submission", "submissions"]);
        assert_eq!(
            c.nested.nets,
            ["172.16.0.0/12"],
            "one value is a list of one"
        );
        let c: WithLists = load(&env(&[
            ("MAILSUITE_NAMES", "[\"a\", \"b\"]"),
            ("MAILSUITE_NESTED__NETS", "10.0.0.1,fd00::/8"),
        ]))
        .unwrap();
        assert_eq!(c.names, ["a", "b"], "TOML array syntax");
        assert_eq!(c.nested.nets, ["10.0.0.1", "fd00::/8"]);
        let c: WithLists = load(&env(&[("MAILSUITE_NAMES", "")])).unwrap();
        assert!(c.names.is_empty(), "empty value: empty list");
        let c: WithLists = load(&ConfigSources {
            overrides: vec![
                "nested.nets=10.0.0.0/8,192.0.2.1".into(),
                "nested.ports=[25, 465]".into(),
            ],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.nested.nets, ["10.0.0.0/8", "192.0.2.1"]);
        assert_eq!(c.nested.ports, [25, 465]);
    }

    #[test]
    fn string_keys_keep_numeric_looking_values_as_strings() {
        let c: Sample = load(&ConfigSources {
            overrides: vec!["hostname=12345".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.hostname, "12345");
    }
}
