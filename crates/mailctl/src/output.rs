//! Tables for people, JSON for scripts.

pub struct Output {
    pub json: bool,
}

impl Output {
    /// Print rows as an aligned table (or as a JSON array of objects keyed by the headers).
    pub fn table(&self, headers: &[&str], rows: Vec<Vec<String>>) {
        if self.json {
            let objs: Vec<serde_json::Map<String, serde_json::Value>> = rows
                .iter()
                .map(|r| {
                    headers
                        .iter()
                        .zip(r)
                        .map(|(h, v)| (h.to_ascii_lowercase().replace(' ', "_"), json_value(v)))
                        .collect()
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&objs).unwrap_or_default()
            );
            return;
        }
        print!("{}", render_table(headers, &rows));
    }

    pub fn message(&self, text: &str) {
        if self.json {
            println!("{}", serde_json::json!({ "ok": true, "message": text }));
        } else {
            println!("{text}");
        }
    }
}

fn json_value(v: &str) -> serde_json::Value {
    if let Ok(n) = v.parse::<i64>() {
        return n.into();
    }
    match v {
        "yes" => true.into(),
        "no" => false.into(),
        _ => v.into(),
    }
}

pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<w$}  ", c, w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align() {
        let t = render_table(
            &["NAME", "CATCH-ALL"],
            &[
                vec!["a.test".into(), "".into()],
                vec!["longer.test".into(), "x@a.test".into()],
            ],
        );
        assert_eq!(t, "NAME         CATCH-ALL\na.test\nlonger.test  x@a.test\n");
    }
}
