//! RFC 5256 THREAD: ORDEREDSUBJECT and REFERENCES, and the `* THREAD` line. Pure,
//! table-tested; the session gathers the metadata and calls [`ordered_subject`] or
//! [`references`].

use std::collections::HashMap;

/// What threading needs of one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadMsg {
    /// The number reported (sequence number or UID); ascending = mailbox order.
    pub num: u32,
    /// Sent date (internal date when the Date header is missing or bad).
    pub date: i64,
    /// Base subject (RFC 5256 §2.1).
    pub subject: String,
    /// The subject marked a reply or forward.
    pub reply: bool,
    /// Raw header values.
    pub message_id: Vec<u8>,
    pub in_reply_to: Vec<u8>,
    pub references: Vec<u8>,
}

/// A thread node: a message, or a dummy (`num` = None) standing for a missing parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub num: Option<u32>,
    pub children: Vec<Node>,
}

/// The message IDs (`<...>`) in a header value, in order, without the brackets.
pub fn msg_ids(raw: &[u8]) -> Vec<String> {
    let s = String::from_utf8_lossy(raw);
    let mut out = Vec::new();
    let mut rest: &str = &s;
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find('>') else { break };
        let id = rest[..close].trim();
        // A `<` inside means the first one was stray text.
        let id = id.rsplit('<').next().unwrap_or(id).trim();
        if !id.is_empty() && !id.contains(char::is_whitespace) {
            out.push(id.to_string());
        }
        rest = &rest[close + 1..];
    }
    out
}

/// Sort key of a message: (sent date, mailbox order).
fn key(m: &ThreadMsg) -> (i64, u32) {
    (m.date, m.num)
}

/// ORDEREDSUBJECT (RFC 5256 §3): messages grouped by base subject, each group ordered by
/// sent date with every later message a child of the first, groups ordered by the sent
/// date of their first message.
pub fn ordered_subject(msgs: &[ThreadMsg]) -> Vec<Node> {
    let mut sorted: Vec<&ThreadMsg> = msgs.iter().collect();
    sorted.sort_by_key(|m| key(m));
    let mut groups: Vec<(String, Node)> = Vec::new();
    let mut by_subject: HashMap<&str, usize> = HashMap::new();
    for m in sorted {
        match by_subject.get(m.subject.as_str()) {
            Some(&i) => groups[i].1.children.push(leaf(m.num)),
            None => {
                by_subject.insert(&m.subject, groups.len());
                groups.push((m.subject.clone(), leaf(m.num)));
            }
        }
    }
    groups.into_iter().map(|(_, n)| n).collect()
}

fn leaf(num: u32) -> Node {
    Node {
        num: Some(num),
        children: Vec::new(),
    }
}

/// The REFERENCES algorithm (RFC 5256 §3, after Jamie Zawinski).
pub fn references(msgs: &[ThreadMsg]) -> Vec<Node> {
    // Containers in an arena: message index (if any), parent, children.
    struct C {
        msg: Option<usize>,
        parent: Option<usize>,
        children: Vec<usize>,
    }
    let mut cs: Vec<C> = Vec::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut order: Vec<usize> = (0..msgs.len()).collect();
    order.sort_by_key(|&i| msgs[i].num);
    let new = |cs: &mut Vec<C>| {
        cs.push(C {
            msg: None,
            parent: None,
            children: Vec::new(),
        });
        cs.len() - 1
    };
    fn is_ancestor(cs: &[C], anc: usize, mut of: usize) -> bool {
        loop {
            if of == anc {
                return true;
            }
            match cs[of].parent {
                Some(p) => of = p,
                None => return false,
            }
        }
    }
    fn unlink(cs: &mut [C], child: usize) {
        if let Some(p) = cs[child].parent.take() {
            cs[p].children.retain(|c| *c != child);
        }
    }
    for &i in &order {
        let m = &msgs[i];
        // (1) the message's container; a missing or duplicate Message-ID gets a unique one.
        let own = msg_ids(&m.message_id).into_iter().next();
        let me = match own.as_ref().and_then(|id| ids.get(id).copied()) {
            Some(c) if cs[c].msg.is_none() => c,
            _ => {
                let c = new(&mut cs);
                if let Some(id) = &own {
                    ids.entry(id.clone()).or_insert(c);
                }
                c
            }
        };
        cs[me].msg = Some(i);
        // (1A) link the references in order.
        let mut refs = msg_ids(&m.references);
        if refs.is_empty() {
            refs = msg_ids(&m.in_reply_to).into_iter().take(1).collect();
        }
        let mut prev: Option<usize> = None;
        for r in &refs {
            let c = match ids.get(r) {
                Some(&c) => c,
                None => {
                    let c = new(&mut cs);
                    ids.insert(r.clone(), c);
                    c
                }
            };
            if let Some(p) = prev
                && p != c
                && cs[c].parent.is_none()
                && !is_ancestor(&cs, c, p)
            {
                cs[c].parent = Some(p);
                cs[p].children.push(c);
            }
            prev = Some(c);
        }
        // (1B) the last reference is the parent, replacing any earlier guess.
        match prev {
            Some(p) if p != me && !is_ancestor(&cs, me, p) => {
                if cs[me].parent != Some(p) {
                    unlink(&mut cs, me);
                    cs[me].parent = Some(p);
                    cs[p].children.push(me);
                }
            }
            // A loop: the old parent still goes (as Dovecot does), the new one is not linked.
            Some(_) | None => unlink(&mut cs, me),
        }
    }
    // (2) the root set.
    fn build(cs: &[C], c: usize, msgs: &[ThreadMsg]) -> Node {
        Node {
            num: cs[c].msg.map(|i| msgs[i].num),
            children: cs[c].children.iter().map(|&k| build(cs, k, msgs)).collect(),
        }
    }
    let roots: Vec<Node> = (0..cs.len())
        .filter(|&c| cs[c].parent.is_none())
        .map(|c| build(&cs, c, msgs))
        .collect();
    let by_num: HashMap<u32, &ThreadMsg> = msgs.iter().map(|m| (m.num, m)).collect();
    let k = |n: &Node| -> (i64, u32) {
        let first = if n.num.is_some() {
            n
        } else {
            n.children.first().unwrap_or(n)
        };
        first
            .num
            .and_then(|x| by_num.get(&x))
            .map(|m| key(m))
            .unwrap_or((i64::MAX, u32::MAX))
    };
    // (3) prune dummies.
    let mut roots = prune(roots, true);
    // (4) sort the top level (a dummy by its first child, its children sorted first).
    for r in &mut roots {
        if r.num.is_none() {
            r.children.sort_by_key(|c| k(c));
        }
    }
    roots.sort_by_key(|r| k(r));
    // (5) gather by base subject.
    let subject = |n: &Node| -> Option<(String, bool)> {
        let first = if n.num.is_some() {
            n
        } else {
            n.children.first()?
        };
        let m = by_num.get(&first.num?)?;
        (!m.subject.is_empty()).then(|| (m.subject.clone(), m.reply))
    };
    let mut table: HashMap<String, usize> = HashMap::new();
    for (i, r) in roots.iter().enumerate() {
        let Some((s, _)) = subject(r) else { continue };
        match table.get(&s) {
            None => {
                table.insert(s, i);
            }
            Some(&j) => {
                let other = &roots[j];
                let other_reply = subject(other).is_some_and(|x| x.1);
                let cur_reply = subject(r).is_some_and(|x| x.1);
                if other.num.is_some() && (r.num.is_none() || (other_reply && !cur_reply)) {
                    table.insert(s, i);
                }
            }
        }
    }
    let mut slots: Vec<Option<Node>> = roots.iter().cloned().map(Some).collect();
    for i in 0..roots.len() {
        let Some((s, cur_reply)) = subject(&roots[i]) else {
            continue;
        };
        let j = table[&s];
        if j == i {
            continue;
        }
        let cur = slots[i].take().expect("present");
        let target = slots[j].take().expect("present");
        let target_reply = subject(&roots[j]).is_some_and(|x| x.1) && target.num.is_some();
        let merged = if target.num.is_none() && cur.num.is_none() {
            let mut t = target;
            t.children.extend(cur.children);
            t
        } else if target.num.is_none() || (cur_reply && cur.num.is_some() && !target_reply) {
            // The current thread joins the dummy, or replies to the message in the table.
            let mut t = target;
            t.children.push(cur);
            t
        } else {
            Node {
                num: None,
                children: vec![target, cur],
            }
        };
        slots[j] = Some(merged);
    }
    let mut out: Vec<Node> = slots.into_iter().flatten().collect();
    // (6) sort every set of siblings by sent date, deepest first.
    fn sort_tree(n: &mut Node, k: &dyn Fn(&Node) -> (i64, u32)) {
        for c in &mut n.children {
            sort_tree(c, k);
        }
        n.children.sort_by_key(|c| k(c));
    }
    for r in &mut out {
        sort_tree(r, &k);
    }
    out.sort_by_key(|r| k(r));
    out
}

/// Step (3): a dummy without children goes; a dummy's children take its place, except
/// that at the top level a dummy with several children stays.
fn prune(nodes: Vec<Node>, top: bool) -> Vec<Node> {
    let mut out = Vec::new();
    for mut n in nodes {
        n.children = prune(std::mem::take(&mut n.children), false);
        if n.num.is_some() || (top && n.children.len() > 1) {
            out.push(n);
        } else {
            // A childless dummy simply goes.
            out.extend(n.children);
        }
    }
    out
}

/// The `* THREAD ...` line.
pub fn serialize(threads: &[Node]) -> Vec<u8> {
    let mut s = String::from("* THREAD");
    if !threads.is_empty() {
        s.push(' ');
    }
    for t in threads {
        s.push('(');
        members(t, &mut s);
        s.push(')');
    }
    s.push_str("\r\n");
    s.into_bytes()
}

fn members(n: &Node, s: &mut String) {
    if let Some(num) = n.num {
        s.push_str(&num.to_string());
        match n.children.len() {
            0 => return,
            1 => {
                s.push(' ');
                members(&n.children[0], s);
                return;
            }
            _ => s.push(' '),
        }
    }
    for c in &n.children {
        s.push('(');
        members(c, s);
        s.push(')');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(num: u32, date: i64, subject: &str, id: &str, refs: &str) -> ThreadMsg {
        let (subject, reply) = crate::sort::base_subject(subject.as_bytes());
        ThreadMsg {
            num,
            date,
            subject,
            reply,
            message_id: id.as_bytes().to_vec(),
            in_reply_to: Vec::new(),
            references: refs.as_bytes().to_vec(),
        }
    }

    fn line(t: &[Node]) -> String {
        String::from_utf8(serialize(t)).unwrap()
    }

    #[test]
    fn message_ids() {
        assert_eq!(msg_ids(b"<a@b> <c@d>"), ["a@b", "c@d"]);
        assert_eq!(msg_ids(b"junk <x <y@z> (c)"), ["y@z"]);
        assert!(msg_ids(b"no ids").is_empty());
    }

    #[test]
    fn serialization() {
        let n = |num: Option<u32>, children: Vec<Node>| Node { num, children };
        let table: Vec<(Vec<Node>, &str)> = vec![
            (vec![], "* THREAD\r\n"),
            (
                vec![n(Some(1), vec![]), n(Some(2), vec![])],
                "* THREAD (1)(2)\r\n",
            ),
            (
                vec![n(
                    Some(3),
                    vec![n(Some(6), vec![leaf(4), n(Some(44), vec![leaf(7)])])],
                )],
                "* THREAD (3 6 (4)(44 7))\r\n",
            ),
            (
                vec![n(None, vec![leaf(3), leaf(5)])],
                "* THREAD ((3)(5))\r\n",
            ),
        ];
        for (t, want) in table {
            assert_eq!(line(&t), want);
        }
    }

    #[test]
    fn ordered_subjects() {
        let msgs = vec![
            m(1, 30, "b", "", ""),
            m(2, 10, "Re: b", "", ""),
            m(3, 20, "a", "", ""),
            m(4, 40, "A", "", ""),
            m(5, 5, "c", "", ""),
        ];
        assert_eq!(line(&ordered_subject(&msgs)), "* THREAD (5)(2 1)(3 4)\r\n");
    }

    #[test]
    fn references_table() {
        let table: Vec<(Vec<ThreadMsg>, &str)> = vec![
            // A plain chain and an unrelated message.
            (
                vec![
                    m(1, 1, "x", "<1@t>", ""),
                    m(2, 2, "Re: x", "<2@t>", "<1@t>"),
                    m(3, 3, "Re: x", "<3@t>", "<1@t> <2@t>"),
                    m(4, 4, "y", "<4@t>", ""),
                ],
                "* THREAD (1 2 3)(4)\r\n",
            ),
            // Siblings under a missing parent: a dummy at the top level.
            (
                vec![
                    m(1, 1, "a", "<1@t>", "<0@t>"),
                    m(2, 2, "b", "<2@t>", "<0@t>"),
                ],
                "* THREAD ((1)(2))\r\n",
            ),
            // A dummy with a single child is replaced by it.
            (vec![m(1, 1, "a", "<1@t>", "<0@t>")], "* THREAD (1)\r\n"),
            // Same base subject, no references: the reply joins the original.
            (
                vec![
                    m(1, 1, "topic", "<1@t>", ""),
                    m(2, 2, "Re: topic", "<2@t>", ""),
                ],
                "* THREAD (1 2)\r\n",
            ),
            // Same subject, neither a reply: a dummy holds both.
            (
                vec![m(1, 1, "topic", "<1@t>", ""), m(2, 2, "topic", "<2@t>", "")],
                "* THREAD ((1)(2))\r\n",
            ),
            // Loops are not followed; duplicate Message-IDs are made unique.
            // imaptest `thread`: 3's own parent (2, its child by 2's References) would be a
            // loop, so 3 loses the parent 1 that 2's References gave it and is a root.
            (
                vec![
                    m(1, 17, "", "<a@b>", ""),
                    m(2, 15, "", "<b@b>", "<a@b> <c@b>"),
                    m(3, 16, "", "<c@b>", "<b@b>"),
                ],
                "* THREAD (3 2)(1)\r\n",
            ),
            (
                vec![
                    m(1, 1, "p", "<1@t>", "<2@t>"),
                    m(2, 2, "q", "<2@t>", "<1@t>"),
                    m(3, 3, "r", "<1@t>", ""),
                ],
                "* THREAD (2 1)(3)\r\n",
            ),
            // Siblings are ordered by sent date, not by number.
            (
                vec![
                    m(1, 1, "x", "<1@t>", ""),
                    m(2, 9, "x", "<2@t>", "<1@t>"),
                    m(3, 5, "x", "<3@t>", "<1@t>"),
                ],
                "* THREAD (1 (3)(2))\r\n",
            ),
        ];
        for (msgs, want) in table {
            assert_eq!(line(&references(&msgs)), want, "{msgs:?}");
        }
    }
}
