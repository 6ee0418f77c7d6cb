//! Weighted choice between an alias's versions, deterministic in a caller-supplied draw (a
//! request seed or counter): there is no random number generator here. Over the draws
//! `0..total` each target is chosen exactly `weight` times, spread through the window rather
//! than in one block, so a counter gives exact, interleaved shares and a hash of a request
//! key ([`sticky_draw`]) gives sticky ones.
//!
//! The same spread decides which requests an alias's shadow mirrors ([`mirrors`]): exactly
//! `percent` of every 100 consecutive draws.

/// Why an alias's `(version, weight)` targets, or its shadow, are unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WeightError {
    #[error("an alias needs at least one target version")]
    Empty,
    #[error("version {version} has weight 0; every target needs a weight > 0 (remove it instead)")]
    ZeroWeight { version: u32 },
    #[error("version {version} is listed more than once")]
    Duplicate { version: u32 },
    #[error("the weights add up to more than {}", u32::MAX)]
    Overflow,
    #[error("a shadow mirrors 1 to 100 percent of the requests, got {percent}")]
    ShadowPercent { percent: u32 },
    #[error("the shadow version {version} is the alias's only version; it would be compared with itself")]
    ShadowIsPrimary { version: u32 },
}

/// Check targets and return the total weight.
pub fn validate(targets: &[(u32, u32)]) -> Result<u32, WeightError> {
    if targets.is_empty() {
        return Err(WeightError::Empty);
    }
    let mut total: u32 = 0;
    for (i, &(version, weight)) in targets.iter().enumerate() {
        if weight == 0 {
            return Err(WeightError::ZeroWeight { version });
        }
        if targets[..i].iter().any(|&(v, _)| v == version) {
            return Err(WeightError::Duplicate { version });
        }
        total = total.checked_add(weight).ok_or(WeightError::Overflow)?;
    }
    Ok(total)
}

/// Check a shadow (`version` mirroring `percent` of the requests) against the alias's targets
/// (already valid).
pub fn validate_shadow(targets: &[(u32, u32)], version: u32, percent: u32) -> Result<(), WeightError> {
    if percent == 0 || percent > 100 {
        return Err(WeightError::ShadowPercent { percent });
    }
    if let [(only, _)] = targets
        && *only == version
    {
        return Err(WeightError::ShadowIsPrimary { version });
    }
    Ok(())
}

/// The draw of a request that carries a route key (an OpenAI `user`, an `X-Gantry-Route-Key`
/// header): xxh3 of the key's bytes, the same on every server and across restarts. Given to
/// [`pick`], one key gets one version for as long as the alias's targets and weights stay as
/// they are; keys spread over the targets by their weights. Changing the targets or weights
/// deals the keys out afresh (a key may then land on any version, including one it left).
pub fn sticky_draw(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// Whether draw `draw` is one a shadow mirroring `percent` of the requests takes: exactly
/// `percent` of every 100 consecutive draws, spread through them as [`pick`] spreads a
/// canary's share (`percent` outside 1..=100 mirrors nothing or everything).
pub fn mirrors(percent: u32, draw: u64) -> bool {
    match percent {
        0 => false,
        p if p >= 100 => true,
        p => pick(&[(1, p), (0, 100 - p)], draw) == Ok(1),
    }
}

/// A stride coprime with `total` near `total / φ`: stepping through `0..total` by it visits
/// every position once per `total` steps, with consecutive steps far apart.
fn stride(total: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let near = (total as f64 * 0.618_033_988_749_895).round() as u64;
    (0..total)
        .flat_map(|d| [near.saturating_sub(d), near + d])
        .find(|&k| k > 0 && gcd(k, total) == 1)
        .unwrap_or(1)
}

/// The version that `draw` selects: the draw's position in its window of `total` draws is
/// spread by a coprime stride (so a 10% canary gets every ~10th draw, not ten in a row at the
/// end of each hundred) and walked through the cumulative weights.
pub fn pick(targets: &[(u32, u32)], draw: u64) -> Result<u32, WeightError> {
    let total = validate(targets)?;
    let n = u64::from(total);
    let mut left = ((draw % n) * stride(n) % n) as u32;
    for &(version, weight) in targets {
        if left < weight {
            return Ok(version);
        }
        left -= weight;
    }
    // validate() guarantees the walk ends inside the targets; keep a total function anyway.
    Ok(targets[targets.len() - 1].0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn counts(targets: &[(u32, u32)], draws: std::ops::Range<u64>) -> HashMap<u32, u64> {
        let mut out = HashMap::new();
        for d in draws {
            *out.entry(pick(targets, d).unwrap()).or_default() += 1;
        }
        out
    }

    #[test]
    fn ninety_ten_over_a_hundred_draws_is_exact() {
        let c = counts(&[(3, 90), (4, 10)], 0..100);
        assert_eq!(c[&3], 90);
        assert_eq!(c[&4], 10);
        // And again on the next window.
        assert_eq!(counts(&[(3, 90), (4, 10)], 100..200), c);
    }

    #[test]
    fn a_small_share_is_spread_through_the_window() {
        // Picked at most twice the ideal gap apart, never in one block per window.
        for (w, t) in [(10u32, 100u32), (5, 100), (30, 100), (1, 20), (3, 7)] {
            let targets = [(1, t - w), (2, w)];
            let hits: Vec<u64> = (0..3 * u64::from(t)).filter(|&d| pick(&targets, d) == Ok(2)).collect();
            assert_eq!(hits.len() as u32, 3 * w);
            let widest = hits.windows(2).map(|p| p[1] - p[0]).max().unwrap_or(0);
            assert!(widest <= 2 * u64::from(t / w) + 3, "{w}/{t}: gap {widest}");
        }
        let halves: Vec<u32> = (0..6).map(|d| pick(&[(1, 1), (2, 1)], d).unwrap()).collect();
        assert_eq!(halves, [1, 2, 1, 2, 1, 2]);
        for total in 1..200u64 {
            let k = stride(total);
            let mut seen: Vec<u64> = (0..total).map(|d| d * k % total).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..total).collect::<Vec<_>>(), "stride {k} of {total}");
        }
    }

    #[test]
    fn a_plain_alias_always_picks_its_version() {
        for d in [0, 1, 7, u64::MAX] {
            assert_eq!(pick(&[(5, 1)], d), Ok(5));
        }
    }

    #[test]
    fn bad_weights_are_named() {
        assert_eq!(validate(&[]), Err(WeightError::Empty));
        assert_eq!(validate(&[(1, 3), (2, 0)]), Err(WeightError::ZeroWeight { version: 2 }));
        assert_eq!(validate(&[(1, 3), (1, 2)]), Err(WeightError::Duplicate { version: 1 }));
        assert_eq!(validate(&[(1, u32::MAX), (2, 1)]), Err(WeightError::Overflow));
        assert_eq!(validate(&[(1, u32::MAX)]), Ok(u32::MAX));
        assert_eq!(pick(&[], 0), Err(WeightError::Empty));
    }

    #[test]
    fn a_key_keeps_its_version_and_keys_spread_by_the_weights() {
        let targets = [(3, 70), (4, 20), (5, 10)];
        for key in ["alice", "bob", "", "a much longer key with spaces \u{1F600}"] {
            let first = pick(&targets, sticky_draw(key.as_bytes())).unwrap();
            for _ in 0..5 {
                assert_eq!(pick(&targets, sticky_draw(key.as_bytes())), Ok(first), "{key:?}");
            }
        }
        // Many keys: each version's share is within five standard deviations of its weight
        // (a binomial count; the bound comes from the weights, not from any one run).
        let n = 20_000u64;
        let mut c: HashMap<u32, u64> = HashMap::new();
        for i in 0..n {
            *c.entry(pick(&targets, sticky_draw(format!("user-{i}").as_bytes())).unwrap())
                .or_default() += 1;
        }
        for &(v, w) in &targets {
            let p = f64::from(w) / 100.0;
            let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
            let got = c.get(&v).copied().unwrap_or(0) as f64;
            assert!(
                (got - mean).abs() <= 5.0 * sd,
                "version {v}: {got} of {n}, expected {mean} ± {}",
                5.0 * sd
            );
        }
        // The hash is fixed (xxh3-64 of the bytes, seed 0): a key maps the same on every server
        // and after an upgrade, so these values must never change.
        assert_eq!(sticky_draw(b"alice"), 5_593_767_425_381_308_080);
        assert_eq!(sticky_draw(b"user-1"), 8_968_379_626_967_066_057);
        assert_ne!(sticky_draw(b"alice"), sticky_draw(b"alicf"));
    }

    #[test]
    fn a_shadow_mirrors_exactly_its_percent_spread_through_each_hundred() {
        for p in [1u32, 7, 10, 50, 99, 100] {
            for window in [0u64, 100, 12_300] {
                let hits: Vec<u64> = (window..window + 100).filter(|&d| mirrors(p, d)).collect();
                assert_eq!(hits.len() as u32, p, "{p}% in draws {window}..+100");
            }
        }
        let tenth: Vec<u64> = (0..100).filter(|&d| mirrors(10, d)).collect();
        let widest = tenth.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(widest <= 23, "10% spread through the window: {tenth:?}");
        assert!(!(0..1000).any(|d| mirrors(0, d)));
    }

    #[test]
    fn shadows_are_checked() {
        assert_eq!(validate_shadow(&[(1, 1)], 2, 10), Ok(()));
        assert_eq!(validate_shadow(&[(1, 1)], 2, 100), Ok(()));
        assert_eq!(
            validate_shadow(&[(1, 1)], 2, 0),
            Err(WeightError::ShadowPercent { percent: 0 })
        );
        assert_eq!(
            validate_shadow(&[(1, 1)], 2, 101),
            Err(WeightError::ShadowPercent { percent: 101 })
        );
        assert_eq!(
            validate_shadow(&[(1, 1)], 1, 5),
            Err(WeightError::ShadowIsPrimary { version: 1 })
        );
        // Mirroring a split's canary is allowed: requests drawn to it are simply not mirrored.
        assert_eq!(validate_shadow(&[(1, 9), (2, 1)], 2, 5), Ok(()));
    }

    proptest! {
        #[test]
        fn each_target_gets_exactly_its_weight(weights in proptest::collection::vec(1u32..50, 1..6), start in 0u64..1_000_000) {
            let targets: Vec<(u32, u32)> = weights.iter().enumerate().map(|(i, &w)| (i as u32 + 1, w)).collect();
            let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            let c = counts(&targets, start..start + total);
            for &(v, w) in &targets {
                prop_assert_eq!(c.get(&v).copied().unwrap_or(0), u64::from(w));
            }
        }
    }
}
