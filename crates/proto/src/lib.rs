//! The gRPC contracts between mailsuite services (generated from `proto/mailsuite/v1`), plus
//! small helpers for UID sets. This is the only coupling between services.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod v1 {
    tonic::include_proto!("mailsuite.v1");
}

pub use v1::*;

impl UidSet {
    /// A set holding exactly these ranges, each `(start, end)` inclusive.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u32, u32)>) -> Self {
        UidSet {
            ranges: ranges
                .into_iter()
                .map(|(a, b)| UidRange {
                    start: a.min(b),
                    end: a.max(b),
                })
                .collect(),
        }
    }

    /// A set of single UIDs, compressed into ranges (the input need not be sorted).
    pub fn from_uids(uids: impl IntoIterator<Item = u32>) -> Self {
        let mut v: Vec<u32> = uids.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        let mut ranges: Vec<UidRange> = Vec::new();
        for u in v {
            match ranges.last_mut() {
                Some(r) if r.end.checked_add(1) == Some(u) => r.end = u,
                _ => ranges.push(UidRange { start: u, end: u }),
            }
        }
        UidSet { ranges }
    }

    /// Everything from 1 to u32::MAX.
    pub fn all() -> Self {
        Self::from_ranges([(1, u32::MAX)])
    }

    pub fn contains(&self, uid: u32) -> bool {
        self.ranges.iter().any(|r| r.start <= uid && uid <= r.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_set_compresses_and_contains() {
        let s = UidSet::from_uids([5, 1, 2, 3, 9, 10, 3]);
        let pairs: Vec<(u32, u32)> = s.ranges.iter().map(|r| (r.start, r.end)).collect();
        assert_eq!(pairs, vec![(1, 3), (5, 5), (9, 10)]);
        assert!(s.contains(2) && s.contains(10) && !s.contains(4) && !s.contains(11));
        assert!(UidSet::all().contains(u32::MAX));
        let r = UidSet::from_ranges([(7, 3)]);
        assert_eq!((r.ranges[0].start, r.ranges[0].end), (3, 7));
    }
}
