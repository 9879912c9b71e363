//! RFC 4731 ESEARCH results: which items a `RETURN (...)` asks for, what SAVE keeps
//! (RFC 5182 §2.4), and the `* ESEARCH` line itself. Pure, table-tested.

use crate::preparse::ReturnOpt;

/// The answer to one SEARCH with ESEARCH semantics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Esearch {
    pub min: Option<u32>,
    pub max: Option<u32>,
    /// Ascending numbers (UIDs or sequence numbers).
    pub all: Option<Vec<u32>>,
    pub count: Option<u32>,
    /// RFC 7162 §3.1.5: present when the search used MODSEQ and something matched.
    pub modseq: Option<u64>,
}

/// Compute the result items asked for by `opts` from the ascending matches. `RETURN ()`
/// means ALL (RFC 4731 §3.1); SAVE alone asks for no item.
pub fn compute(opts: &[ReturnOpt], matches: &[u32], modseq: Option<u64>) -> Esearch {
    let has = |o| opts.contains(&o);
    let all = opts.is_empty() || has(ReturnOpt::All);
    let nonempty = !matches.is_empty();
    Esearch {
        min: has(ReturnOpt::Min)
            .then(|| matches.first().copied())
            .flatten(),
        max: has(ReturnOpt::Max)
            .then(|| matches.last().copied())
            .flatten(),
        all: (all && nonempty).then(|| matches.to_vec()),
        count: has(ReturnOpt::Count).then_some(matches.len() as u32),
        modseq: modseq.filter(|_| nonempty),
    }
}

/// Is an ESEARCH response sent at all? Not when SAVE is the only option (RFC 5182 §2.1).
pub fn responds(opts: &[ReturnOpt]) -> bool {
    !(opts.len() == 1 && opts[0] == ReturnOpt::Save)
}

/// What `SAVE` keeps: only MIN and/or MAX when those are asked for without ALL or COUNT
/// (RFC 5182 §2.4), else every match.
pub fn saved(opts: &[ReturnOpt], matches: &[u32]) -> Vec<u32> {
    let has = |o| opts.contains(&o);
    if modseq_of_min_max_only(opts) {
        let mut v = Vec::new();
        if has(ReturnOpt::Min) {
            v.extend(matches.first());
        }
        if has(ReturnOpt::Max) {
            v.extend(matches.last());
        }
        v.dedup();
        v
    } else {
        matches.to_vec()
    }
}

/// With CONDSTORE, is the MODSEQ item that of the MIN/MAX messages only (MIN and/or MAX
/// without ALL or COUNT, RFC 4731 §3.2) rather than of every match?
pub fn modseq_of_min_max_only(opts: &[ReturnOpt]) -> bool {
    let has = |o| opts.contains(&o);
    (has(ReturnOpt::Min) || has(ReturnOpt::Max)) && !has(ReturnOpt::All) && !has(ReturnOpt::Count)
}

/// A compact sequence set of ascending numbers: `1:3,5,7:9`.
pub fn compact_set(nums: &[u32]) -> String {
    let mut s = String::new();
    let mut i = 0;
    while i < nums.len() {
        let start = nums[i];
        let mut end = start;
        while i + 1 < nums.len() && nums[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = nums[i];
        }
        if !s.is_empty() {
            s.push(',');
        }
        if start == end {
            s.push_str(&start.to_string());
        } else {
            s.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    s
}

/// `* ESEARCH (TAG "a1") UID MIN 1 MAX 9 ALL 1:3,9 COUNT 4 MODSEQ 7\r\n`.
pub fn serialize(tag: &str, uid: bool, r: &Esearch) -> Vec<u8> {
    let mut s = String::from("* ESEARCH (TAG \"");
    for c in tag.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push_str("\")");
    if uid {
        s.push_str(" UID");
    }
    if let Some(n) = r.min {
        s.push_str(&format!(" MIN {n}"));
    }
    if let Some(n) = r.max {
        s.push_str(&format!(" MAX {n}"));
    }
    if let Some(all) = &r.all
        && !all.is_empty()
    {
        s.push_str(" ALL ");
        s.push_str(&compact_set(all));
    }
    if let Some(n) = r.count {
        s.push_str(&format!(" COUNT {n}"));
    }
    if let Some(m) = r.modseq {
        s.push_str(&format!(" MODSEQ {m}"));
    }
    s.push_str("\r\n");
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReturnOpt::*;

    #[test]
    fn compact_sets() {
        for (nums, want) in [
            (&[][..], ""),
            (&[1][..], "1"),
            (&[1, 2, 3][..], "1:3"),
            (&[1, 2, 3, 5, 7, 8, 9][..], "1:3,5,7:9"),
            (&[4294967294, 4294967295][..], "4294967294:4294967295"),
            (&[2, 4, 6][..], "2,4,6"),
        ] {
            assert_eq!(compact_set(nums), want, "{nums:?}");
        }
    }

    #[test]
    fn serializer_table() {
        let m = [2u32, 3, 4, 10];
        /// (options, matches, modseq, UID SEARCH, expected line)
        type Case<'a> = (&'a [ReturnOpt], &'a [u32], Option<u64>, bool, &'a str);
        let cases: Vec<Case<'_>> = vec![
            (&[], &m, None, false, "* ESEARCH (TAG \"t\") ALL 2:4,10\r\n"),
            (
                &[All],
                &m,
                None,
                true,
                "* ESEARCH (TAG \"t\") UID ALL 2:4,10\r\n",
            ),
            (
                &[Min, Max, Count],
                &m,
                None,
                false,
                "* ESEARCH (TAG \"t\") MIN 2 MAX 10 COUNT 4\r\n",
            ),
            (
                &[Count],
                &[],
                None,
                true,
                "* ESEARCH (TAG \"t\") UID COUNT 0\r\n",
            ),
            // No MIN/MAX/ALL item for an empty result.
            (
                &[Min, Max, All],
                &[],
                None,
                false,
                "* ESEARCH (TAG \"t\")\r\n",
            ),
            (
                &[All, Count],
                &m,
                Some(917),
                true,
                "* ESEARCH (TAG \"t\") UID ALL 2:4,10 COUNT 4 MODSEQ 917\r\n",
            ),
            // No MODSEQ when nothing matched.
            (&[All], &[], Some(917), false, "* ESEARCH (TAG \"t\")\r\n"),
            (
                &[Max, Save],
                &m,
                None,
                false,
                "* ESEARCH (TAG \"t\") MAX 10\r\n",
            ),
        ];
        for (opts, matches, modseq, uid, want) in cases {
            let r = compute(opts, matches, modseq);
            let got = serialize("t", uid, &r);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                want,
                "{opts:?} {matches:?}"
            );
        }
        assert_eq!(
            serialize("a\"b", false, &Esearch::default()),
            b"* ESEARCH (TAG \"a\\\"b\")\r\n"
        );
    }

    #[test]
    fn save_keeps_min_max_only_without_all_or_count() {
        let m = [2u32, 3, 4, 10];
        assert_eq!(saved(&[Save], &m), m);
        assert_eq!(saved(&[Save, Min], &m), [2]);
        assert_eq!(saved(&[Save, Min, Max], &m), [2, 10]);
        assert_eq!(saved(&[Save, Min, Max], &[5]), [5]);
        assert_eq!(saved(&[Save, Min, All], &m), m);
        assert_eq!(saved(&[Save, Max, Count], &m), m);
        assert_eq!(saved(&[Save, Min], &[]), Vec::<u32>::new());
        assert!(modseq_of_min_max_only(&[Min, Save]));
        assert!(modseq_of_min_max_only(&[Max]));
        assert!(!modseq_of_min_max_only(&[Min, Count]));
        assert!(!modseq_of_min_max_only(&[]));
        assert!(!responds(&[Save]));
        assert!(responds(&[Save, Count]));
        assert!(responds(&[]));
    }
}
