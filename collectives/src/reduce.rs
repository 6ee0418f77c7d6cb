//! Reduction kernels over raw little-endian buffers.
//!
//! The dtype and operator are matched once per call, outside the loop; the loops themselves
//! are monomorphized element-wise closures the compiler vectorizes. Half types are widened
//! to f32 in blocks, combined and rounded back, which keeps the result commutative (every rank
//! of a recursive-doubling exchange computes bit-identical values).

use crate::dtype::{DType, ReduceOp};
use half::{bf16, f16, slice::HalfFloatSliceExt};

const HALF_BLOCK: usize = 1024;

/// `dst[i] = dst[i] ⊕ src[i]` for every element, where both slices hold `dtype` elements.
/// `Avg` combines like `Sum`; the division happens once at the end ([`finish_avg`]).
///
/// Panics if the lengths differ or are not a multiple of the element size: callers guarantee
/// both (it is a bug, never user input, when they do not).
pub fn reduce_bytes(dtype: DType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "reduce_bytes: length mismatch");
    assert_eq!(dst.len() % dtype.size(), 0, "reduce_bytes: partial element");
    let align = dtype.size();
    if !(dst.as_ptr() as usize).is_multiple_of(align) || !(src.as_ptr() as usize).is_multiple_of(align) {
        // Rare (the transports keep payloads 8-byte aligned): bounce through aligned stack blocks.
        let mut d = [0u64; 512];
        let mut s = [0u64; 512];
        for (dc, sc) in dst.chunks_mut(4096).zip(src.chunks(4096)) {
            let db = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut d)[..dc.len()];
            let sb = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut s)[..sc.len()];
            db.copy_from_slice(dc);
            sb.copy_from_slice(sc);
            reduce_bytes(dtype, op, db, sb);
            dc.copy_from_slice(db);
        }
        return;
    }
    match dtype {
        DType::F32 => f32_op(op, cast_mut(dst), cast(src)),
        DType::F64 => f64_op(op, cast_mut(dst), cast(src)),
        DType::I32 => int_op!(i32, op, cast_mut(dst), cast(src)),
        DType::I64 => int_op!(i64, op, cast_mut(dst), cast(src)),
        DType::U8 => int_op!(u8, op, dst, src),
        DType::F16 => half_op::<f16>(op, cast_mut(dst), cast(src)),
        DType::BF16 => half_op::<bf16>(op, cast_mut(dst), cast(src)),
    }
}

/// Divide every element by `n`, turning a sum into the average.
pub fn finish_avg(dtype: DType, buf: &mut [u8], n: usize) {
    if n <= 1 {
        return;
    }
    match dtype {
        DType::F32 => cast_mut::<f32>(buf).iter_mut().for_each(|x| *x /= n as f32),
        DType::F64 => cast_mut::<f64>(buf).iter_mut().for_each(|x| *x /= n as f64),
        DType::I32 => cast_mut::<i32>(buf).iter_mut().for_each(|x| *x /= n as i32),
        DType::I64 => cast_mut::<i64>(buf).iter_mut().for_each(|x| *x /= n as i64),
        DType::U8 => buf.iter_mut().for_each(|x| *x = (*x as usize / n) as u8),
        DType::F16 => half_map::<f16>(cast_mut(buf), |x| x / n as f32),
        DType::BF16 => half_map::<bf16>(cast_mut(buf), |x| x / n as f32),
    }
}

fn cast<T: bytemuck::Pod>(b: &[u8]) -> &[T] {
    bytemuck::cast_slice(b)
}

fn cast_mut<T: bytemuck::Pod>(b: &mut [u8]) -> &mut [T] {
    bytemuck::cast_slice_mut(b)
}

#[inline(always)]
fn zip_apply<T: Copy>(dst: &mut [T], src: &[T], f: impl Fn(T, T) -> T) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f(*d, *s);
    }
}

trait Float: Copy + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> {
    fn fmax(self, o: Self) -> Self;
    fn fmin(self, o: Self) -> Self;
}
impl Float for f32 {
    fn fmax(self, o: Self) -> Self {
        self.max(o)
    }
    fn fmin(self, o: Self) -> Self {
        self.min(o)
    }
}
impl Float for f64 {
    fn fmax(self, o: Self) -> Self {
        self.max(o)
    }
    fn fmin(self, o: Self) -> Self {
        self.min(o)
    }
}

fn float_op<T: Float>(op: ReduceOp, dst: &mut [T], src: &[T]) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip_apply(dst, src, |a, b| a + b),
        ReduceOp::Product => zip_apply(dst, src, |a, b| a * b),
        ReduceOp::Max => zip_apply(dst, src, T::fmax),
        ReduceOp::Min => zip_apply(dst, src, T::fmin),
    }
}

/// Sum and product of f32 in SSE lanes where the target has them; the rest element by element.
/// The debug profile, which tests and benches build, compiles this crate at opt-level 1, where
/// LLVM does not vectorize loops: a 1 KiB sum took ~60 ns scalar, a fair part of a 0.6 µs
/// all_reduce over shared memory. Lane-wise IEEE add and multiply round exactly as the scalar
/// ones, so results are bit-identical either way. Max and min keep the scalar path, whose NaN
/// handling (`f32::max`) the SSE instructions do not share.
fn f32_op(op: ReduceOp, dst: &mut [f32], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_add_ps, _mm_mul_ps};
        // SAFETY (both closures): SSE is part of the x86_64 baseline.
        match op {
            ReduceOp::Sum | ReduceOp::Avg => return sse::f32s(dst, src, |a, b| unsafe { _mm_add_ps(a, b) }),
            ReduceOp::Product => return sse::f32s(dst, src, |a, b| unsafe { _mm_mul_ps(a, b) }),
            ReduceOp::Max | ReduceOp::Min => {}
        }
    }
    float_op::<f32>(op, dst, src)
}

/// [`f32_op`] for f64.
fn f64_op(op: ReduceOp, dst: &mut [f64], src: &[f64]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_add_pd, _mm_mul_pd};
        // SAFETY (both closures): SSE2 is part of the x86_64 baseline.
        match op {
            ReduceOp::Sum | ReduceOp::Avg => return sse::f64s(dst, src, |a, b| unsafe { _mm_add_pd(a, b) }),
            ReduceOp::Product => return sse::f64s(dst, src, |a, b| unsafe { _mm_mul_pd(a, b) }),
            ReduceOp::Max | ReduceOp::Min => {}
        }
    }
    float_op::<f64>(op, dst, src)
}

#[cfg(target_arch = "x86_64")]
mod sse {
    use std::arch::x86_64::{__m128, __m128d};

    /// Sixteen bytes at any alignment: reading and writing it through a pointer is one unaligned
    /// load or store. (`_mm_loadu_ps` does the same but, with debug assertions on, goes through
    /// a checked `copy_nonoverlapping` that made the loop slower than the scalar one.)
    #[repr(C, packed)]
    #[derive(Clone, Copy)]
    struct Unaligned<V>(V);

    /// `dst[i] = f(dst[i], src[i])` over whole vectors of `V` (`N` elements of `T` each); the
    /// tail goes through one zero-padded vector. `V` is `__m128` or `__m128d` and `N * size_of::<T>()`
    /// its size.
    #[inline(always)]
    fn lanes<T: Copy + Default, V: Copy, const N: usize>(dst: &mut [T], src: &[T], f: impl Fn(V, V) -> V) {
        const { assert!(size_of::<V>() == 16) };
        assert_eq!(dst.len(), src.len());
        assert_eq!(N * size_of::<T>(), size_of::<V>());
        let whole = dst.len() / N;
        let (d, s) = (
            dst.as_mut_ptr() as *mut Unaligned<V>,
            src.as_ptr() as *const Unaligned<V>,
        );
        for i in 0..whole {
            // SAFETY: vector i covers elements N*i .. N*i + N <= len of both slices; `Unaligned`
            // has alignment 1, and any bit pattern is a valid float vector.
            unsafe { *d.wrapping_add(i) = Unaligned(f((*d.wrapping_add(i)).0, (*s.wrapping_add(i)).0)) };
        }
        let tail = dst.len() - whole * N;
        if tail > 0 {
            let (mut a, mut b) = ([T::default(); N], [T::default(); N]);
            a[..tail].copy_from_slice(&dst[whole * N..]);
            b[..tail].copy_from_slice(&src[whole * N..]);
            let (pa, pb) = (a.as_mut_ptr() as *mut Unaligned<V>, b.as_ptr() as *const Unaligned<V>);
            // SAFETY: `a` and `b` are N elements of T each: one vector.
            unsafe { *pa = Unaligned(f((*pa).0, (*pb).0)) };
            dst[whole * N..].copy_from_slice(&a[..tail]);
        }
    }

    #[inline(always)]
    pub(super) fn f32s(dst: &mut [f32], src: &[f32], f: impl Fn(__m128, __m128) -> __m128) {
        lanes::<f32, __m128, 4>(dst, src, f)
    }

    #[inline(always)]
    pub(super) fn f64s(dst: &mut [f64], src: &[f64], f: impl Fn(__m128d, __m128d) -> __m128d) {
        lanes::<f64, __m128d, 2>(dst, src, f)
    }
}

macro_rules! int_op {
    ($t:ty, $op:expr, $dst:expr, $src:expr) => {{
        let (dst, src): (&mut [$t], &[$t]) = ($dst, $src);
        match $op {
            ReduceOp::Sum | ReduceOp::Avg => zip_apply(dst, src, <$t>::wrapping_add),
            ReduceOp::Product => zip_apply(dst, src, <$t>::wrapping_mul),
            ReduceOp::Max => zip_apply(dst, src, <$t>::max),
            ReduceOp::Min => zip_apply(dst, src, <$t>::min),
        }
    }};
}
use int_op;

/// Widen blocks to f32, combine, round back.
fn half_op<H>(op: ReduceOp, dst: &mut [H], src: &[H])
where
    [H]: HalfFloatSliceExt,
    H: Copy,
{
    let mut a = [0f32; HALF_BLOCK];
    let mut b = [0f32; HALF_BLOCK];
    for (d, s) in dst.chunks_mut(HALF_BLOCK).zip(src.chunks(HALF_BLOCK)) {
        let n = d.len();
        d.convert_to_f32_slice(&mut a[..n]);
        s.convert_to_f32_slice(&mut b[..n]);
        f32_op(op, &mut a[..n], &b[..n]);
        d.convert_from_f32_slice(&a[..n]);
    }
}

fn half_map<H>(buf: &mut [H], f: impl Fn(f32) -> f32)
where
    [H]: HalfFloatSliceExt,
{
    let mut a = [0f32; HALF_BLOCK];
    for chunk in buf.chunks_mut(HALF_BLOCK) {
        let n = chunk.len();
        chunk.convert_to_f32_slice(&mut a[..n]);
        a[..n].iter_mut().for_each(|x| *x = f(*x));
        chunk.convert_from_f32_slice(&a[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    #[test]
    fn every_dtype_and_op() {
        let a = [3.0f32, -1.0, 2.5];
        let b = [1.0f32, 4.0, -2.5];
        for (op, want) in [
            (ReduceOp::Sum, [4.0, 3.0, 0.0]),
            (ReduceOp::Max, [3.0, 4.0, 2.5]),
            (ReduceOp::Min, [1.0, -1.0, -2.5]),
            (ReduceOp::Product, [3.0, -4.0, -6.25]),
        ] {
            let mut d = bytes(&a);
            reduce_bytes(DType::F32, op, &mut d, &bytes(&b));
            assert_eq!(bytemuck::cast_slice::<u8, f32>(&d), &want);

            let mut d = bytes(&a.map(|x| x as f64));
            reduce_bytes(DType::F64, op, &mut d, &bytes(&b.map(|x| x as f64)));
            assert_eq!(bytemuck::cast_slice::<u8, f64>(&d), &want.map(|x| x as f64));

            let mut d = bytes(&a.map(f16::from_f32));
            reduce_bytes(DType::F16, op, &mut d, &bytes(&b.map(f16::from_f32)));
            assert_eq!(bytemuck::cast_slice::<u8, f16>(&d), &want.map(f16::from_f32));

            let mut d = bytes(&a.map(bf16::from_f32));
            reduce_bytes(DType::BF16, op, &mut d, &bytes(&b.map(bf16::from_f32)));
            assert_eq!(bytemuck::cast_slice::<u8, bf16>(&d), &want.map(bf16::from_f32));
        }
        let mut d = bytes(&[5i64, -7, i64::MAX]);
        reduce_bytes(DType::I64, ReduceOp::Sum, &mut d, &bytes(&[1i64, 7, 1]));
        assert_eq!(bytemuck::cast_slice::<u8, i64>(&d), &[6, 0, i64::MIN]);
        let mut d = vec![200u8, 3];
        reduce_bytes(DType::U8, ReduceOp::Max, &mut d, &[100, 9]);
        assert_eq!(d, [200, 9]);
        let mut d = bytes(&[9i32, -9]);
        finish_avg(DType::I32, &mut d, 2);
        assert_eq!(bytemuck::cast_slice::<u8, i32>(&d), &[4, -4]);
    }

    #[test]
    fn lane_sums_and_products_equal_the_scalar_ones_bit_for_bit() {
        // Values whose sums and products round, overflow, cancel and carry NaN and -0.
        let pool = [
            1.1f64,
            -3.7e-3,
            1e308,
            -1e308,
            7.0,
            f64::NAN,
            -0.0,
            0.1,
            f64::INFINITY,
            3e-310,
        ];
        for len in 0..12 {
            let a: Vec<f64> = (0..len).map(|i| pool[(i * 3) % pool.len()]).collect();
            let b: Vec<f64> = (0..len).map(|i| pool[(i * 7 + 1) % pool.len()]).collect();
            for op in [ReduceOp::Sum, ReduceOp::Product, ReduceOp::Avg] {
                let mut lanes = a.clone();
                f64_op(op, &mut lanes, &b);
                let mut scalar = a.clone();
                float_op::<f64>(op, &mut scalar, &b);
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&lanes), bits(&scalar), "f64 {op:?}, {len} elements");

                let (a32, b32): (Vec<f32>, Vec<f32>) = (
                    a.iter().map(|&x| x as f32).collect(),
                    b.iter().map(|&x| x as f32).collect(),
                );
                let mut lanes = a32.clone();
                f32_op(op, &mut lanes, &b32);
                let mut scalar = a32.clone();
                float_op::<f32>(op, &mut scalar, &b32);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&lanes), bits(&scalar), "f32 {op:?}, {len} elements");
            }
        }
    }

    #[test]
    fn unaligned_inputs_take_the_bounce_path() {
        let a = bytes(&[1.0f32, 2.0, 3.0]);
        let b = bytes(&[10.0f32, 20.0, 30.0]);
        let mut da = [0u8; 13];
        let mut sb = [0u8; 13];
        da[1..].copy_from_slice(&a);
        sb[1..].copy_from_slice(&b);
        reduce_bytes(DType::F32, ReduceOp::Sum, &mut da[1..], &sb[1..]);
        let out: Vec<f32> = da[1..]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(out, [11.0, 22.0, 33.0]);
    }
}
