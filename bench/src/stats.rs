//! The statistics every benchmark reports, in one place: medians, quantiles, rates and the
//! ratio of a component to its raw peer. Pure functions over samples; empty input gives NaN.

/// The median: the middle sample, or the mean of the two middle ones for an even count.
pub fn median(samples: &[f64]) -> f64 {
    let v = sorted(samples);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The nearest-rank `q` quantile (0..=1): the smallest sample with at least a fraction `q` of
/// the samples at or below it. Latency p50/p99 of the registry's generation requests.
pub fn quantile_nearest_rank(samples: &[f64], q: f64) -> f64 {
    let v = sorted(samples);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// The sample at position `round(q × (n − 1))` of the sorted samples: `q = 0.5` is the
/// middle sample, the upper one of the two middle ones for an even count (what nccl-tests
/// style timing tables report). Heartbeat latencies, collective and start-up times.
pub fn quantile_rounded(samples: &[f64], q: f64) -> f64 {
    let v = sorted(samples);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// GB/s (10^9 bytes per second) of `bytes` moved in `seconds` (a zero time counts as 1 ns).
pub fn gbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds.max(1e-9) / 1e9
}

/// How much faster `times` ran than `baseline_times`, repetition by repetition: the median
/// over i of `baseline_times[i] / times[i]`. Repetition i of both ran back to back, so this
/// cancels the machine's slow and fast phases better than a ratio of medians. `None` when the
/// two do not have the same number of samples.
pub fn paired_ratio(times: &[f64], baseline_times: &[f64]) -> Option<f64> {
    if times.len() != baseline_times.len() {
        return None;
    }
    let ratios: Vec<f64> = times
        .iter()
        .zip(baseline_times)
        .map(|(t, base)| base / t.max(1e-9))
        .collect();
    Some(median(&ratios))
}

fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_averages_the_middle_pair() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn nearest_rank_takes_the_lower_middle() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile_nearest_rank(&v, 0.5), 2.0);
        assert_eq!(quantile_nearest_rank(&v, 0.99), 4.0);
        assert_eq!(quantile_nearest_rank(&v, 0.0), 1.0);
        assert!(quantile_nearest_rank(&[], 0.5).is_nan());
    }

    #[test]
    fn rounded_takes_the_upper_middle() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile_rounded(&v, 0.5), 3.0);
        assert_eq!(quantile_rounded(&[5.0, 1.0, 4.0, 2.0, 3.0], 0.5), 3.0);
        assert_eq!(quantile_rounded(&v, 1.0), 4.0);
        assert!(quantile_rounded(&[], 0.5).is_nan());
        // Upper median: what `sorted[len / 2]` gave for every length.
        for n in 1..20 {
            let v: Vec<f64> = (0..n).map(f64::from).collect();
            assert_eq!(quantile_rounded(&v, 0.5), v[v.len() / 2]);
        }
    }

    #[test]
    fn rates_and_paired_ratios() {
        assert_eq!(gbps(2_000_000_000, 2.0), 1.0);
        assert!((gbps(1, 0.0) - 1.0).abs() < 1e-9, "a zero time counts as 1 ns");
        assert_eq!(paired_ratio(&[1.0, 2.0, 4.0], &[2.0, 2.0, 2.0]), Some(1.0));
        assert_eq!(paired_ratio(&[1.0], &[1.0, 2.0]), None);
    }
}
