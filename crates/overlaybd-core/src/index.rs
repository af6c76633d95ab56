//! The merged index: one sorted, non-overlapping extent map over a stack of up to
//! 255 layers (top wins, gaps read as zeros, zeroed entries mask lower data),
//! with a radix-table accelerated lookup.

use crate::lsmt::Segment;

/// Lookup acceleration over the sorted segment ends: a radix table maps the top
/// bits of a sector to the range of segments that can hold it, so a lookup is
/// one table load plus a short scan of a dense `ends` array (a binary search
/// only when a bucket is crowded). Memory: 12-16 bytes per segment.
#[derive(Debug, Clone)]
struct Radix {
    /// `ends[i]` = end sector of segment `i` (strictly increasing).
    ends: Vec<u64>,
    /// `table[b]` = number of segments ending at or before `b << shift`;
    /// `table.len()` = buckets + 1.
    table: Vec<u32>,
    shift: u32,
}

/// Buckets holding at most this many segments are scanned linearly.
const LINEAR_SCAN: usize = 8;

impl Radix {
    fn build(ends: Vec<u64>) -> Self {
        let n = ends.len().max(1);
        // 2^k buckets, 2^k >= n: about one segment per bucket on average.
        let k = usize::BITS - (n - 1).leading_zeros();
        let max = ends.last().copied().unwrap_or(0);
        let shift = (u64::BITS - max.leading_zeros()).saturating_sub(k);
        let buckets = 1u64 << k;
        let mut table = Vec::with_capacity(buckets as usize + 1);
        let mut i = 0usize;
        for b in 0..=buckets {
            let start = ((b as u128) << shift).min(u64::MAX as u128) as u64;
            while i < ends.len() && ends[i] <= start {
                i += 1;
            }
            table.push(i as u32);
        }
        Radix { ends, table, shift }
    }

    /// Number of ends `<= q` (= index of the first segment ending after `q`).
    #[inline]
    fn upper_bound(&self, q: u64) -> usize {
        let b = (q >> self.shift) as usize;
        if b >= self.table.len() - 1 {
            return self.ends.len();
        }
        let lo = self.table[b] as usize;
        let hi = self.table[b + 1] as usize;
        let bucket = &self.ends[lo..hi];
        if bucket.len() <= LINEAR_SCAN {
            lo + bucket.iter().map(|&e| (e <= q) as usize).sum::<usize>()
        } else {
            lo + bucket.partition_point(|&e| e <= q)
        }
    }
}

/// Sorted, non-overlapping segments whose `tag` is the layer position
/// (0 = bottom), with fast lookup by sector.
#[derive(Debug, Clone)]
pub struct MergedIndex {
    segs: Vec<Segment>,
    radix: Radix,
}

impl Default for MergedIndex {
    fn default() -> Self {
        Self::from_sorted(Vec::new())
    }
}

impl MergedIndex {
    /// Builds the merged view of `layers`, given bottom to top. Each layer's
    /// segments must be sorted and non-overlapping (as `RoLayer` guarantees);
    /// its tags are replaced by its position. Adjacent runs from one layer with
    /// contiguous file offsets are joined.
    pub fn build<S: AsRef<[Segment]>>(layers: &[S]) -> Self {
        let mut acc: Vec<Segment> = Vec::new();
        for (pos, layer) in layers.iter().enumerate().rev() {
            acc = fill_gaps(&acc, layer.as_ref(), pos as u8);
        }
        Self::from_sorted(coalesce(acc))
    }

    /// Wraps segments that are already sorted and non-overlapping.
    pub fn from_sorted(segs: Vec<Segment>) -> Self {
        debug_assert!(segs.windows(2).all(|w| w[0].end() <= w[1].offset));
        let radix = Radix::build(segs.iter().map(|s| s.end()).collect());
        MergedIndex { segs, radix }
    }

    /// All segments, sorted.
    pub fn segments(&self) -> &[Segment] {
        &self.segs
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.segs.len()
    }

    /// True when nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Index of the first segment that ends after `sector`.
    #[inline]
    pub fn first_ending_after(&self, sector: u64) -> usize {
        self.radix.upper_bound(sector)
    }

    /// The segments overlapping sectors `[offset, offset + len)`, trimmed to it.
    #[inline]
    pub fn lookup(&self, offset: u64, len: u64) -> Lookup<'_> {
        let end = offset.saturating_add(len);
        Lookup {
            segs: &self.segs[self.first_ending_after(offset).min(self.segs.len())..],
            from: offset,
            to: end,
        }
    }
}

/// Iterator over the trimmed segments of one lookup.
#[derive(Debug, Clone)]
pub struct Lookup<'a> {
    segs: &'a [Segment],
    from: u64,
    to: u64,
}

impl Iterator for Lookup<'_> {
    type Item = Segment;
    #[inline]
    fn next(&mut self) -> Option<Segment> {
        let (first, rest) = self.segs.split_first()?;
        if first.offset >= self.to || self.from >= self.to {
            self.segs = &[];
            return None;
        }
        self.segs = rest;
        Some(first.trimmed(self.from, self.to))
    }
}

/// `upper` (sorted, tagged) plus the parts of `lower` it does not cover.
fn fill_gaps(upper: &[Segment], lower: &[Segment], tag: u8) -> Vec<Segment> {
    let mut out = Vec::with_capacity(upper.len() + lower.len());
    let mut i = 0;
    let mut covered = 0u64; // end of the last upper segment emitted
    for s in lower {
        if s.is_invalid() || s.length == 0 {
            continue;
        }
        let s = Segment { tag, ..*s };
        let end = s.end();
        let mut cur = s.offset.max(covered);
        while cur < end {
            while i < upper.len() && upper[i].end() <= cur {
                out.push(upper[i]);
                covered = upper[i].end();
                i += 1;
            }
            if i < upper.len() && upper[i].offset <= cur {
                out.push(upper[i]);
                covered = upper[i].end();
                cur = cur.max(covered);
                i += 1;
                continue;
            }
            let gap_end = match upper.get(i) {
                Some(u) => u.offset.min(end),
                None => end,
            };
            out.push(s.trimmed(cur, gap_end));
            cur = gap_end;
        }
    }
    out.extend_from_slice(&upper[i..]);
    out
}

/// Joins adjacent segments from one layer whose file ranges are contiguous.
fn coalesce(segs: Vec<Segment>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(segs.len());
    for s in segs {
        if let Some(last) = out.last_mut() {
            if last.end() == s.offset
                && last.tag == s.tag
                && last.zeroed == s.zeroed
                && (s.zeroed || last.mend() == s.moffset)
                && (last.length as u64 + s.length as u64) <= u32::MAX as u64
            {
                last.length += s.length;
                continue;
            }
        }
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn radix_matches_partition_point() {
        let mut rng = fixtures::Rng::new(3);
        for n in [0usize, 1, 2, 7, 8, 9, 100, 1000, 5000] {
            // Uniform, clustered and far-outlier layouts.
            for layout in 0..3 {
                let mut keys: Vec<u64> = Vec::new();
                let mut cur = 0u64;
                for i in 0..n {
                    cur += 1 + rng.below(if layout == 1 && i % 50 != 0 { 2 } else { 300 });
                    if layout == 2 && i == n - 1 {
                        cur += 1 << 45;
                    }
                    keys.push(cur);
                }
                let r = Radix::build(keys.clone());
                let top = keys.last().copied().unwrap_or(0) + 10;
                let mut qs: Vec<u64> = (0..2000).map(|_| rng.below(top)).collect();
                qs.extend(
                    keys.iter()
                        .flat_map(|&k| [k.saturating_sub(1), k, k + 1])
                        .take(3000),
                );
                qs.extend([0, u64::MAX, u64::MAX - 1, top << 3]);
                for q in qs {
                    assert_eq!(
                        r.upper_bound(q),
                        keys.partition_point(|&k| k <= q),
                        "n={n} layout={layout} q={q}"
                    );
                }
            }
        }
    }

    #[test]
    fn top_wins_and_zeroed_masks() {
        let bottom = vec![Segment::data(0, 100, 8)];
        let top = vec![Segment::data(10, 10, 8), Segment::zeroed(50, 5)];
        let m = MergedIndex::build(&[bottom, top]);
        let got: Vec<_> = m
            .segments()
            .iter()
            .map(|s| (s.offset, s.length, s.tag, s.zeroed, s.moffset))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 10, 0, false, 8),
                (10, 10, 1, false, 8),
                (20, 30, 0, false, 28),
                (50, 5, 1, true, 0),
                (55, 45, 0, false, 63)
            ]
        );
        let l: Vec<_> = m.lookup(15, 10).collect();
        assert_eq!(
            l[0],
            Segment {
                offset: 15,
                length: 5,
                moffset: 13,
                zeroed: false,
                tag: 1
            }
        );
        assert_eq!(
            l[1],
            Segment {
                offset: 20,
                length: 5,
                moffset: 28,
                zeroed: false,
                tag: 0
            }
        );
        assert_eq!(m.lookup(200, 10).count(), 0);
    }

    /// The naive model: paint every layer's sectors bottom to top.
    fn paint(layers: &[Vec<Segment>], size: u64) -> Vec<Option<(u8, bool, u64)>> {
        let mut disk = vec![None; size as usize];
        for (pos, l) in layers.iter().enumerate() {
            for s in l {
                for k in 0..s.length as u64 {
                    disk[(s.offset + k) as usize] = Some((
                        pos as u8,
                        s.zeroed,
                        if s.zeroed { 0 } else { s.moffset + k },
                    ));
                }
            }
        }
        disk
    }

    fn layer_strategy(size: u64) -> impl Strategy<Value = Vec<Segment>> {
        proptest::collection::vec((0..size, 1u64..40, any::<bool>(), 8u64..10_000), 0..20).prop_map(
            move |raw| {
                let mut segs: Vec<Segment> = Vec::new();
                let mut sorted = raw;
                sorted.sort_by_key(|r| r.0);
                for (off, len, z, m) in sorted {
                    let start = segs.last().map_or(off, |l: &Segment| off.max(l.end()));
                    let end = (start + len).min(size);
                    if start < end {
                        let mut s = Segment::data(start, (end - start) as u32, m);
                        s.zeroed = z;
                        segs.push(s);
                    }
                }
                segs
            },
        )
    }

    proptest! {
        #[test]
        fn merged_index_equals_painting(layers in proptest::collection::vec(layer_strategy(300), 1..8),
                                        queries in proptest::collection::vec((0u64..320, 0u64..64), 1..20)) {
            let size = 300;
            let m = MergedIndex::build(&layers);
            let model = paint(&layers, size);
            // Every sector of the merged index agrees with the model.
            let mut got = vec![None; size as usize];
            for s in m.segments() {
                prop_assert!(s.length > 0);
                for k in 0..s.length as u64 {
                    got[(s.offset + k) as usize] = Some((s.tag, s.zeroed, if s.zeroed { 0 } else { s.moffset + k }));
                }
            }
            prop_assert_eq!(&got, &model);
            for w in m.segments().windows(2) {
                prop_assert!(w[0].end() <= w[1].offset);
            }
            // Lookups return exactly the covered sectors of the query, in order.
            for (off, len) in queries {
                let mut cur = off;
                for s in m.lookup(off, len) {
                    prop_assert!(s.offset >= cur && s.end() <= off + len);
                    for k in 0..s.length as u64 {
                        let i = (s.offset + k) as usize;
                        prop_assert_eq!(model[i], Some((s.tag, s.zeroed, if s.zeroed { 0 } else { s.moffset + k })));
                    }
                    for g in cur..s.offset {
                        prop_assert_eq!(model.get(g as usize).copied().flatten(), None);
                    }
                    cur = s.end();
                }
                for g in cur..(off + len).min(size) {
                    prop_assert_eq!(model[g as usize], None);
                }
            }
        }
    }

    #[test]
    fn large_offsets() {
        let far = 1u64 << 49;
        let m = MergedIndex::build(&[vec![Segment::data(far, 8, 8)]]);
        assert_eq!(m.lookup(far + 4, 100).next().unwrap().moffset, 12);
        assert_eq!(m.lookup(0, far).count(), 0);
    }
}
