//! Element types a communicator can move and reduce, and the reduction operators.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The element type of a buffer, as it travels in message headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum DType {
    F32 = 1,
    F64 = 2,
    F16 = 3,
    BF16 = 4,
    I32 = 5,
    I64 = 6,
    U8 = 7,
}

impl DType {
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I64,
        DType::U8,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| *d as u8 == code)
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown dtype `{s}` (expected one of f32, f64, f16, bf16, i32, i64, u8)"))
    }
}

/// How `all_reduce`, `reduce` and `reduce_scatter` combine contributions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum ReduceOp {
    Sum = 1,
    /// Sum divided by the group size (integer division for integer types).
    Avg = 2,
    Max = 3,
    Min = 4,
    Product = 5,
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Avg,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::Product,
    ];

    pub fn from_code(code: u8) -> Option<ReduceOp> {
        ReduceOp::ALL.into_iter().find(|o| *o as u8 == code)
    }

    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::Product => "product",
        }
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ReduceOp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReduceOp::ALL
            .into_iter()
            .find(|o| o.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown reduce op `{s}` (expected sum, avg, max, min, product)"))
    }
}

/// A Rust type that maps onto a [`DType`]. Sealed: only the seven wire types implement it.
pub trait Element: bytemuck::Pod + Send + Sync + PartialOrd + fmt::Debug + 'static + private::Sealed {
    const DTYPE: DType;
    /// Lossless for integers up to 2^53 and exact for all float types; used by test references.
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

mod private {
    pub trait Sealed {}
}

macro_rules! element {
    ($t:ty, $d:expr, $to:expr, $from:expr) => {
        impl private::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = $d;
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
        }
    };
}

element!(f32, DType::F32, |x: f32| x as f64, |v: f64| v as f32);
element!(f64, DType::F64, |x: f64| x, |v: f64| v);
element!(f16, DType::F16, |x: f16| x.to_f64(), f16::from_f64);
element!(bf16, DType::BF16, |x: bf16| x.to_f64(), bf16::from_f64);
element!(i32, DType::I32, |x: i32| x as f64, |v: f64| v as i32);
element!(i64, DType::I64, |x: i64| x as f64, |v: f64| v as i64);
element!(u8, DType::U8, |x: u8| x as f64, |v: f64| v as u8);

/// Run `$body` with the type alias `$t` bound to the Rust element type of `$dtype`: the one
/// place a run-time dtype becomes a compile-time type.
macro_rules! with_element_type {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::dtype::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::dtype::DType::F64 => {
                type $t = f64;
                $body
            }
            $crate::dtype::DType::F16 => {
                type $t = half::f16;
                $body
            }
            $crate::dtype::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            $crate::dtype::DType::I32 => {
                type $t = i32;
                $body
            }
            $crate::dtype::DType::I64 => {
                type $t = i64;
                $body
            }
            $crate::dtype::DType::U8 => {
                type $t = u8;
                $body
            }
        }
    };
}
pub(crate) use with_element_type;

/// Set element i of `buf` (holding `dtype` elements) to `f(i)`, rounded to the dtype.
pub fn fill_from_f64(buf: &mut [u8], dtype: DType, f: impl Fn(usize) -> f64) {
    with_element_type!(dtype, T => {
        for (i, x) in bytemuck::cast_slice_mut::<u8, T>(buf).iter_mut().enumerate() {
            *x = T::from_f64(f(i));
        }
    })
}

/// Element i of `buf` as f64, for every i.
pub fn to_f64_vec(buf: &[u8], dtype: DType) -> Vec<f64> {
    with_element_type!(dtype, T => bytemuck::cast_slice::<u8, T>(buf).iter().map(|x| x.to_f64()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_code(d as u8), Some(d));
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        for o in ReduceOp::ALL {
            assert_eq!(ReduceOp::from_code(o as u8), Some(o));
            assert_eq!(o.name().parse::<ReduceOp>().unwrap(), o);
        }
        assert!("f8".parse::<DType>().is_err());
    }
}
