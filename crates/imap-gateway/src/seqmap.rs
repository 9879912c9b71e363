//! The per-session message sequence number ↔ UID map, run-length encoded: a mailbox whose
//! UIDs are mostly contiguous costs a few bytes however many messages it holds, which keeps
//! idle sessions small.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    uid: u32,
    len: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqMap {
    runs: Vec<Run>,
    /// `before[i]`: messages in the runs before run i.
    before: Vec<u32>,
    total: u32,
}

impl SeqMap {
    pub fn from_uids(uids: &[u32]) -> Self {
        let mut m = SeqMap::default();
        for &u in uids {
            m.push_unindexed(u);
        }
        m.reindex();
        m
    }

    fn push_unindexed(&mut self, uid: u32) {
        match self.runs.last_mut() {
            Some(r) if r.uid.checked_add(r.len) == Some(uid) => r.len += 1,
            _ => self.runs.push(Run { uid, len: 1 }),
        }
        self.total += 1;
    }

    fn reindex(&mut self) {
        self.before.clear();
        let mut n = 0;
        for r in &self.runs {
            self.before.push(n);
            n += r.len;
        }
        self.total = n;
    }

    pub fn len(&self) -> u32 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    pub fn max_uid(&self) -> Option<u32> {
        self.runs.last().map(|r| r.uid + r.len - 1)
    }

    /// Append a new message; its UID must be above every known UID. Returns false if not.
    pub fn push(&mut self, uid: u32) -> bool {
        if self.max_uid().is_some_and(|m| uid <= m) {
            return false;
        }
        self.push_unindexed(uid);
        self.reindex();
        true
    }

    /// How many messages have a UID of `uid` or above.
    pub fn count_from(&self, uid: u32) -> u32 {
        let i = self
            .runs
            .partition_point(|r| u64::from(r.uid) + u64::from(r.len) <= u64::from(uid));
        let Some(r) = self.runs.get(i) else {
            return 0;
        };
        self.total - self.before[i] - uid.saturating_sub(r.uid).min(r.len)
    }

    /// The UID of sequence number `seq` (1-based).
    pub fn uid(&self, seq: u32) -> Option<u32> {
        if seq == 0 || seq > self.total {
            return None;
        }
        let i = self.before.partition_point(|&b| b < seq) - 1;
        Some(self.runs[i].uid + (seq - 1 - self.before[i]))
    }

    /// The sequence number of `uid`.
    pub fn seq(&self, uid: u32) -> Option<u32> {
        let i = self.runs.partition_point(|r| r.uid <= uid);
        if i == 0 {
            return None;
        }
        let r = self.runs[i - 1];
        (uid < r.uid + r.len).then(|| self.before[i - 1] + (uid - r.uid) + 1)
    }

    /// Remove `uid`, returning the sequence number it had.
    pub fn remove(&mut self, uid: u32) -> Option<u32> {
        let seq = self.seq(uid)?;
        let i = self.runs.partition_point(|r| r.uid <= uid) - 1;
        let r = self.runs[i];
        let last = r.uid + r.len - 1;
        if r.len == 1 {
            self.runs.remove(i);
        } else if uid == r.uid {
            self.runs[i] = Run {
                uid: uid + 1,
                len: r.len - 1,
            };
        } else if uid == last {
            self.runs[i].len -= 1;
        } else {
            self.runs[i].len = uid - r.uid;
            self.runs.insert(
                i + 1,
                Run {
                    uid: uid + 1,
                    len: last - uid,
                },
            );
        }
        self.reindex();
        Some(seq)
    }

    /// `(seq, uid)` of every message with `lo <= uid <= hi`, ascending.
    pub fn uids_in(&self, lo: u32, hi: u32) -> impl Iterator<Item = (u32, u32)> + '_ {
        let start = self.runs.partition_point(|r| r.uid + r.len - 1 < lo);
        self.runs[start..]
            .iter()
            .zip(self.before[start..].iter())
            .take_while(move |(r, _)| r.uid <= hi)
            .flat_map(move |(r, &b)| {
                let from = r.uid.max(lo);
                let to = (r.uid + r.len - 1).min(hi);
                (from..=to).map(move |u| (b + (u - r.uid) + 1, u))
            })
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.uids_in(1, u32::MAX)
    }

    /// Run count, for memory accounting in tests.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_match_a_plain_vector() {
        let uids = vec![3, 4, 5, 9, 10, 20, 21, 22, 23, 40];
        let m = SeqMap::from_uids(&uids);
        assert_eq!(m.len(), 10);
        assert_eq!(m.runs(), 4);
        for (i, &u) in uids.iter().enumerate() {
            assert_eq!(m.uid(i as u32 + 1), Some(u));
            assert_eq!(m.seq(u), Some(i as u32 + 1));
        }
        assert_eq!(m.uid(0), None);
        assert_eq!(m.uid(11), None);
        assert_eq!(m.seq(6), None);
        assert_eq!(m.seq(1), None);
        assert_eq!(m.seq(41), None);
        let got: Vec<_> = m.uids_in(5, 21).collect();
        assert_eq!(got, vec![(3, 5), (4, 9), (5, 10), (6, 20), (7, 21)]);
        assert_eq!(m.iter().count(), 10);
    }

    #[test]
    fn count_from_matches_a_plain_vector() {
        let uids = vec![3, 4, 5, 9, 10, 20, 21, 22, 23, 40];
        let m = SeqMap::from_uids(&uids);
        for from in 0..=45 {
            let want = uids.iter().filter(|&&u| u >= from).count() as u32;
            assert_eq!(m.count_from(from), want, "from {from}");
        }
        assert_eq!(SeqMap::default().count_from(1), 0);
        assert_eq!(SeqMap::from_uids(&[u32::MAX]).count_from(u32::MAX), 1);
    }

    #[test]
    fn removals_renumber_like_expunge() {
        let mut m = SeqMap::from_uids(&(1..=10).collect::<Vec<_>>());
        assert_eq!(m.remove(5), Some(5));
        assert_eq!(m.remove(5), None);
        assert_eq!(m.uid(5), Some(6));
        assert_eq!(m.remove(1), Some(1));
        assert_eq!(m.remove(10), Some(8));
        let v: Vec<u32> = m.iter().map(|(_, u)| u).collect();
        assert_eq!(v, vec![2, 3, 4, 6, 7, 8, 9]);
        assert!(m.push(11));
        assert!(!m.push(11));
        assert_eq!(m.seq(11), Some(8));
        assert_eq!(m.max_uid(), Some(11));
    }

    #[test]
    fn contiguous_mailbox_is_one_run() {
        let m = SeqMap::from_uids(&(1..=100_000).collect::<Vec<_>>());
        assert_eq!(m.runs(), 1);
        assert_eq!(m.uid(77_777), Some(77_777));
    }
}
