//! A Dockerfile reader (instructions, line continuations, stages) and the checks that tie
//! `deploy/Dockerfile` to the workspace.

use std::collections::BTreeMap;

use crate::{SERVICES, TOOLS};

#[derive(Debug, Clone, PartialEq)]
pub struct Instruction {
    /// Upper-cased keyword (`RUN`, `COPY`, ...).
    pub keyword: String,
    /// Everything after the keyword, continuation lines joined with a space.
    pub args: String,
    /// 1-based line where the instruction starts.
    pub line: usize,
}

impl Instruction {
    /// The JSON (exec) form's arguments, e.g. `ENTRYPOINT ["smtp-ingress"]`.
    pub fn exec_form(&self) -> Option<Vec<String>> {
        serde_json::from_str(self.args.trim()).ok()
    }

    /// `--flag=value` options at the start of the arguments (`COPY --from=builder ...`).
    pub fn flag(&self, name: &str) -> Option<&str> {
        self.args
            .split_whitespace()
            .take_while(|w| w.starts_with("--"))
            .find_map(|w| w.strip_prefix("--")?.strip_prefix(name)?.strip_prefix('='))
    }

    /// The words after the leading `--flags`.
    pub fn operands(&self) -> Vec<&str> {
        self.args
            .split_whitespace()
            .skip_while(|w| w.starts_with("--"))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: Option<String>,
    /// The image or earlier stage this one starts `FROM`.
    pub base: String,
    pub line: usize,
    pub instructions: Vec<Instruction>,
}

impl Stage {
    pub fn all<'a>(&'a self, keyword: &'a str) -> impl Iterator<Item = &'a Instruction> + 'a {
        self.instructions
            .iter()
            .filter(move |i| i.keyword == keyword)
    }

    pub fn last(&self, keyword: &str) -> Option<&Instruction> {
        self.instructions
            .iter()
            .rev()
            .find(|i| i.keyword == keyword)
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dockerfile {
    /// `ARG`s before the first `FROM`.
    pub global_args: Vec<Instruction>,
    pub stages: Vec<Stage>,
}

impl Dockerfile {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name.as_deref() == Some(name))
    }

    /// The stage and every stage it is built `FROM`, nearest first.
    pub fn ancestry<'a>(&'a self, stage: &'a Stage) -> Vec<&'a Stage> {
        let mut out = vec![stage];
        let mut cur = stage;
        while let Some(parent) = self.stage(&cur.base) {
            if out.iter().any(|s| std::ptr::eq(*s, parent)) {
                break;
            }
            out.push(parent);
            cur = parent;
        }
        out
    }
}

/// Parse a Dockerfile. Comment lines (also inside a continued instruction) are dropped;
/// a trailing backslash continues the instruction on the next line.
pub fn parse(text: &str) -> Result<Dockerfile, String> {
    let mut instructions = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (idx, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_none()) {
            continue;
        }
        let (body, continues) = match line.strip_suffix('\\') {
            Some(b) => (b.trim_end(), true),
            None => (line, false),
        };
        match &mut current {
            Some((_, acc)) => {
                if !body.is_empty() {
                    acc.push(' ');
                    acc.push_str(body);
                }
            }
            None => current = Some((idx + 1, body.to_string())),
        }
        if !continues && let Some((start, acc)) = current.take() {
            let (kw, args) = acc.split_once(char::is_whitespace).unwrap_or((&acc, ""));
            instructions.push(Instruction {
                keyword: kw.to_ascii_uppercase(),
                args: args.trim().to_string(),
                line: start,
            });
        }
    }
    if let Some((start, _)) = current {
        return Err(format!(
            "line {start}: instruction continues past the end of the file"
        ));
    }

    let mut df = Dockerfile::default();
    for ins in instructions {
        if ins.keyword == "FROM" {
            let words = ins.operands();
            let (base, name) = match words.as_slice() {
                [base] => (*base, None),
                [base, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => (*base, Some(*name)),
                _ => return Err(format!("line {}: malformed FROM {:?}", ins.line, ins.args)),
            };
            df.stages.push(Stage {
                name: name.map(str::to_string),
                base: base.to_string(),
                line: ins.line,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = df.stages.last_mut() {
            stage.instructions.push(ins);
        } else if ins.keyword == "ARG" {
            df.global_args.push(ins);
        } else {
            return Err(format!(
                "line {}: {} before the first FROM",
                ins.line, ins.keyword
            ));
        }
    }
    if df.stages.is_empty() {
        return Err("no FROM".into());
    }
    Ok(df)
}

/// The `--bin NAME` arguments of every `cargo build` in `stage`.
pub fn cargo_build_bins(stage: &Stage) -> Vec<String> {
    let mut bins = Vec::new();
    for run in stage.all("RUN") {
        for cmd in run.args.split("&&") {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            if !words.windows(2).any(|w| w == ["cargo", "build"]) {
                continue;
            }
            let mut it = words.iter();
            while let Some(w) = it.next() {
                if *w == "--bin" {
                    if let Some(b) = it.next() {
                        bins.push(b.to_string());
                    }
                } else if let Some(b) = w.strip_prefix("--bin=") {
                    bins.push(b.to_string());
                }
            }
        }
    }
    bins
}

/// Problems with `df` given the workspace's binaries (name → package).
pub fn check(df: &Dockerfile, workspace_bins: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut p = |m: String| problems.push(m);

    // Images pinned: a tag (or an ARG-provided one) on every external base, never `latest`.
    for st in &df.stages {
        if df.stage(&st.base).is_some() {
            continue;
        }
        let tag = st.base.rsplit_once(':').map(|(_, t)| t);
        match tag {
            None => p(format!(
                "stage {:?}: base image {} has no tag",
                st.name, st.base
            )),
            Some("latest") => p(format!(
                "stage {:?}: base image {} uses :latest",
                st.name, st.base
            )),
            Some(_) => {}
        }
    }

    // The build stage: release, locked, every binary listed, dependencies cooked first.
    let builders: Vec<&Stage> = df
        .stages
        .iter()
        .filter(|s| !cargo_build_bins(s).is_empty())
        .collect();
    let [builder] = builders.as_slice() else {
        p(format!(
            "expected exactly one stage running `cargo build --bin ...`, found {}",
            builders.len()
        ));
        return problems;
    };
    let build_bins = cargo_build_bins(builder);
    let build_cmd = builder
        .all("RUN")
        .find(|r| r.args.contains("cargo build"))
        .map(|r| r.args.clone())
        .unwrap_or_default();
    for flag in ["--release", "--locked"] {
        if !build_cmd.split_whitespace().any(|w| w == flag) {
            p(format!(
                "cargo build in stage {:?} lacks {flag}",
                builder.name
            ));
        }
    }
    for b in &build_bins {
        if !workspace_bins.contains_key(b) {
            p(format!(
                "Dockerfile builds --bin {b}, which no workspace package defines"
            ));
        }
    }
    let cook = builder
        .instructions
        .iter()
        .position(|i| i.keyword == "RUN" && i.args.contains("cargo chef cook"));
    let copy_all = builder.instructions.iter().position(|i| {
        i.keyword == "COPY" && i.flag("from").is_none() && i.operands() == [".", "."]
    });
    match (cook, copy_all) {
        (Some(c), Some(a)) if c < a => {}
        _ => p(format!(
            "stage {:?}: dependencies must be built (cargo chef cook) before the sources are copied (COPY . .) so they stay a cached layer",
            builder.name
        )),
    }

    // One final target per service and tool.
    let builder_name = builder.name.clone().unwrap_or_default();
    let targets = SERVICES
        .iter()
        .map(|s| (s.name, Some(s.ops_port)))
        .chain(TOOLS.iter().map(|t| (*t, None)));
    for (bin, ops_port) in targets {
        if !workspace_bins.contains_key(bin) {
            p(format!("the workspace has no binary {bin}"));
        }
        if !build_bins.iter().any(|b| b == bin) {
            p(format!("cargo build does not build --bin {bin}"));
        }
        let Some(stage) = df.stage(bin) else {
            p(format!("no Dockerfile target {bin}"));
            continue;
        };
        let ancestry = df.ancestry(stage);
        // The image settings live in `<bin>-prebuilt`, which the target is built on, so an
        // image from the host's binaries (deploy/offline-images.sh) is configured the same.
        if ancestry.get(1).and_then(|s| s.name.as_deref()) != Some(&format!("{bin}-prebuilt")) {
            p(format!("target {bin}: is not built FROM {bin}-prebuilt"));
        }
        let entry = ancestry
            .iter()
            .find_map(|s| s.last("ENTRYPOINT"))
            .and_then(Instruction::exec_form);
        if entry.as_ref().and_then(|e| e.first()).map(String::as_str) != Some(bin) {
            p(format!(
                "target {bin}: ENTRYPOINT {entry:?} does not run {bin}"
            ));
        }
        let copies_binary = stage.all("COPY").any(|c| {
            c.flag("from") == Some(builder_name.as_str())
                && c.operands()
                    .first()
                    .is_some_and(|src| src.ends_with(&format!("/{bin}")))
                && c.operands().last().is_some_and(|dst| {
                    *dst == format!("/usr/local/bin/{bin}") || *dst == "/usr/local/bin/"
                })
        });
        if !copies_binary {
            p(format!(
                "target {bin}: does not copy {bin} from stage {builder_name} into /usr/local/bin"
            ));
        }
        let user = ancestry.iter().find_map(|s| s.last("USER"));
        match user.map(|u| u.args.split(':').next().unwrap_or("").trim().to_string()) {
            Some(u) if u != "0" && u != "root" && !u.is_empty() => {}
            other => p(format!(
                "target {bin}: runs as {other:?}, not a non-root user"
            )),
        }
        if let Some(port) = ops_port {
            let hc = ancestry.iter().find_map(|s| s.last("HEALTHCHECK"));
            let ok = hc.is_some_and(|h| {
                h.args
                    .split(|c: char| !c.is_ascii_digit())
                    .any(|w| w == port.to_string())
            });
            if !ok {
                p(format!(
                    "target {bin}: no HEALTHCHECK on its ops port {port}"
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuations_comments_and_stages() {
        let df = parse(
            "# syntax=docker/dockerfile:1\nARG V=1\nFROM rust:${V} AS b\nRUN a \\\n  # note\n  && cargo build --release --bin x --bin=y\nFROM b\nENTRYPOINT [\"x\"]\n",
        )
        .unwrap();
        assert_eq!(df.global_args.len(), 1);
        assert_eq!(df.stages.len(), 2);
        assert_eq!(df.stages[0].name.as_deref(), Some("b"));
        assert_eq!(
            df.stages[0].instructions[0].args,
            "a && cargo build --release --bin x --bin=y"
        );
        assert_eq!(cargo_build_bins(&df.stages[0]), ["x", "y"]);
        assert_eq!(
            df.stages[1].last("ENTRYPOINT").unwrap().exec_form(),
            Some(vec!["x".to_string()])
        );
        assert_eq!(df.ancestry(&df.stages[1]).len(), 2);
        assert!(parse("RUN x\n").is_err());
        assert!(parse("FROM a\nRUN x \\\n").is_err());
    }
}
