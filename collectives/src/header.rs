//! The fixed 40-byte header that precedes every message on every transport.
//!
//! It carries the sender's view of the operation (kind, dtype, reduce op, element count,
//! sequence number, algorithm step). The receiver compares it with its own view before it
//! touches the payload, which is how ranks that call different operations, sizes or dtypes at
//! the same sequence number get a mismatch error instead of garbage or a hang.

use crate::dtype::{DType, ReduceOp};
use serde::Serialize;
use std::fmt;

pub const HEADER_LEN: usize = 40;
const MAGIC: u32 = u32::from_le_bytes(*b"GNT1");

/// Which communicator call a message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum OpKind {
    AllReduce = 1,
    Broadcast = 2,
    Reduce = 3,
    AllGather = 4,
    ReduceScatter = 5,
    AllToAll = 6,
    SendRecv = 7,
    Barrier = 8,
    /// Internal: communicator split bookkeeping.
    Split = 9,
}

impl OpKind {
    pub const fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all_reduce",
            OpKind::Broadcast => "broadcast",
            OpKind::Reduce => "reduce",
            OpKind::AllGather => "all_gather",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::AllToAll => "all_to_all",
            OpKind::SendRecv => "send_recv",
            OpKind::Barrier => "barrier",
            OpKind::Split => "split",
        }
    }

    fn from_code(code: u8) -> Option<OpKind> {
        use OpKind::*;
        [
            AllReduce,
            Broadcast,
            Reduce,
            AllGather,
            ReduceScatter,
            AllToAll,
            SendRecv,
            Barrier,
            Split,
        ]
        .into_iter()
        .find(|k| *k as u8 == code)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One rank's description of the operation it is in: what the mismatch check compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct OpDesc {
    pub kind: OpKind,
    pub dtype: DType,
    /// `None` for operations that do not reduce.
    pub reduce: Option<ReduceOp>,
    /// Element count of the caller's buffer as the operation defines it (per rank).
    pub count: u64,
    /// Root rank for rooted operations (broadcast, reduce); the user's tag for send/recv.
    pub root: u32,
}

impl fmt::Display for OpDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({} x {}", self.kind, self.count, self.dtype)?;
        if let Some(r) = self.reduce {
            write!(f, ", {r}")?;
        }
        match self.kind {
            OpKind::Broadcast | OpKind::Reduce => write!(f, ", root {}", self.root)?,
            OpKind::SendRecv => write!(f, ", tag {}", self.root)?,
            _ => {}
        }
        f.write_str(")")
    }
}

/// A message header: the operation, its sequence number, which step of the algorithm the
/// payload belongs to, and the payload length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub desc: OpDesc,
    pub seq: u64,
    /// Algorithm step; both sides must agree on it (a disagreement is a mismatch or a bug).
    pub step: u32,
    pub len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.desc.kind as u8;
        b[5] = self.desc.dtype as u8;
        b[6] = self.desc.reduce.map_or(0, |r| r as u8);
        b[8..12].copy_from_slice(&self.desc.root.to_le_bytes());
        b[12..16].copy_from_slice(&self.step.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.desc.count.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decode, refusing anything that is not a well-formed header (a corrupt stream or a
    /// peer speaking another protocol) rather than guessing.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        if u32_at(0) != MAGIC {
            return Err(format!("bad message magic {:#010x}", u32_at(0)));
        }
        let kind = OpKind::from_code(b[4]).ok_or_else(|| format!("unknown op code {}", b[4]))?;
        let dtype = DType::from_code(b[5]).ok_or_else(|| format!("unknown dtype code {}", b[5]))?;
        let reduce = match b[6] {
            0 => None,
            c => Some(ReduceOp::from_code(c).ok_or_else(|| format!("unknown reduce op code {c}"))?),
        };
        Ok(Header {
            desc: OpDesc {
                kind,
                dtype,
                reduce,
                count: u64_at(24),
                root: u32_at(8),
            },
            step: u32_at(12),
            seq: u64_at(16),
            len: u64_at(32),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_garbage() {
        let h = Header {
            desc: OpDesc {
                kind: OpKind::ReduceScatter,
                dtype: DType::BF16,
                reduce: Some(ReduceOp::Max),
                count: 1 << 40,
                root: 7,
            },
            seq: 123_456_789,
            step: 3,
            len: 99,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(Header::decode(&bad).unwrap_err().contains("magic"));
        let mut bad = h.encode();
        bad[5] = 200;
        assert!(Header::decode(&bad).unwrap_err().contains("dtype"));
    }
}
