//! [`Tokens`]: zero-copy token slices in a dataset's own type, widened to i64 and scanned for
//! their largest id with loops compiled for SSE2, AVX2 and AVX-512 and picked at run time.

use super::TokenDType;

/// A zero-copy view of tokens in the dataset's own type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tokens<'a> {
    U8(&'a [u8]),
    I8(&'a [i8]),
    I16(&'a [i16]),
    U16(&'a [u16]),
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl Tokens<'_> {
    pub fn len(&self) -> usize {
        match self {
            Tokens::U8(t) => t.len(),
            Tokens::I8(t) => t.len(),
            Tokens::I16(t) => t.len(),
            Tokens::U16(t) => t.len(),
            Tokens::I32(t) => t.len(),
            Tokens::I64(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> Option<i64> {
        Some(match self {
            Tokens::U8(t) => i64::from(*t.get(i)?),
            Tokens::I8(t) => i64::from(*t.get(i)?),
            Tokens::I16(t) => i64::from(*t.get(i)?),
            Tokens::U16(t) => i64::from(*t.get(i)?),
            Tokens::I32(t) => i64::from(*t.get(i)?),
            Tokens::I64(t) => *t.get(i)?,
        })
    }

    /// The largest token id (0 when empty), for checking ids against a vocabulary. A negative
    /// id (signed types) counts as `u64::MAX`: above every vocabulary. One pass, vectorized
    /// like [`Tokens::extend_i64`].
    pub fn max_id(&self) -> u64 {
        match self {
            Tokens::U8(t) => largest(t, u64::from(u8::MAX)),
            Tokens::U16(t) => largest(t, u64::from(u16::MAX)),
            Tokens::I8(t) => largest_signed(t),
            Tokens::I16(t) => largest_signed(t),
            Tokens::I32(t) => largest_signed(t),
            Tokens::I64(t) => largest_signed(t),
        }
    }

    /// Append the tokens to `out` as i64 (what tensors take).
    pub fn extend_i64(&self, out: &mut Vec<i64>) {
        match self {
            Tokens::U8(t) => widen(t, out),
            Tokens::I8(t) => widen(t, out),
            Tokens::I16(t) => widen(t, out),
            Tokens::U16(t) => widen(t, out),
            Tokens::I32(t) => widen(t, out),
            Tokens::I64(t) => out.extend_from_slice(t),
        }
    }
}

/// Append `tokens` widened to i64. The loop is compiled for the baseline x86-64 (SSE2: two
/// tokens per instruction) and again for AVX2 and AVX-512 (four, eight), chosen at run time
/// (the CPU check is a cached load). Widening is most of a shuffled read's time once the bytes
/// are prefetched; AVX-512 measured 15% more tokens/s for the whole reader.
fn widen<T: Copy + Into<i64>>(tokens: &[T], out: &mut Vec<i64>) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { widen_avx512(tokens, out) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { widen_avx2(tokens, out) };
        }
    }
    out.extend(tokens.iter().map(|&x| x.into()));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_avx512<T: Copy + Into<i64>>(tokens: &[T], out: &mut Vec<i64>) {
    out.extend(tokens.iter().map(|&x| x.into()));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_avx2<T: Copy + Into<i64>>(tokens: &[T], out: &mut Vec<i64>) {
    out.extend(tokens.iter().map(|&x| x.into()));
}

/// The largest of `tokens` (0 when empty); stops early at `ceiling`, the type's largest value.
/// Blocks of 4096 are reduced by a loop the compiler vectorizes (compiled for the baseline and
/// again for AVX2, picked at run time as in [`widen`]).
fn largest<T: Copy + Ord + Default + Into<u64>>(tokens: &[T], ceiling: u64) -> u64 {
    let mut m = 0;
    for block in tokens.chunks(4096) {
        m = m.max(block_max(block).into());
        if m == ceiling {
            break;
        }
    }
    m
}

/// [`largest`] for a signed type: a negative id anywhere makes it `u64::MAX`.
fn largest_signed<T: Copy + Ord + Default + Into<i64>>(tokens: &[T]) -> u64 {
    let (mut lo, mut hi) = (0i64, 0i64);
    for block in tokens.chunks(4096) {
        let (l, h) = block_min_max(block);
        (lo, hi) = (lo.min(l.into()), hi.max(h.into()));
        if lo < 0 {
            return u64::MAX;
        }
    }
    hi as u64
}

fn block_max<T: Copy + Ord + Default>(block: &[T]) -> T {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { block_max_avx2(block) };
        }
    }
    block.iter().fold(T::default(), |m, &t| m.max(t))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_max_avx2<T: Copy + Ord + Default>(block: &[T]) -> T {
    block.iter().fold(T::default(), |m, &t| m.max(t))
}

fn block_min_max<T: Copy + Ord + Default>(block: &[T]) -> (T, T) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { block_min_max_avx2(block) };
        }
    }
    min_max(block)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_min_max_avx2<T: Copy + Ord + Default>(block: &[T]) -> (T, T) {
    min_max(block)
}

#[inline(always)]
fn min_max<T: Copy + Ord + Default>(block: &[T]) -> (T, T) {
    block
        .iter()
        .fold((T::default(), T::default()), |(lo, hi), &t| (lo.min(t), hi.max(t)))
}

/// Interpret `bytes` (a whole number of tokens) as tokens of `dtype`, zero-copy. The bytes
/// must be aligned to the token size (maps and frame buffers are).
pub fn tokens_of(dtype: TokenDType, bytes: &[u8]) -> Tokens<'_> {
    match dtype {
        TokenDType::U8 => Tokens::U8(bytes),
        TokenDType::I8 => Tokens::I8(bytemuck::cast_slice(bytes)),
        TokenDType::I16 => Tokens::I16(bytemuck::cast_slice(bytes)),
        TokenDType::U16 => Tokens::U16(bytemuck::cast_slice(bytes)),
        TokenDType::I32 => Tokens::I32(bytemuck::cast_slice(bytes)),
        TokenDType::I64 => Tokens::I64(bytemuck::cast_slice(bytes)),
    }
}
