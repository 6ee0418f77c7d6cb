//! Choosing the next token from logits: greedy at temperature 0, else softmax at a
//! temperature restricted to the smallest set of tokens whose probability reaches `top_p`
//! (nucleus sampling), drawn with a per-request seeded generator so a fixed seed gives the
//! same tokens every time. Pure: no global RNG, no clock.

/// How one request samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy; otherwise logits are divided by it.
    pub temperature: f64,
    /// Keep the most likely tokens up to this cumulative probability, in (0, 1].
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// SplitMix64: tiny, fast, and fixed forever here, so a seed means the same draws in every
/// gantry version that keeps this function.
#[derive(Clone, Debug)]
pub struct Draws(u64);

impl Draws {
    pub fn new(seed: u64) -> Draws {
        Draws(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The index of the largest logit (the lowest index among equal ones); NaNs never win.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The next token per `params`, consuming one draw unless greedy.
pub fn pick(logits: &[f32], params: &SamplingParams, draws: &mut Draws) -> u32 {
    if params.temperature == 0.0 || logits.len() <= 1 {
        return argmax(logits);
    }
    let top = logits[argmax(logits) as usize] as f64;
    // Probabilities up to a constant, sorted most likely first (ties by index, so the order
    // is a function of the logits alone).
    let mut order: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .map(|(i, &v)| (i as u32, ((v as f64 - top) / params.temperature).exp()))
        .collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = order.iter().map(|x| x.1).sum();
    let mut kept = 0.0;
    let mut cut = order.len();
    for (i, (_, w)) in order.iter().enumerate() {
        kept += w;
        if kept >= params.top_p * total {
            cut = i + 1;
            break;
        }
    }
    let order = &order[..cut];
    let mass: f64 = order.iter().map(|x| x.1).sum();
    let mut u = draws.unit() * mass;
    for &(token, w) in order {
        if u < w {
            return token;
        }
        u -= w;
    }
    order.last().map_or(0, |x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_the_argmax_with_the_lowest_index_on_ties() {
        let g = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let mut d = Draws::new(1);
        assert_eq!(pick(&[0.1, 3.0, -1.0, 3.0], &g, &mut d), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn a_seed_fixes_the_draws_and_frequencies_follow_the_softmax() {
        let logits = [0.0f32, (2.0f64).ln() as f32, (5.0f64).ln() as f32];
        let p = SamplingParams::default();
        let run = |seed| {
            let mut d = Draws::new(seed);
            (0..4000).map(|_| pick(&logits, &p, &mut d)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let counts = run(3).iter().fold([0u32; 3], |mut c, &t| {
            c[t as usize] += 1;
            c
        });
        // Expected 1:2:5 of 4000 = 500, 1000, 2500.
        for (got, want) in counts.iter().zip([500.0, 1000.0, 2500.0]) {
            assert!((*got as f64 - want).abs() < 0.1 * want, "{counts:?}");
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps the first two only.
        let logits = [0.5f64.ln() as f32, 0.3f64.ln() as f32, 0.2f64.ln() as f32];
        let p = SamplingParams {
            top_p: 0.6,
            ..SamplingParams::default()
        };
        let mut d = Draws::new(11);
        let picks: Vec<u32> = (0..2000).map(|_| pick(&logits, &p, &mut d)).collect();
        assert!(!picks.contains(&2));
        let ones = picks.iter().filter(|&&t| t == 1).count() as f64 / 2000.0;
        assert!((ones - 0.375).abs() < 0.05, "{ones}");
        let only_top = SamplingParams {
            top_p: 0.1,
            ..SamplingParams::default()
        };
        assert!((0..100).all(|_| pick(&logits, &only_top, &mut d) == 0));
    }

    #[test]
    fn params_are_validated() {
        let ok = SamplingParams::default();
        assert!(ok.validate().is_ok());
        for bad in [
            SamplingParams {
                temperature: -1.0,
                ..ok
            },
            SamplingParams {
                temperature: f64::NAN,
                ..ok
            },
            SamplingParams { top_p: 0.0, ..ok },
            SamplingParams { top_p: 1.5, ..ok },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
