//! Log-probabilities of tokens, as the OpenAI API reports them (`logprobs`, `top_logprobs`,
//! and `echo` for a prompt's own tokens): from the model's raw next-token logits, before
//! temperature or nucleus sampling change the distribution (what vLLM reports too), so a
//! token's log-probability is the model's, whatever sampling chose it.

/// One position: the log-probability of the token that is there, and the `k` most likely
/// tokens at that position (most likely first; ties broken by the smaller id).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The most alternatives a request may ask for per position (OpenAI allows 5 on completions
/// and 20 on chat; vLLM 20).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// `log_softmax(logits)[token]` and the `top` most likely tokens, computed in f64 from f32
/// logits. `None` when `token` is outside `logits` or a logit is not finite.
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> Option<TokenLogprobs> {
    let chosen = *logits.get(token as usize)?;
    if logits.iter().any(|l| l.is_nan() || *l == f32::INFINITY) {
        return None;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    let lp = |l: f32| (l as f64 - log_z) as f32;
    Some(TokenLogprobs {
        logprob: lp(chosen),
        top: top_k(logits, top)
            .into_iter()
            .map(|i| (i, lp(logits[i as usize])))
            .collect(),
    })
}

/// Ids of the `k` largest logits, largest first, the smaller id first among equals.
fn top_k(logits: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.select_nth_unstable_by(k - 1, order);
    ids.truncate(k);
    ids.sort_unstable_by(order);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uniform_and_peaked_distributions() {
        let got = token_logprobs(&[0.0; 4], 2, 2).unwrap();
        assert!((got.logprob - (0.25f32).ln()).abs() < 1e-7);
        assert_eq!(
            got.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            [0, 1],
            "ties: smaller id first"
        );
        let got = token_logprobs(&[1.0, 3.0, 2.0], 0, 3).unwrap();
        let z = (1f64.exp() + 3f64.exp() + 2f64.exp()).ln();
        assert!((got.logprob as f64 - (1.0 - z)).abs() < 1e-6);
        assert_eq!(got.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(got.top[0].1, token_logprobs(&[1.0, 3.0, 2.0], 1, 0).unwrap().logprob);
    }

    #[test]
    fn bad_input_is_none_not_a_panic() {
        assert_eq!(token_logprobs(&[0.0; 4], 4, 1), None);
        assert_eq!(token_logprobs(&[0.0, f32::NAN], 0, 1), None);
        assert_eq!(token_logprobs(&[], 0, 0), None);
        // A masked-out token (-inf) has probability zero, not an error.
        let got = token_logprobs(&[0.0, f32::NEG_INFINITY], 1, 5).unwrap();
        assert_eq!(got.logprob, f32::NEG_INFINITY);
        assert_eq!(got.top.len(), 2);
    }

    proptest! {
        #[test]
        fn probabilities_sum_to_one_and_top_is_sorted(
            logits in proptest::collection::vec(-30f32..30.0, 1..200),
            k in 0usize..25,
        ) {
            let n = logits.len();
            let all = token_logprobs(&logits, 0, n).unwrap();
            let total: f64 = all.top.iter().map(|t| (t.1 as f64).exp()).sum();
            prop_assert!((total - 1.0).abs() < 1e-4, "{total}");
            let some = token_logprobs(&logits, (n - 1) as u32, k).unwrap();
            prop_assert_eq!(some.top.len(), k.min(n));
            prop_assert_eq!(&some.top[..], &all.top[..k.min(n)]);
            prop_assert!(some.top.windows(2).all(|w| w[0].1 >= w[1].1));
        }
    }
}
