//! The fused operators against ATen's unfused ones: outputs and gradients on random inputs
//! (f64 to 1e-10; f32, which runs the AVX2 kernel where the CPU has it and oneDNN's matmuls
//! where libtorch has oneDNN, to 1e-5 of ATen in f64), and the loss curve of 20 training
//! steps of the tiny GPT-2 with and without them.

use gantry_train::autograd::{backward_with, set_grad};
use gantry_train::comm::{CommClock, TensorComm};
use gantry_train::fused_ops::{FusedOps, linear, linear_gelu_tanh, weight_grads_accumulated_in_place};
use gantry_train::model::{MicroBatch, Model, StagePlan};
use gantry_train::spec::{Arch, ModelSpec};
use gantry_train::tensor_parallel::Fwd;
use tch::{Device, Kind, Tensor};

/// The largest |a − b| / (1 + |b|) over the elements.
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let diff = (&a - &b).abs() / (b.abs() + 1.0);
    diff.max().double_value(&[])
}

struct Grads {
    out: Tensor,
    x: Tensor,
    w: Tensor,
    b: Option<Tensor>,
}

/// Forward and backward (with gradient `g`) of `f` on fresh leaves copied from `x`, `w`, `b`.
fn run(
    f: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    g: &Tensor,
) -> Grads {
    let leaf = |t: &Tensor| t.copy().set_requires_grad(true);
    let (x, w, b) = (leaf(x), leaf(w), b.map(leaf));
    let out = f(&x, &w, b.as_ref());
    backward_with(&out, g).unwrap();
    Grads {
        out: out.detach(),
        x: x.grad(),
        w: w.grad(),
        b: b.map(|b| b.grad()),
    }
}

/// One operator under test and the ATen ops it replaces.
struct Op {
    name: &'static str,
    fused: fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
    aten: fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
}

const LINEAR_GELU: Op = Op {
    name: "linear + GELU",
    fused: |x, w, b| linear_gelu_tanh(x, w, b).unwrap(),
    aten: |x, w, b| x.linear(w, b).gelu("tanh"),
};

const LINEAR: Op = Op {
    name: "linear",
    fused: |x, w, b| linear(x, w, b).unwrap(),
    aten: |x, w, b| x.linear(w, b),
};

fn compare(op: &Op, kind: Kind, shape: &[i64], inner: i64, outer: i64, bias: bool, tol: f64) {
    let opts = (kind, Device::Cpu);
    let mut x_shape = shape.to_vec();
    x_shape.push(inner);
    // Scaled so the pre-activations cover GELU's curved part and both tails.
    let x = Tensor::randn(x_shape.as_slice(), opts) * 2.0;
    let w = Tensor::randn([outer, inner], opts) / (inner as f64).sqrt() * 2.0;
    let b = bias.then(|| Tensor::randn([outer], opts));
    let mut out_shape = shape.to_vec();
    out_shape.push(outer);
    let g = Tensor::randn(out_shape.as_slice(), opts);
    let fused = run(op.fused, &x, &w, b.as_ref(), &g);
    let unfused = op.aten;
    let aten = run(unfused, &x, &w, b.as_ref(), &g);
    // The reference is ATen's unfused ops in f64 on the same values. In f32 ATen itself is off
    // by more than 1e-5 from it where a gradient sums hundreds of rows (its GELU derivative
    // alone by ~1e-6, from 1 − tanh² cancelling), so there the fused ops may be as far off as
    // twice ATen's own f32 error, and no further.
    let f64 = |t: &Tensor| t.to_kind(Kind::Double);
    let (xd, wd, bd, gd) = (f64(&x), f64(&w), b.as_ref().map(f64), f64(&g));
    let exact = run(unfused, &xd, &wd, bd.as_ref(), &gd);
    let what = format!("{} {kind:?} {shape:?}×{inner}→{outer} bias {bias}", op.name);
    let mut pairs = vec![
        ("output", &fused.out, &aten.out, &exact.out),
        ("grad x", &fused.x, &aten.x, &exact.x),
        ("grad w", &fused.w, &aten.w, &exact.w),
    ];
    match (&fused.b, &aten.b, &exact.b) {
        (Some(f), Some(a), Some(e)) => pairs.push(("grad bias", f, a, e)),
        (None, None, None) => {}
        _ => panic!("{what}: one side has a bias gradient"),
    }
    for (name, f, a, e) in pairs {
        let (err, aten_err) = (max_rel(f, e), max_rel(a, e));
        let allowed = tol.max(2.0 * aten_err);
        assert!(
            err <= allowed,
            "{what}: {name} differs by {err:e} (ATen in {kind:?}: {aten_err:e}; allowed {allowed:e})"
        );
    }
}

#[test]
fn linear_gelu_matches_aten_in_f64() {
    tch::manual_seed(1);
    // Element counts that are and are not multiples of the kernel's vector width and chunks.
    for (shape, inner, outer) in [
        (&[4, 16][..], 32, 128),
        (&[3, 7][..], 5, 13),
        (&[1][..], 3, 1),
        (&[300][..], 64, 257),
    ] {
        for bias in [true, false] {
            compare(&LINEAR_GELU, Kind::Double, shape, inner, outer, bias, 1e-10);
        }
    }
}

#[test]
fn linear_gelu_matches_aten_in_f32() {
    tch::manual_seed(2);
    for (shape, inner, outer) in [(&[4, 16][..], 32, 128), (&[3, 7][..], 5, 13), (&[300][..], 64, 257)] {
        for bias in [true, false] {
            compare(&LINEAR_GELU, Kind::Float, shape, inner, outer, bias, 1e-5);
        }
    }
}

#[test]
fn linear_matches_aten_in_f64() {
    tch::manual_seed(3);
    for (shape, inner, outer) in [(&[4, 16][..], 32, 128), (&[3, 7][..], 5, 13), (&[1][..], 3, 1)] {
        for bias in [true, false] {
            compare(&LINEAR, Kind::Double, shape, inner, outer, bias, 1e-10);
        }
    }
}

#[test]
fn linear_matches_aten_in_f32() {
    tch::manual_seed(4);
    // The model's own shapes (tiny: 1,024 rows, d 128) among odd ones, and an input that is
    // not contiguous (a transposed view, as attention's output is before its projection).
    for (shape, inner, outer) in [
        (&[8, 128][..], 128, 384),
        (&[4, 16][..], 32, 128),
        (&[3, 7][..], 5, 13),
        (&[300][..], 64, 257),
    ] {
        for bias in [true, false] {
            compare(&LINEAR, Kind::Float, shape, inner, outer, bias, 1e-5);
        }
    }
    let x = Tensor::randn([6, 5, 4], (Kind::Float, Device::Cpu)).transpose(0, 2);
    let w = Tensor::randn([3, 6], (Kind::Float, Device::Cpu));
    let got = linear(&x, &w, None).unwrap();
    assert!(
        max_rel(
            &got,
            &x.to_kind(Kind::Double).linear::<Tensor>(&w.to_kind(Kind::Double), None)
        ) <= 1e-5
    );
    // An empty inner dimension: zeros plus the bias, as ATen defines it.
    let (x, w) = (
        Tensor::zeros([2, 0], (Kind::Float, Device::Cpu)),
        Tensor::zeros([3, 0], (Kind::Float, Device::Cpu)),
    );
    let b = Tensor::ones([3], (Kind::Float, Device::Cpu));
    assert_eq!(
        linear(&x, &w, Some(&b)).unwrap(),
        Tensor::ones([2, 3], (Kind::Float, Device::Cpu))
    );
}

/// A weight whose `.grad` is already a view into a flat buffer (as the trainer's gradient
/// buckets make it) gets each backward's gradient added there in place by both linears (the
/// matmul accumulates; autograd gets no weight gradient to add), in f32 and f64, with the
/// bias beside it still placed by autograd; the buffer around the view is left alone.
#[test]
fn weight_gradients_accumulate_in_place_into_an_existing_grad() {
    tch::manual_seed(5);
    let (m, inner, outer) = (300i64, 64i64, 257i64);
    let n = outer * inner;
    for (kind, tol) in [(Kind::Double, 1e-10f64), (Kind::Float, 1e-5)] {
        for op in [&LINEAR, &LINEAR_GELU] {
            let opts = (kind, Device::Cpu);
            let x = Tensor::randn([m, inner], opts);
            let w = Tensor::randn([outer, inner], opts) / 8.0;
            let b = Tensor::randn([outer], opts);
            let gs = [Tensor::randn([m, outer], opts), Tensor::randn([m, outer], opts)];
            let start = Tensor::randn([outer, inner], opts);
            // Expected, in f64 with ATen's ops: the start value plus both passes' gradients.
            let f64 = |t: &Tensor| t.to_kind(Kind::Double);
            let mut expected = f64(&start).copy(); // to_kind of a Double aliases it
            let mut expected_b = Tensor::zeros([outer], (Kind::Double, Device::Cpu));
            // ATen's own result in this kind, which sets the tolerance as in `compare`.
            let mut aten = start.copy();
            for g in &gs {
                let exact = run(op.aten, &f64(&x), &f64(&w), Some(&f64(&b)), &f64(g));
                expected += exact.w;
                expected_b += exact.b.unwrap();
                aten += run(op.aten, &x, &w, Some(&b), g).w;
            }
            let tol = tol.max(2.0 * max_rel(&aten, &expected));
            let flat = Tensor::zeros([n + 128], opts);
            let mut view = flat.narrow(0, 64, n).view([outer, inner]);
            view.copy_(&start);
            let (wl, bl) = (w.copy().set_requires_grad(true), b.copy().set_requires_grad(true));
            set_grad(&wl, &view).unwrap();
            let before = weight_grads_accumulated_in_place();
            for g in &gs {
                let out = (op.fused)(&x, &wl, Some(&bl));
                backward_with(&out, g).unwrap();
            }
            let what = format!("{} {kind:?}", op.name);
            // At least: tests in other threads of this process may add their own.
            assert!(
                weight_grads_accumulated_in_place() >= before + 2,
                "{what}: the matmul did not accumulate into .grad"
            );
            assert_eq!(wl.grad().data_ptr(), view.data_ptr(), "{what}: .grad was replaced");
            let err = max_rel(&view, &expected);
            assert!(err <= tol, "{what}: accumulated weight gradient off by {err:e}");
            let err_b = max_rel(&bl.grad(), &expected_b);
            assert!(err_b <= tol, "{what}: bias gradient off by {err_b:e}");
            let outside = flat.narrow(0, 0, 64).abs().sum(Kind::Double).double_value(&[])
                + flat.narrow(0, 64 + n, 64).abs().sum(Kind::Double).double_value(&[]);
            assert_eq!(outside, 0.0, "{what}: wrote outside the parameter's view");
            // A strided `.grad` (a transposed buffer) is left to autograd, which adds in place.
            let mut strided = Tensor::zeros([inner, outer], opts).tr();
            strided.copy_(&start);
            let wl = w.copy().set_requires_grad(true);
            set_grad(&wl, &strided).unwrap();
            for g in &gs {
                backward_with(&(op.fused)(&x, &wl, Some(&bl)), g).unwrap();
            }
            let err = max_rel(&strided, &expected);
            assert!(err <= tol, "{what}: strided .grad off by {err:e}");
        }
    }
}

#[test]
fn extreme_inputs_stay_finite_and_right() {
    let x = Tensor::from_slice(&[
        -1e4f32, -100.0, -30.0, -9.0, -0.5, 0.0, 1e-6, 0.5, 9.0, 30.0, 100.0, 1e4,
    ])
    .view([12, 1]);
    let w = Tensor::ones([1, 1], (Kind::Float, Device::Cpu));
    let g = Tensor::ones([12, 1], (Kind::Float, Device::Cpu));
    let fused = run(LINEAR_GELU.fused, &x, &w, None, &g);
    let f64 = |t: &Tensor| t.to_kind(Kind::Double);
    let aten = run(
        |x, w, b| x.linear(w, b).gelu("tanh"),
        &f64(&x),
        &f64(&w),
        None,
        &f64(&g),
    );
    assert!(max_rel(&fused.out, &aten.out) <= 1e-5, "{:?}", fused.out);
    assert!(max_rel(&fused.x, &aten.x) <= 1e-5, "{:?} vs {:?}", fused.x, aten.x);
}

/// The tiny model of examples/tiny-gpt-cpu (d 128, 2 layers, 4 heads, sequence 128,
/// vocabulary 128), one stage, no tensor parallelism.
fn tiny_model(fused: FusedOps) -> Model {
    let spec = ModelSpec {
        arch: Arch::Gpt2,
        vocab_size: 128,
        d_model: 128,
        n_layers: 2,
        n_heads: 4,
        seq_len: 128,
        ..ModelSpec::default()
    };
    let plan = StagePlan {
        first: true,
        last: true,
        layers: 0..spec.n_layers,
    };
    let mut model = Model::build(&spec, plan, 1, 0, 5, Device::Cpu).unwrap();
    model.fused = fused;
    model
}

/// The losses of `steps` SGD steps on a fixed sequence of batches.
fn loss_curve(fused: FusedOps, steps: usize) -> Vec<f64> {
    let model = tiny_model(fused);
    let mut tp = TensorComm::new(None, CommClock::default());
    let mut losses = Vec::new();
    for step in 0..steps {
        // A learnable stream: each row counts up by 7 (mod 128) from a random start.
        tch::manual_seed(100 + step as i64);
        let start = Tensor::randint(128, [4, 1], (Kind::Int64, Device::Cpu));
        let tokens = (start + Tensor::arange(129, (Kind::Int64, Device::Cpu)).unsqueeze(0) * 7).remainder(128);
        let batch = MicroBatch {
            tokens: tokens.narrow(1, 0, 128).contiguous(),
            targets: tokens.narrow(1, 1, 128).contiguous(),
        };
        let mut cx = Fwd {
            tp: &mut tp,
            grad: true,
            cuts: Vec::new(),
        };
        let mut h: Option<Tensor> = None;
        for u in 0..model.units.len() {
            h = Some(model.forward_unit(u, h.as_ref(), &batch, &mut cx, false).unwrap());
        }
        let loss = h.unwrap();
        losses.push(loss.double_value(&[]));
        loss.backward();
        tch::no_grad(|| {
            for (_, p) in model.params.iter() {
                let mut t = p.tensor.shallow_clone();
                let grad = t.grad();
                if grad.defined() {
                    let _ = t.g_add_(&(grad * -0.1));
                    let _ = t.grad().zero_();
                }
            }
        });
    }
    losses
}

#[test]
fn tiny_gpt_loss_curve_is_the_same_fused_and_unfused() {
    let fused = loss_curve(FusedOps::On, 20);
    let plain = loss_curve(FusedOps::Off, 20);
    // The run must learn, or equal curves would say nothing about the gradients.
    assert!(plain[19] < plain[0] - 0.1, "{plain:?}");
    let worst = fused.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    println!(
        "losses {:.4} → {:.4}, largest fused − unfused {worst:e}",
        plain[0], plain[19]
    );
    for (step, (a, b)) in fused.iter().zip(&plain).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5,
            "step {step}: fused {a} unfused {b}\n{fused:?}\n{plain:?}"
        );
    }
}
