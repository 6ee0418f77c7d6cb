//! AdamW over flat buckets (or their ZeRO-1 shards), the learning-rate schedule and global
//! gradient-norm clipping. The update is elementwise, so a parameter's new value does not
//! depend on which bucket or shard it sits in: every layout computes the same numbers.

use crate::spec::OptimSpec;
use tch::{Kind, Tensor};

/// Linear warm-up from 0 to `lr` over `warmup` steps, then cosine decay to `min_lr` at
/// `total` steps (and `min_lr` after). `step` counts from 0.
pub fn learning_rate(o: &OptimSpec, step: u64, total: u64) -> f64 {
    if o.warmup_steps > 0 && step < o.warmup_steps {
        return o.lr * (step + 1) as f64 / o.warmup_steps as f64;
    }
    if total <= o.warmup_steps || step >= total {
        return o.min_lr;
    }
    let progress = (step - o.warmup_steps) as f64 / (total - o.warmup_steps) as f64;
    o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The clip coefficient for a global gradient norm.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// AdamW state of one flat bucket (shard): fp32 master weights and the two moments.
pub struct AdamState {
    pub master: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub decay: bool,
}

impl AdamState {
    pub fn new(master: Tensor, decay: bool) -> AdamState {
        let master = master.to_kind(Kind::Float).detach();
        AdamState {
            exp_avg: master.zeros_like(),
            exp_avg_sq: master.zeros_like(),
            master,
            decay,
        }
    }

    /// One decoupled-weight-decay Adam step (`step` counts from 1).
    pub fn update(&mut self, grad: &Tensor, o: &OptimSpec, lr: f64, step: u64, grad_scale: f64) {
        tch::no_grad(|| {
            let g = if grad_scale == 1.0 {
                grad.shallow_clone()
            } else {
                grad * grad_scale
            };
            let _ = self.exp_avg.g_mul_scalar_(o.beta1);
            let _ = self.exp_avg.g_add_(&(&g * (1.0 - o.beta1)));
            let _ = self.exp_avg_sq.g_mul_scalar_(o.beta2);
            let _ = self.exp_avg_sq.g_add_(&(&g * &g * (1.0 - o.beta2)));
            if self.decay && o.weight_decay > 0.0 {
                let _ = self.master.g_mul_scalar_(1.0 - lr * o.weight_decay);
            }
            let bc1 = 1.0 - o.beta1.powi(step as i32);
            let bc2 = 1.0 - o.beta2.powi(step as i32);
            let denom = (&self.exp_avg_sq / bc2).sqrt() + o.eps;
            let _ = self.master.g_sub_(&(&self.exp_avg / &denom * (lr / bc1)));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let o = OptimSpec {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 4,
            ..OptimSpec::default()
        };
        assert_eq!(learning_rate(&o, 0, 100), 0.25);
        assert_eq!(learning_rate(&o, 3, 100), 1.0);
        assert!((learning_rate(&o, 4, 100) - 1.0).abs() < 1e-12);
        let mid = learning_rate(&o, 52, 100);
        assert!((mid - 0.55).abs() < 1e-12, "{mid}");
        assert!((learning_rate(&o, 100, 100) - 0.1).abs() < 1e-12);
        let mut prev = f64::INFINITY;
        for s in 4..100 {
            let lr = learning_rate(&o, s, 100);
            assert!(lr <= prev && lr >= 0.1);
            prev = lr;
        }
    }

    #[test]
    fn clipping_only_shrinks() {
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
        assert!((clip_coefficient(4.0, 1.0) - 0.25).abs() < 1e-6);
        assert_eq!(clip_coefficient(100.0, 0.0), 1.0);
    }

    #[test]
    fn adam_matches_the_closed_form_first_step() {
        // Step 1: m̂ = g, v̂ = g², update = lr · g / (|g| + eps) ≈ lr · sign(g).
        let o = OptimSpec {
            weight_decay: 0.0,
            ..OptimSpec::default()
        };
        let mut s = AdamState::new(Tensor::from_slice(&[1.0f32, -2.0, 3.0]), true);
        s.update(&Tensor::from_slice(&[0.5f32, -0.25, 0.0]), &o, 0.1, 1, 1.0);
        let got = Vec::<f32>::try_from(&s.master).unwrap();
        assert!(
            (got[0] - 0.9).abs() < 1e-6 && (got[1] + 1.9).abs() < 1e-6 && (got[2] - 3.0).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn adam_is_elementwise_so_shards_agree_with_the_whole() {
        let o = OptimSpec::default();
        let p = Tensor::randn([64], (Kind::Float, tch::Device::Cpu));
        let g = Tensor::randn([64], (Kind::Float, tch::Device::Cpu));
        let mut whole = AdamState::new(p.copy(), true);
        let mut halves = [
            AdamState::new(p.narrow(0, 0, 32).copy(), true),
            AdamState::new(p.narrow(0, 32, 32).copy(), true),
        ];
        for step in 1..=5 {
            whole.update(&g, &o, 0.01, step, 0.5);
            for (i, h) in halves.iter_mut().enumerate() {
                h.update(&g.narrow(0, 32 * i as i64, 32), &o, 0.01, step, 0.5);
            }
        }
        let joined = Tensor::cat(&[&halves[0].master, &halves[1].master], 0);
        assert!(joined.equal(&whole.master));
    }
}
