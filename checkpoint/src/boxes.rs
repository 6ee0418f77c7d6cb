//! Hyper-rectangle arithmetic on row-major tensors: intersecting slices, copying the
//! intersection from one slice's bytes into another's, and cutting a flat range of a slice
//! (a ZeRO-1 shard of a flattened bucket) into rectangles.

/// A hyper-rectangle: `offsets[d] .. offsets[d] + lengths[d]` in each dimension.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    pub offsets: Vec<u64>,
    pub lengths: Vec<u64>,
}

impl Region {
    pub fn new(offsets: Vec<u64>, lengths: Vec<u64>) -> Region {
        debug_assert_eq!(offsets.len(), lengths.len());
        Region { offsets, lengths }
    }
    pub fn numel(&self) -> u64 {
        self.lengths.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.lengths.contains(&0)
    }
    /// The common part of two regions of the same tensor, if any.
    pub fn intersect(&self, other: &Region) -> Option<Region> {
        let mut offsets = Vec::with_capacity(self.offsets.len());
        let mut lengths = Vec::with_capacity(self.offsets.len());
        for d in 0..self.offsets.len() {
            let lo = self.offsets[d].max(other.offsets[d]);
            let hi = (self.offsets[d] + self.lengths[d]).min(other.offsets[d] + other.lengths[d]);
            if hi <= lo {
                return None;
            }
            offsets.push(lo);
            lengths.push(hi - lo);
        }
        Some(Region { offsets, lengths })
    }
    /// Shifted by `by` (adding a slice's offsets to local coordinates).
    pub fn shifted(&self, by: &[u64]) -> Region {
        Region {
            offsets: self.offsets.iter().zip(by).map(|(a, b)| a + b).collect(),
            lengths: self.lengths.clone(),
        }
    }
}

/// Copy `region` (global coordinates, inside both) from `src`, the row-major bytes of
/// `src_box`, into `dst`, the row-major bytes of `dst_box`. `elem` is the element size.
///
/// # Panics
/// If a buffer is shorter than its box or the region is not inside both boxes: callers plan
/// regions from intersections, so this is a bug, not bad input.
pub fn copy_region(src: &[u8], src_box: &Region, dst: &mut [u8], dst_box: &Region, region: &Region, elem: usize) {
    let n = region.offsets.len();
    assert!(
        src.len() as u64 >= src_box.numel() * elem as u64,
        "source shorter than its box"
    );
    assert!(
        dst.len() as u64 >= dst_box.numel() * elem as u64,
        "destination shorter than its box"
    );
    if region.is_empty() {
        return;
    }
    if n == 0 {
        dst[..elem].copy_from_slice(&src[..elem]);
        return;
    }
    for d in 0..n {
        assert!(
            region.offsets[d] >= src_box.offsets[d]
                && region.offsets[d] + region.lengths[d] <= src_box.offsets[d] + src_box.lengths[d]
                && region.offsets[d] >= dst_box.offsets[d]
                && region.offsets[d] + region.lengths[d] <= dst_box.offsets[d] + dst_box.lengths[d],
            "region outside a box in dimension {d}"
        );
    }
    // Trailing dimensions the region covers completely in both boxes merge into one run.
    let mut k = n - 1;
    while k > 0 && region.lengths[k] == src_box.lengths[k] && region.lengths[k] == dst_box.lengths[k] {
        k -= 1;
    }
    let run: u64 = region.lengths[k..].iter().product::<u64>() * elem as u64;
    let strides = |b: &Region| -> Vec<u64> {
        let mut s = vec![elem as u64; n];
        for d in (0..n - 1).rev() {
            s[d] = s[d + 1] * b.lengths[d + 1];
        }
        s
    };
    let (ss, ds) = (strides(src_box), strides(dst_box));
    // Odometer over dimensions 0..k of the region (dimension k is the run's outer dimension).
    let mut idx = vec![0u64; k];
    loop {
        let mut so = 0;
        let mut d_o = 0;
        for d in 0..=k {
            let i = if d < k { idx[d] } else { 0 };
            so += (region.offsets[d] + i - src_box.offsets[d]) * ss[d];
            d_o += (region.offsets[d] + i - dst_box.offsets[d]) * ds[d];
        }
        for d in k + 1..n {
            so += (region.offsets[d] - src_box.offsets[d]) * ss[d];
            d_o += (region.offsets[d] - dst_box.offsets[d]) * ds[d];
        }
        let (so, d_o, run) = (so as usize, d_o as usize, run as usize);
        dst[d_o..d_o + run].copy_from_slice(&src[so..so + run]);
        let mut d = k;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < region.lengths[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// The elements `start..end` of a row-major tensor of `shape`, as rectangles (local
/// coordinates) in row-major order: at most two partial pieces per dimension plus one block.
pub fn flat_range_to_regions(shape: &[u64], start: u64, end: u64) -> Vec<Region> {
    let mut out = Vec::new();
    let total: u64 = shape.iter().product();
    let end = end.min(total);
    if start < end {
        cut(shape, start, end, &mut vec![0; shape.len()], 0, &mut out);
    }
    out
}

fn cut(shape: &[u64], start: u64, end: u64, base: &mut Vec<u64>, dim: usize, out: &mut Vec<Region>) {
    let n = shape.len();
    if dim == n {
        out.push(Region::new(base.clone(), vec![1; n]));
        return;
    }
    let inner: u64 = shape[dim + 1..].iter().product();
    let full = |lo: u64, hi: u64, base: &Vec<u64>| {
        let mut offsets = base.clone();
        offsets[dim] = lo;
        let mut lengths = vec![1; n];
        lengths[dim] = hi - lo;
        lengths[dim + 1..].copy_from_slice(&shape[dim + 1..]);
        for o in &mut offsets[dim + 1..] {
            *o = 0;
        }
        Region::new(offsets, lengths)
    };
    let (first, last) = (start / inner, (end - 1) / inner);
    if first == last {
        if start.is_multiple_of(inner) && end - start == inner {
            out.push(full(first, first + 1, base));
        } else {
            base[dim] = first;
            cut(shape, start % inner, end - first * inner, base, dim + 1, out);
            base[dim] = 0;
        }
        return;
    }
    let mut block_lo = first;
    if !start.is_multiple_of(inner) {
        base[dim] = first;
        cut(shape, start % inner, inner, base, dim + 1, out);
        base[dim] = 0;
        block_lo = first + 1;
    }
    let block_hi = if !end.is_multiple_of(inner) { last } else { last + 1 };
    if block_hi > block_lo {
        out.push(full(block_lo, block_hi, base));
    }
    if !end.is_multiple_of(inner) {
        base[dim] = last;
        cut(shape, 0, end - last * inner, base, dim + 1, out);
        base[dim] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flat_index(shape: &[u64], idx: &[u64]) -> u64 {
        idx.iter().zip(shape).fold(0, |acc, (i, s)| acc * s + i)
    }

    fn elements(r: &Region, shape: &[u64]) -> Vec<u64> {
        let mut out = Vec::new();
        let n = r.lengths.len();
        let mut idx = vec![0u64; n];
        if r.is_empty() {
            return out;
        }
        loop {
            let global: Vec<u64> = (0..n).map(|d| r.offsets[d] + idx[d]).collect();
            out.push(flat_index(shape, &global));
            let mut d = n;
            loop {
                if d == 0 {
                    return out;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < r.lengths[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }

    #[test]
    fn flat_ranges_are_cut_into_few_rectangles() {
        let shape = [4, 5, 6];
        // A ZeRO shard in the middle of a [4,5,6] tensor: partial row, rows, partial plane...
        let regions = flat_range_to_regions(&shape, 7, 100);
        let covered: Vec<u64> = regions.iter().flat_map(|r| elements(r, &shape)).collect();
        assert_eq!(covered, (7..100).collect::<Vec<_>>());
        assert!(regions.len() <= 5, "{regions:?}");
        assert_eq!(
            flat_range_to_regions(&shape, 0, 120),
            vec![Region::new(vec![0, 0, 0], vec![4, 5, 6])]
        );
        assert!(flat_range_to_regions(&shape, 5, 5).is_empty());
        assert_eq!(flat_range_to_regions(&[], 0, 1), vec![Region::new(vec![], vec![])]);
    }

    proptest! {
        #[test]
        fn flat_ranges_cover_exactly_in_order(
            shape in proptest::collection::vec(1u64..6, 1..4),
            a in 0u64..200, b in 0u64..200,
        ) {
            let total: u64 = shape.iter().product();
            let (start, end) = (a.min(b) % (total + 1), a.max(b) % (total + 1));
            let (start, end) = (start.min(end), start.max(end));
            let regions = flat_range_to_regions(&shape, start, end);
            let covered: Vec<u64> = regions.iter().flat_map(|r| elements(r, &shape)).collect();
            prop_assert_eq!(covered, (start..end).collect::<Vec<_>>());
            prop_assert!(regions.len() <= 2 * shape.len() + 1);
        }

        #[test]
        fn copies_move_exactly_the_intersection(
            shape in proptest::collection::vec(1u64..7, 1..4),
            cuts in proptest::collection::vec((0u64..7, 0u64..7, 0u64..7, 0u64..7), 3),
        ) {
            let n = shape.len();
            let pick = |i: usize| {
                let mut off = Vec::new();
                let mut len = Vec::new();
                for d in 0..n {
                    let (a, b) = (cuts[d].0 + 3 * i as u64, cuts[d].1 + cuts[d].2 * i as u64);
                    let lo = a % shape[d];
                    let hi = lo + 1 + b % (shape[d] - lo);
                    off.push(lo);
                    len.push(hi - lo);
                }
                Region::new(off, len)
            };
            let (src_box, dst_box) = (pick(0), pick(1));
            // Source bytes: each element's global flat index as u32.
            let src: Vec<u8> = elements(&src_box, &shape).iter().flat_map(|&v| (v as u32).to_le_bytes()).collect();
            let mut dst = vec![0xffu8; dst_box.numel() as usize * 4];
            if let Some(region) = src_box.intersect(&dst_box) {
                copy_region(&src, &src_box, &mut dst, &dst_box, &region, 4);
                let inside: std::collections::HashSet<u64> = elements(&region, &shape).into_iter().collect();
                for (i, g) in elements(&dst_box, &shape).into_iter().enumerate() {
                    let v = u32::from_le_bytes(dst[i * 4..i * 4 + 4].try_into().unwrap());
                    if inside.contains(&g) {
                        prop_assert_eq!(v as u64, g);
                    } else {
                        prop_assert_eq!(v, u32::MAX);
                    }
                }
            }
        }
    }
}
