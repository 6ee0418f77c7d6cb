//! Copying a save's slices off the device into host memory that is reused from save to save.
//!
//! One buffer per save holds every slice this rank writes, back to back; the writer hands it
//! back to the pool when it has written them ([`gantry_checkpoint::snapshot`]), so the next
//! save fills the same memory: no allocation, no zero-fill, no page faults after the first.
//! - CPU tensors: one memcpy per slice from the tensor's storage (an f32 contiguous view,
//!   which every parameter and moment is; anything else is converted by libtorch first).
//! - CUDA tensors: the buffer is page-locked ([`PinnedBuffer`]) and the copies are queued on a
//!   side stream after the compute stream's work so far, so `save` returns once they are
//!   queued. The writer waits for the copies' event before reading; the weights must not be
//!   overwritten before the copies have read them, which [`Snapshotter::before_update`]
//!   orders. If a side stream or pinned memory cannot be had, the run falls back (with a
//!   warning) to plain host buffers filled synchronously through libtorch.

use super::Piece;
use crate::error::TrainError;
use gantry_checkpoint::{BufferPool, HostBuffer, Recycled, SnapshotBytes};
use gantry_collectives::cuda::{DeviceEvent, PinnedBuffer, SideStream};
use gantry_collectives::nccl::NcclError;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use tch::{Device, Kind, Tensor};

/// The host memory of one save.
pub(crate) enum HostMem {
    Plain(Vec<u8>),
    Pinned(PinnedMem),
}

/// Page-locked memory that copies on a side stream fill.
pub(crate) struct PinnedMem {
    buffer: PinnedBuffer,
    /// The copies into `buffer` and the device tensors they read (conversions made for them
    /// alone must live until then); cleared once waited for.
    in_flight: Mutex<Option<(DeviceEvent, Vec<Tensor>)>>,
}

impl HostBuffer for HostMem {
    fn wait_ready(&self) -> Result<(), String> {
        let HostMem::Pinned(p) = self else { return Ok(()) };
        let mut in_flight = p.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((copied, _sources)) = in_flight.as_ref() {
            copied
                .wait()
                .map_err(|e| format!("the device-to-host copy failed: {e}"))?;
        }
        *in_flight = None;
        Ok(())
    }

    fn bytes(&self) -> &[u8] {
        match self {
            HostMem::Plain(v) => v,
            HostMem::Pinned(p) => p.buffer.as_slice(),
        }
    }
}

impl HostMem {
    fn len(&self) -> usize {
        self.bytes().len()
    }
}

/// Where a CUDA rank's copies run, once made.
enum Copies {
    /// No CUDA save yet.
    NotYet,
    Side(SideStream),
    /// A side stream or pinned memory could not be had: plain buffers, synchronous copies.
    Plain,
}

/// A rank's snapshot memory and, on a GPU, its copy stream.
pub(crate) struct Snapshotter {
    pool: BufferPool<HostMem>,
    copies: Copies,
    /// The last save's copies, which the next update of the weights must wait for.
    pending: Option<DeviceEvent>,
    /// Whether the trainer calls [`Self::before_update`]; if not, the compute stream waits
    /// for the copies at once (correct, but the next forward does not overlap them).
    deferred: bool,
}

fn device_err(what: &str) -> impl FnOnce(NcclError) -> TrainError + '_ {
    move |e| TrainError::Device(format!("checkpoint snapshot: {what}: {e}"))
}

fn flat_f32(piece: &Piece) -> Result<Tensor, TrainError> {
    let r = &piece.flat;
    Ok(piece
        .tensor
        .f_view([-1])?
        .f_narrow(0, r.start, r.end - r.start)?
        .f_to_kind(Kind::Float)?)
}

/// Each piece's byte range in the save's buffer, and the buffer's size.
fn layout(pieces: &[&Piece]) -> (Vec<Range<usize>>, usize) {
    let mut at = 0;
    let ranges = pieces
        .iter()
        .map(|p| {
            let len = (p.flat.end - p.flat.start).max(0) as usize * 4;
            at += len;
            at - len..at
        })
        .collect();
    (ranges, at)
}

impl Snapshotter {
    pub(crate) fn new() -> Snapshotter {
        Snapshotter {
            pool: BufferPool::new(),
            copies: Copies::NotYet,
            pending: None,
            deferred: false,
        }
    }

    /// How many save buffers were allocated so far (1 after the first save, at most 2).
    #[cfg(test)]
    pub(crate) fn allocations(&self) -> usize {
        self.pool.allocations()
    }

    pub(crate) fn defer_update_fence(&mut self) {
        self.deferred = true;
    }

    /// Orders the compute stream's next work after the last save's copies (no-op on CPU or
    /// when nothing is pending). Call before anything that writes the weights or moments.
    pub(crate) fn before_update(&mut self) -> Result<(), TrainError> {
        match self.pending.take() {
            Some(copied) => copied
                .compute_waits()
                .map_err(device_err("ordering the update after the copy")),
            None => Ok(()),
        }
    }

    /// The bytes of `pieces` (f32, in order), in one reused buffer; on a GPU still being
    /// copied when this returns.
    pub(crate) fn take(&mut self, pieces: &[&Piece]) -> Result<Vec<SnapshotBytes>, TrainError> {
        let (ranges, total) = layout(pieces);
        let ordinal = match pieces.first().map(|p| p.tensor.device()) {
            Some(Device::Cuda(i)) if pieces.iter().all(|p| p.tensor.device() == Device::Cuda(i)) => Some(i),
            _ => None,
        };
        let buffer = match ordinal {
            Some(i) => match self.pinned(i, total) {
                Some(mut buffer) => {
                    self.copy_async(pieces, &ranges, &mut buffer)?;
                    buffer
                }
                None => self.copy_plain(pieces, &ranges, total)?,
            },
            None => self.copy_plain(pieces, &ranges, total)?,
        };
        let shared: Arc<dyn HostBuffer> = Arc::new(buffer);
        ranges
            .into_iter()
            .map(|r| {
                SnapshotBytes::in_buffer(Arc::clone(&shared), r)
                    .ok_or_else(|| TrainError::Internal("a snapshot range outside its buffer".into()))
            })
            .collect()
    }

    /// A pinned buffer of `total` bytes, or `None` (after a warning, for the rest of the run)
    /// when the side stream or the pinned memory cannot be had.
    fn pinned(&mut self, ordinal: usize, total: usize) -> Option<Recycled<HostMem>> {
        if matches!(self.copies, Copies::NotYet) {
            self.copies = match SideStream::new(ordinal) {
                Ok(s) => Copies::Side(s),
                Err(e) => {
                    tracing::warn!("checkpoint snapshots: no side stream ({e}); copying synchronously instead");
                    Copies::Plain
                }
            };
        }
        if !matches!(self.copies, Copies::Side(_)) {
            return None;
        }
        let fits = |m: &HostMem| matches!(m, HostMem::Pinned(_)) && m.len() == total;
        let alloc = || {
            PinnedBuffer::new(ordinal, total).map(|buffer| {
                HostMem::Pinned(PinnedMem {
                    buffer,
                    in_flight: Mutex::new(None),
                })
            })
        };
        match self.pool.take(fits, alloc) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(
                    bytes = total,
                    "checkpoint snapshots: no pinned host memory ({e}); copying synchronously into plain buffers instead"
                );
                self.copies = Copies::Plain;
                None
            }
        }
    }

    /// Fill a plain buffer through libtorch: one memcpy per slice for an f32 CPU tensor.
    fn copy_plain(
        &mut self,
        pieces: &[&Piece],
        ranges: &[Range<usize>],
        total: usize,
    ) -> Result<Recycled<HostMem>, TrainError> {
        let fits = |m: &HostMem| matches!(m, HostMem::Plain(_)) && m.len() == total;
        // Zeroed memory from the allocator is fresh pages, not a fill; later saves reuse it.
        let mut buffer = self
            .pool
            .take(fits, || Ok::<_, TrainError>(HostMem::Plain(vec![0u8; total])))?;
        let HostMem::Plain(bytes) = buffer.get_mut() else {
            return Err(TrainError::Internal(
                "a pinned buffer where a plain one was asked for".into(),
            ));
        };
        for (piece, r) in pieces.iter().zip(ranges) {
            flat_f32(piece)?.f_copy_data_u8(&mut bytes[r.clone()], r.len() / 4)?;
        }
        Ok(buffer)
    }

    /// Queue the copies of `pieces` into `buffer` on the side stream, after the compute
    /// stream's work so far.
    fn copy_async(
        &mut self,
        pieces: &[&Piece],
        ranges: &[Range<usize>],
        buffer: &mut Recycled<HostMem>,
    ) -> Result<(), TrainError> {
        let Copies::Side(side) = &self.copies else {
            return Err(TrainError::Internal(
                "asynchronous snapshot without a side stream".into(),
            ));
        };
        let HostMem::Pinned(mem) = buffer.get_mut() else {
            return Err(TrainError::Internal(
                "a plain buffer where a pinned one was asked for".into(),
            ));
        };
        // Conversions (none for f32 parameters and moments) are queued on the compute stream
        // first, so the side stream's wait covers them.
        let sources = pieces
            .iter()
            .map(|p| Ok(flat_f32(p)?.f_contiguous()?))
            .collect::<Result<Vec<Tensor>, TrainError>>()?;
        side.after_compute()
            .map_err(device_err("ordering the copy after compute"))?;
        for (src, r) in sources.iter().zip(ranges) {
            // SAFETY: `src` is a contiguous f32 tensor of `r.len() / 4` elements on the side
            // stream's device; it lives in `in_flight` until the copy's event has completed,
            // and the weights it may alias are not written before `before_update` (or the
            // immediate wait below) orders the compute stream after the copy. `buffer` is not
            // read before that event (`wait_ready`) nor freed or reused before it (`Recycled`
            // waits on drop).
            let queued = unsafe { side.copy_to_host(src.data_ptr() as u64, &mut mem.buffer, r.start, r.len()) };
            if let Err(e) = queued {
                // Let what was queued finish before the buffer can be dropped.
                let _ = side.synchronize();
                return Err(device_err("queueing a device-to-host copy")(e));
            }
        }
        // Nothing may free or reuse `buffer` while copies into it are queued: without an
        // event, wait for the stream itself.
        let (copied, fence) = match side.mark().and_then(|copied| Ok((copied, side.mark()?))) {
            Ok(marks) => marks,
            Err(e) => {
                let _ = side.synchronize();
                return Err(device_err("marking the copy")(e));
            }
        };
        *mem.in_flight.lock().unwrap_or_else(PoisonError::into_inner) = Some((copied, sources));
        if self.deferred {
            self.pending = Some(fence);
            Ok(())
        } else {
            fence
                .compute_waits()
                .map_err(device_err("ordering compute after the copy"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_checkpoint::{DType, SliceSpec};

    fn piece(tensor: &Tensor, flat: Range<i64>) -> Piece {
        Piece {
            slice: SliceSpec::full("t", DType::F32, &[(flat.end - flat.start) as u64]),
            tensor: tensor.shallow_clone(),
            flat,
            write: true,
        }
    }

    /// What the snapshot used to be: a fresh zeroed vector per piece, filled through libtorch.
    fn old_snapshot(piece: &Piece) -> Vec<u8> {
        let host = piece
            .tensor
            .view([-1])
            .narrow(0, piece.flat.start, piece.flat.end - piece.flat.start)
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous();
        let n = host.numel();
        let mut bytes = vec![0u8; n * 4];
        host.copy_data_u8(&mut bytes, n);
        bytes
    }

    fn bytes_of(all: &[SnapshotBytes]) -> Vec<Vec<u8>> {
        all.iter()
            .map(|b| {
                b.wait_ready().unwrap();
                b.to_vec().unwrap()
            })
            .collect()
    }

    /// The bytes are the old path's; a save's buffer comes back and the next save refills the
    /// very same memory; a buffer the writer still holds is never handed out again.
    #[test]
    fn saves_reuse_one_buffer_once_written_and_match_the_old_bytes() {
        let mut weights = Tensor::randn([6, 5], (Kind::Float, Device::Cpu));
        let moments = Tensor::randn([40], (Kind::Float, Device::Cpu));
        // Not f32: converted by libtorch, still one range of the same buffer.
        let doubles = Tensor::randn([9], (Kind::Double, Device::Cpu));
        let owned = [
            piece(&weights, 0..30),
            piece(&moments, 3..17),
            piece(&moments, 17..40),
            piece(&doubles, 2..9),
        ];
        let pieces: Vec<&Piece> = owned.iter().collect();
        let want: Vec<Vec<u8>> = owned.iter().map(old_snapshot).collect();
        let mut snap = Snapshotter::new();

        let first = snap.take(&pieces).unwrap();
        assert_eq!(bytes_of(&first), want);
        let first_ptr = first[0].as_ptr();
        assert_eq!(snap.allocations(), 1);

        // The writer still holds the first save: the second gets its own memory.
        let _ = tch::no_grad(|| weights.f_add_(&Tensor::from(1.0f32)).unwrap());
        let second = snap.take(&pieces).unwrap();
        assert_eq!(snap.allocations(), 2);
        assert_ne!(second[0].as_ptr(), first_ptr);
        assert_eq!(bytes_of(&first), want, "a buffer in use was overwritten");
        assert_eq!(bytes_of(&second)[0], old_snapshot(&owned[0]));

        // Once written (dropped by the writer), the first save's buffer is refilled.
        drop(first);
        let third = snap.take(&pieces).unwrap();
        assert_eq!(snap.allocations(), 2, "a third buffer was allocated");
        assert_eq!(third[0].as_ptr(), first_ptr);
        let now: Vec<Vec<u8>> = owned.iter().map(old_snapshot).collect();
        assert_eq!(bytes_of(&third), now);
        drop((second, third));
        assert!(snap.before_update().is_ok());
    }
}
