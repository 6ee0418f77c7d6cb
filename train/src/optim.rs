//! AdamW over flat buckets (or their ZeRO-1 shards), the learning-rate schedule and global
//! gradient-norm clipping. The update is elementwise, so a parameter's new value does not
//! depend on which bucket or shard it sits in: every layout computes the same numbers.
//!
//! The update runs ATen's fused AdamW kernel ([`crate::fused`]) on every device; the
//! hand-written elementwise update is kept as a reference (`GANTRY_ADAMW=manual`, read by the
//! binary into [`crate::run_context::RunContext::adamw`]; see [`AdamImpl`]).
//!
//! Everything the step after backward computes stays on the device: the norm
//! ([`total_sum_of_squares`]), the clip coefficient ([`clip_coefficient_tensor`]), the scaling
//! and the update of all buckets at once ([`update_all`]); the trainer reads the norm with the
//! loss once, after the update is queued.

use crate::fused::{self, AdamWHyper, FusedAdamError, FusedAdamItem};
use crate::spec::OptimSpec;
use tch::{Device, Kind, TchError, Tensor};

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

/// [`clip_coefficient`] of a 0-dimensional f64 norm on the device, computed there (so
/// clipping needs no host synchronization), as a 0-dimensional f64 tensor: the same formula
/// and the same f64 operations, so the same value.
pub fn clip_coefficient_tensor(norm: &Tensor, max_norm: f64) -> Tensor {
    if max_norm <= 0.0 {
        return norm.ones_like();
    }
    let shrink = norm.full_like(max_norm) / (norm + 1e-6);
    shrink.where_scalarother(&norm.gt(max_norm), 1.0)
}

/// How [`total_sum_of_squares`] measures the gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormMethod {
    /// One `_foreach_norm` over all tensors (on CUDA a multi-tensor kernel whose tree
    /// reduction is accurate), the norms squared and summed in f64.
    Foreach,
    /// [`sum_of_squares`] per tensor: accurate on the CPU, whose norm kernel is not.
    RowWise,
}

/// The norm method for gradients on `device`: the multi-tensor kernel on CUDA, the row-wise
/// f64 sums elsewhere.
pub fn norm_method(device: Device) -> NormMethod {
    if device.is_cuda() {
        NormMethod::Foreach
    } else {
        NormMethod::RowWise
    }
}

/// The sum of the squares of every element of `grads` (f32 tensors on `device`), as a
/// 0-dimensional f64 tensor there, without a host synchronization.
pub fn total_sum_of_squares(grads: &[&Tensor], method: NormMethod, device: Device) -> Result<Tensor, TchError> {
    if grads.is_empty() {
        return Ok(Tensor::zeros([], (Kind::Double, device)));
    }
    let parts = match method {
        NormMethod::Foreach => {
            let norms = fused::foreach_norm(grads)?;
            Tensor::f_stack(&norms, 0)?.f_to_kind(Kind::Double)?.f_square()?
        }
        NormMethod::RowWise => {
            let sums: Vec<Tensor> = grads.iter().map(|g| sum_of_squares(g)).collect();
            Tensor::f_stack(&sums, 0)?
        }
    };
    parts.f_sum(Kind::Double)
}

/// Row length for [`sum_of_squares`].
const NORM_ROW: i64 = 1024;

/// The sum of squares of a flat f32 tensor, as a 0-dimensional f64 tensor on its device, in
/// one pass over the data and without a host synchronization.
///
/// A single f32 norm over millions of elements is not accurate enough: libtorch's CPU kernel
/// accumulates each SIMD lane serially, and over a 38M-element embedding bucket it was off by
/// 5·10⁻⁴ relative — enough for layouts with different buckets to clip differently. Norms of
/// 1,024-element rows are accurate to f32 rounding; their squares are summed in f64.
pub fn sum_of_squares(flat: &Tensor) -> Tensor {
    let n = flat.numel() as i64;
    let rows = n / NORM_ROW;
    let whole = rows * NORM_ROW;
    let mut parts = Vec::with_capacity(2);
    if rows > 0 {
        let row_norms = flat
            .narrow(0, 0, whole)
            .view([rows, NORM_ROW])
            .norm_scalaropt_dim(2, [1], false);
        parts.push(row_norms.to_kind(Kind::Double).square().sum(Kind::Double));
    }
    if n > whole {
        parts.push(flat.narrow(0, whole, n - whole).norm().to_kind(Kind::Double).square());
    }
    match parts.len() {
        0 => Tensor::zeros([], (Kind::Double, flat.device())),
        1 => parts.pop().expect("one part"),
        _ => &parts[0] + &parts[1],
    }
}

/// Which AdamW implementation [`AdamState::update`] runs.
///
/// By default the fused ATen kernel ([`crate::fused`], `at::_fused_adamw_`): on CUDA one
/// multi-tensor launch, on the CPU one vectorized, threaded pass, instead of about a dozen
/// elementwise operations that each allocate a bucket-sized temporary. On the 2-core
/// development VM it updated 53M parameters in 36 ms against the elementwise update's 1.1 s.
/// `GANTRY_ADAMW=manual` selects the elementwise update (a reference; the layout test passes
/// with either). Both compute the same update up to f32 rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdamImpl {
    #[default]
    Fused,
    Manual,
}

impl AdamImpl {
    /// Parse a `GANTRY_ADAMW` value; `None` or an empty value means the default.
    pub fn parse(value: Option<&str>) -> Result<Option<AdamImpl>, String> {
        match value.map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("fused") => Ok(Some(AdamImpl::Fused)),
            Some(v) if v.eq_ignore_ascii_case("manual") => Ok(Some(AdamImpl::Manual)),
            Some(v) => Err(format!("GANTRY_ADAMW=`{v}`: expected `fused` or `manual`")),
        }
    }

    /// `forced`, or the default (fused).
    pub fn choose(forced: Option<AdamImpl>) -> AdamImpl {
        forced.unwrap_or_default()
    }
}

/// AdamW state of one flat bucket (shard): fp32 master weights and the two moments.
pub struct AdamState {
    pub master: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub decay: bool,
    /// The fused kernel's step counter: one f32 on the master's device. The kernel reads it
    /// for bias correction and does not advance it; each fused update sets it to `step`
    /// ([`update_all`] sets the first fused state's and hands it to all of them).
    pub step: Tensor,
    pub imp: AdamImpl,
}

impl AdamState {
    /// State for `master` with the default implementation (fused). An f32 `master` is
    /// updated in place (data parallelism passes views of the parameters' flat buffers);
    /// another kind is copied to f32 first.
    pub fn new(master: Tensor, decay: bool) -> AdamState {
        AdamState::with_impl(master, decay, AdamImpl::default())
    }

    /// State that always runs `imp` (`master` as in [`AdamState::new`]).
    pub fn with_impl(master: Tensor, decay: bool, imp: AdamImpl) -> AdamState {
        let master = master.to_kind(Kind::Float).detach();
        AdamState {
            exp_avg: master.zeros_like(),
            exp_avg_sq: master.zeros_like(),
            step: Tensor::zeros([1], (Kind::Float, master.device())),
            master,
            decay,
            imp,
        }
    }

    /// One decoupled-weight-decay Adam step (`step` counts from 1) with `grad` as given
    /// (clipping has already scaled it: the trainer scales its gradient buffers in place);
    /// weight decay applies only if `self.decay`.
    ///
    /// # Panics
    /// If the fused kernel fails (see [`AdamState::try_update`]); the manual path panics on
    /// libtorch errors like any tch operation.
    pub fn update(&mut self, grad: &Tensor, o: &OptimSpec, lr: f64, step: u64) {
        if let Err(e) = self.try_update(grad, o, lr, step) {
            panic!("AdamW update: {e}");
        }
    }

    /// [`AdamState::update`], returning the fused kernel's failure instead of panicking.
    pub fn try_update(&mut self, grad: &Tensor, o: &OptimSpec, lr: f64, step: u64) -> Result<(), FusedAdamError> {
        match self.imp {
            AdamImpl::Fused => self.update_fused(grad, o, lr, step),
            AdamImpl::Manual => {
                self.update_manual(grad, o, lr, step);
                Ok(())
            }
        }
    }

    fn update_fused(&mut self, grad: &Tensor, o: &OptimSpec, lr: f64, step: u64) -> Result<(), FusedAdamError> {
        tch::no_grad(|| {
            let g = kernel_grad(grad, &self.master);
            let _ = self.step.fill_(step as f64);
            let hyper = self.hyper(o, lr);
            let mut items = [FusedAdamItem {
                param: &mut self.master,
                grad: &g,
                exp_avg: &mut self.exp_avg,
                exp_avg_sq: &mut self.exp_avg_sq,
                step: &self.step,
            }];
            fused::adamw_step(&mut items, &hyper)
        })
    }

    fn hyper(&self, o: &OptimSpec, lr: f64) -> AdamWHyper {
        AdamWHyper {
            lr,
            beta1: o.beta1,
            beta2: o.beta2,
            weight_decay: if self.decay { o.weight_decay } else { 0.0 },
            eps: o.eps,
        }
    }

    fn update_manual(&mut self, grad: &Tensor, o: &OptimSpec, lr: f64, step: u64) {
        tch::no_grad(|| {
            let _ = self.exp_avg.g_mul_scalar_(o.beta1);
            let _ = self.exp_avg.g_add_(&(grad * (1.0 - o.beta1)));
            let _ = self.exp_avg_sq.g_mul_scalar_(o.beta2);
            let _ = self.exp_avg_sq.g_add_(&(grad * grad * (1.0 - o.beta2)));
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

/// `grad` in the kernel's form for `master`: its kind, contiguous (the kernel's own
/// `grad_scale` is AMP's unscaling, not clipping, and is not used).
fn kernel_grad(grad: &Tensor, master: &Tensor) -> Tensor {
    let g = if grad.kind() == master.kind() {
        grad.shallow_clone()
    } else {
        grad.to_kind(master.kind())
    };
    g.contiguous()
}

/// One AdamW step of every state, `grads[i]` being `states[i]`'s gradient (as in
/// [`AdamState::update`]). The fused states run as one kernel call per weight-decay group
/// (on CUDA one multi-tensor launch each, whatever the number of buckets) sharing one step
/// counter, filled once; manual states run their elementwise update. The update is
/// elementwise, so the result is the same, bit for bit, as one call per state.
pub fn update_all(
    states: &mut [AdamState],
    grads: &[&Tensor],
    o: &OptimSpec,
    lr: f64,
    step: u64,
) -> Result<(), FusedAdamError> {
    if states.len() != grads.len() {
        return Err(FusedAdamError::Invalid {
            index: states.len().min(grads.len()),
            what: format!("{} AdamW states but {} gradients", states.len(), grads.len()),
        });
    }
    tch::no_grad(|| {
        let mut fused_states = Vec::new();
        for (s, g) in states.iter_mut().zip(grads) {
            match s.imp {
                AdamImpl::Fused => {
                    let g = kernel_grad(g, &s.master);
                    fused_states.push((s, g));
                }
                AdamImpl::Manual => s.update_manual(g, o, lr, step),
            }
        }
        let Some((first, _)) = fused_states.first_mut() else {
            return Ok(());
        };
        let _ = first.step.fill_(step as f64);
        let shared_step = first.step.shallow_clone();
        for decay in [false, true] {
            let group: Vec<_> = fused_states.iter_mut().filter(|(s, _)| s.decay == decay).collect();
            let Some(hyper) = group.first().map(|(s, _)| s.hyper(o, lr)) else {
                continue;
            };
            let mut items: Vec<FusedAdamItem<'_>> = group
                .into_iter()
                .map(|(s, g)| FusedAdamItem {
                    param: &mut s.master,
                    grad: g,
                    exp_avg: &mut s.exp_avg,
                    exp_avg_sq: &mut s.exp_avg_sq,
                    step: &shared_step,
                })
                .collect();
            fused::adamw_step(&mut items, &hyper)?;
        }
        Ok(())
    })
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
    fn sum_of_squares_is_accurate_for_long_tensors() {
        // 3M + 777 elements: whole rows and a tail; values of mixed scale.
        let n = 3_000_777;
        let g = Tensor::randn([n], (Kind::Float, tch::Device::Cpu)) * 1e-3 + 2e-3;
        let exact = g.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]);
        let got = sum_of_squares(&g).double_value(&[]);
        assert!(((got - exact) / exact).abs() < 1e-6, "{got} vs {exact}");
        for len in [0, 1, 1023, 1024, 1025] {
            let t = Tensor::ones([len], (Kind::Float, tch::Device::Cpu)) * 0.5;
            // A row's norm is rounded to f32 before it is squared.
            let got = sum_of_squares(&t).double_value(&[]);
            assert!((got - len as f64 * 0.25).abs() <= 1e-7 * len as f64, "{len}: {got}");
        }
    }

    #[test]
    fn clipping_only_shrinks() {
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
        assert!((clip_coefficient(4.0, 1.0) - 0.25).abs() < 1e-6);
        assert_eq!(clip_coefficient(100.0, 0.0), 1.0);
    }

    #[test]
    fn the_device_clip_coefficient_is_the_host_one() {
        for max_norm in [0.0, -1.0, 1.0, 0.25] {
            for norm in [
                0.0,
                0.1,
                0.25,
                0.2500001,
                1.0,
                1.0 + 1e-12,
                4.0,
                1e6,
                f64::NAN,
                f64::INFINITY,
            ] {
                let t = Tensor::from(norm);
                let got = clip_coefficient_tensor(&t, max_norm);
                assert_eq!((got.dim(), got.kind()), (0, Kind::Double));
                let (got, want) = (got.double_value(&[]), clip_coefficient(norm, max_norm));
                assert!(
                    got == want || (got.is_nan() && want.is_nan()),
                    "{norm} {max_norm}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn both_norm_methods_agree_on_the_cpu() {
        assert_eq!(norm_method(tch::Device::Cpu), NormMethod::RowWise);
        assert_eq!(norm_method(tch::Device::Cuda(0)), NormMethod::Foreach);
        tch::manual_seed(13);
        let cpu = tch::Device::Cpu;
        // Small enough for the CPU's `_foreach_norm` to be exact to f32 rounding.
        let grads: Vec<Tensor> = [3i64, 1024, 1500, 5000]
            .iter()
            .map(|&n| Tensor::randn([n], (Kind::Float, cpu)) * 1e-2)
            .collect();
        let refs: Vec<&Tensor> = grads.iter().collect();
        let exact: f64 = grads
            .iter()
            .map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]))
            .sum();
        for method in [NormMethod::Foreach, NormMethod::RowWise] {
            let t = total_sum_of_squares(&refs, method, cpu).unwrap();
            assert_eq!((t.dim(), t.kind()), (0, Kind::Double));
            let got = t.double_value(&[]);
            assert!(((got - exact) / exact).abs() < 1e-6, "{method:?}: {got} vs {exact}");
        }
        for method in [NormMethod::Foreach, NormMethod::RowWise] {
            let none = total_sum_of_squares(&[], method, cpu).unwrap();
            assert_eq!(none.double_value(&[]), 0.0);
        }
    }

    #[test]
    fn update_all_is_bit_identical_to_one_update_per_state() {
        tch::manual_seed(17);
        let o = OptimSpec {
            weight_decay: 0.1,
            ..OptimSpec::default()
        };
        let cpu = tch::Device::Cpu;
        // Buckets of uneven sizes, both decay groups interleaved, as data parallelism makes them.
        let layout = [(640i64, true), (129, false), (4096, true), (77, false), (1000, true)];
        for imp in [AdamImpl::Fused, AdamImpl::Manual] {
            let start: Vec<Tensor> = layout
                .iter()
                .map(|&(n, _)| Tensor::randn([n], (Kind::Float, cpu)))
                .collect();
            let make = || -> Vec<AdamState> {
                (start.iter().zip(layout))
                    .map(|(p, (_, decay))| AdamState::with_impl(p.copy(), decay, imp))
                    .collect()
            };
            let (mut each, mut all) = (make(), make());
            for step in 1..=4u64 {
                let grads: Vec<Tensor> = layout
                    .iter()
                    .map(|&(n, _)| Tensor::randn([n], (Kind::Float, cpu)) * 0.1)
                    .collect();
                let refs: Vec<&Tensor> = grads.iter().collect();
                let lr = 0.01 / step as f64;
                for (s, g) in each.iter_mut().zip(&grads) {
                    s.try_update(g, &o, lr, step).unwrap();
                }
                update_all(&mut all, &refs, &o, lr, step).unwrap();
            }
            for (i, (a, b)) in all.iter().zip(&each).enumerate() {
                assert!(!a.master.equal(&start[i]), "{imp:?} state {i} did not move");
                for (name, x, y) in [
                    ("master", &a.master, &b.master),
                    ("exp_avg", &a.exp_avg, &b.exp_avg),
                    ("exp_avg_sq", &a.exp_avg_sq, &b.exp_avg_sq),
                ] {
                    assert!(x.equal(y), "{imp:?} state {i} {name}: relative {:e}", rel_diff(x, y));
                }
            }
        }
        let mut one = vec![AdamState::new(Tensor::zeros([4], (Kind::Float, cpu)), true)];
        assert!(update_all(&mut one, &[], &o, 0.1, 1).is_err());
    }

    #[test]
    fn adam_matches_the_closed_form_first_step() {
        // Step 1: m̂ = g, v̂ = g², update = lr · g / (|g| + eps) ≈ lr · sign(g).
        let o = OptimSpec {
            weight_decay: 0.0,
            ..OptimSpec::default()
        };
        let mut s = AdamState::new(Tensor::from_slice(&[1.0f32, -2.0, 3.0]), true);
        s.update(&Tensor::from_slice(&[0.5f32, -0.25, 0.0]), &o, 0.1, 1);
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
        let g = Tensor::randn([64], (Kind::Float, tch::Device::Cpu)) * 0.5;
        let mut whole = AdamState::new(p.copy(), true);
        let mut halves = [
            AdamState::new(p.narrow(0, 0, 32).copy(), true),
            AdamState::new(p.narrow(0, 32, 32).copy(), true),
        ];
        for step in 1..=5 {
            whole.update(&g, &o, 0.01, step);
            for (i, h) in halves.iter_mut().enumerate() {
                h.update(&g.narrow(0, 32 * i as i64, 32), &o, 0.01, step);
            }
        }
        let joined = Tensor::cat(&[&halves[0].master, &halves[1].master], 0);
        assert!(joined.equal(&whole.master));
    }

    fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let diff = (a - b).abs().max().double_value(&[]);
        let scale = b.abs().max().double_value(&[]);
        if scale == 0.0 { diff } else { diff / scale }
    }

    #[test]
    fn fused_and_manual_agree_over_ten_steps() {
        tch::manual_seed(7);
        let o = OptimSpec {
            weight_decay: 0.1,
            ..OptimSpec::default()
        };
        let n = 1003; // not a multiple of any vector width: the kernels' tails run too
        for decay in [false, true] {
            for grad_scale in [1.0, 0.37] {
                let p = Tensor::randn([n], (Kind::Float, tch::Device::Cpu));
                let mut fused = AdamState::with_impl(p.copy(), decay, AdamImpl::Fused);
                let mut manual = AdamState::with_impl(p.copy(), decay, AdamImpl::Manual);
                for step in 1..=10u64 {
                    let g = Tensor::randn([n], (Kind::Float, tch::Device::Cpu)) * (0.1 * grad_scale);
                    let lr = learning_rate(&o, step - 1, 10) * 10.0;
                    fused.try_update(&g, &o, lr, step).unwrap();
                    manual.update(&g, &o, lr, step);
                }
                assert!(!fused.master.allclose(&p, 1e-3, 1e-3, false), "the weights moved");
                for (name, f, m) in [
                    ("master", &fused.master, &manual.master),
                    ("exp_avg", &fused.exp_avg, &manual.exp_avg),
                    ("exp_avg_sq", &fused.exp_avg_sq, &manual.exp_avg_sq),
                ] {
                    let r = rel_diff(f, m);
                    assert!(r < 1e-6, "{name} decay={decay} grad_scale={grad_scale}: relative {r:e}");
                }
            }
        }
    }

    #[test]
    fn fused_shards_agree_with_the_whole() {
        tch::manual_seed(11);
        let o = OptimSpec::default();
        // Uneven, unaligned shard sizes.
        let sizes = [250i64, 333, 420];
        let n: i64 = sizes.iter().sum();
        let p = Tensor::randn([n], (Kind::Float, tch::Device::Cpu));
        let mut whole = AdamState::with_impl(p.copy(), true, AdamImpl::Fused);
        let mut shards: Vec<(i64, i64, AdamState)> = Vec::new();
        let mut at = 0;
        for len in sizes {
            shards.push((
                at,
                len,
                AdamState::with_impl(p.narrow(0, at, len).copy(), true, AdamImpl::Fused),
            ));
            at += len;
        }
        for step in 1..=5 {
            let g = Tensor::randn([n], (Kind::Float, tch::Device::Cpu)) * 0.5;
            whole.update(&g, &o, 0.01, step);
            for (at, len, s) in shards.iter_mut() {
                s.update(&g.narrow(0, *at, *len), &o, 0.01, step);
            }
        }
        let parts: Vec<&Tensor> = shards.iter().map(|(_, _, s)| &s.master).collect();
        let joined = Tensor::cat(&parts, 0);
        assert!(
            joined.equal(&whole.master),
            "relative {:e}",
            rel_diff(&joined, &whole.master)
        );
    }

    #[test]
    fn fused_and_manual_agree_on_cuda_when_present() {
        // Skips on CPU-only hosts; on a GPU host this checks the CUDA kernel.
        crate::load_cuda_backend();
        if !tch::Cuda::is_available() {
            eprintln!("no CUDA device: skipped");
            return;
        }
        let dev = tch::Device::Cuda(0);
        tch::manual_seed(3);
        let o = OptimSpec::default();
        let p = Tensor::randn([1 << 20], (Kind::Float, dev));
        let mut fused = AdamState::with_impl(p.copy(), true, AdamImpl::Fused);
        let mut manual = AdamState::with_impl(p.copy(), true, AdamImpl::Manual);
        for step in 1..=10 {
            let g = Tensor::randn([1 << 20], (Kind::Float, dev)) * 0.05;
            fused.try_update(&g, &o, 0.01, step).unwrap();
            manual.update(&g, &o, 0.01, step);
        }
        let r = rel_diff(&fused.master, &manual.master);
        assert!(r < 1e-6, "relative {r:e}");
        assert_eq!(fused.step.device(), dev);
    }

    #[test]
    fn gantry_adamw_parses_and_defaults_to_fused() {
        assert_eq!(AdamImpl::parse(None), Ok(None));
        assert_eq!(AdamImpl::parse(Some("")), Ok(None));
        assert_eq!(AdamImpl::parse(Some("fused")), Ok(Some(AdamImpl::Fused)));
        assert_eq!(AdamImpl::parse(Some("Manual")), Ok(Some(AdamImpl::Manual)));
        assert!(AdamImpl::parse(Some("apex")).is_err());
        assert_eq!(AdamImpl::choose(None), AdamImpl::Fused);
        assert_eq!(AdamImpl::choose(Some(AdamImpl::Fused)), AdamImpl::Fused);
        assert_eq!(AdamImpl::choose(Some(AdamImpl::Manual)), AdamImpl::Manual);
    }
}
