//! The CUDA pieces the training path needs beside NCCL: a side stream ordered against the
//! compute stream by events, page-locked host buffers, and device→host copies on the side
//! stream.
//!
//! libtorch computes on the device's legacy default stream unless told otherwise, and gantry
//! never tells it otherwise, so that stream is "the compute stream" here. A [`SideStream`] is
//! a non-blocking stream of the same device: work on it overlaps compute, and the two are
//! ordered only where an event says so ([`SideStream::after_compute`],
//! [`SideStream::before_compute`], [`DeviceEvent::compute_waits`]). Data parallelism runs its
//! NCCL gradient exchange on one (overlapping backward), and checkpointing copies parameters
//! into [`PinnedBuffer`]s on another (so a step resumes as soon as the copy is queued).
//!
//! Errors are [`NcclError`]s (the CUDA variants): like [`crate::nccl`], everything here is
//! loaded at run time, checks [`cuda_available`] before the first driver call and turns a
//! panic inside cudarc into [`NcclError::Panicked`].

use crate::nccl::{NcclError, NcclResult, bind, cuda_err, guard, invalid};
use cudarc::driver::sys::{CUevent_flags, CUresult};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, result};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Checks, without panicking, that the CUDA driver loads and sees at least one device.
pub fn cuda_available() -> NcclResult {
    guard("cuda_available", || {
        // SAFETY: dlopens (and closes) the names cudarc's driver loader would try.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(NcclError::Unavailable(
                "no CUDA driver: libcuda.so / libcuda.so.1 could not be loaded (no NVIDIA \
                 driver on this machine, or it is not in the library path)"
                    .into(),
            ));
        }
        match CudaContext::device_count() {
            Ok(n) if n > 0 => Ok(()),
            Ok(_) => Err(NcclError::Unavailable("no CUDA device".into())),
            Err(e) => Err(NcclError::Unavailable(format!(
                "no CUDA device: the CUDA driver failed to initialize ({:?})",
                e.0
            ))),
        }
    })
}

/// The primary context of device `ordinal` (the one libtorch uses), after the availability
/// check.
pub(crate) fn primary_context(ordinal: usize) -> NcclResult<Arc<CudaContext>> {
    cuda_available()?;
    guard("cuDevicePrimaryCtxRetain", || {
        CudaContext::new(ordinal).map_err(cuda_err("cuDeviceGet/cuDevicePrimaryCtxRetain"))
    })
}

/// A non-blocking stream on one device, plus that device's compute (legacy default) stream.
#[derive(Debug, Clone)]
pub struct SideStream {
    ctx: Arc<CudaContext>,
    side: Arc<CudaStream>,
    compute: Arc<CudaStream>,
}

// SAFETY: CUDA streams and contexts may be used from any thread; every call binds the context
// first.
unsafe impl Send for SideStream {}

impl SideStream {
    /// A new stream on device `ordinal`.
    pub fn new(ordinal: usize) -> NcclResult<SideStream> {
        let ctx = primary_context(ordinal)?;
        guard("cuStreamCreate", || {
            let side = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
            let compute = ctx.default_stream();
            Ok(SideStream { ctx, side, compute })
        })
    }

    pub fn device_ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The stream itself, for NCCL.
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.side
    }

    /// Work queued on this stream from now on starts after everything queued on the compute
    /// stream so far (the gradients backward has produced, the weights the update wrote).
    pub fn after_compute(&self) -> NcclResult {
        guard("after_compute", || {
            let event = record(&self.compute)?;
            self.side.wait(&event).map_err(cuda_err("cuStreamWaitEvent"))
        })
    }

    /// Work queued on the compute stream from now on starts after everything queued on this
    /// stream so far.
    pub fn before_compute(&self) -> NcclResult {
        self.mark()?.compute_waits()
    }

    /// An event that completes when everything queued on this stream so far has.
    pub fn mark(&self) -> NcclResult<DeviceEvent> {
        guard("cuEventRecord", || {
            let event = record(&self.side)?;
            Ok(DeviceEvent {
                event,
                compute: self.compute.clone(),
            })
        })
    }

    /// Blocks until everything queued on this stream has run.
    pub fn synchronize(&self) -> NcclResult {
        guard("cuStreamSynchronize", || {
            self.side.synchronize().map_err(cuda_err("cuStreamSynchronize"))
        })
    }

    /// Queue a copy of `bytes` bytes from device address `src` into `dst` at `at`.
    ///
    /// # Safety
    /// `src` must be memory of this stream's device valid for `bytes` bytes, left unchanged
    /// until the copy has run (order later writes after it: [`Self::before_compute`] or a
    /// [`DeviceEvent::compute_waits`] of a later [`Self::mark`]). `dst` must not be read
    /// before the copy has run (wait for a later mark) nor dropped while it is queued.
    pub unsafe fn copy_to_host(&self, src: u64, dst: &mut PinnedBuffer, at: usize, bytes: usize) -> NcclResult {
        const OP: &str = "cuMemcpyDtoHAsync";
        let end = at.checked_add(bytes).filter(|&e| e <= dst.len);
        if end.is_none() {
            let len = dst.len;
            return Err(invalid(
                OP,
                format!("{bytes} bytes at {at} overflow a {len}-byte buffer"),
            ));
        }
        if bytes == 0 {
            return Ok(());
        }
        if src == 0 {
            return Err(invalid(OP, "null device pointer"));
        }
        guard(OP, || {
            bind(&self.ctx)?;
            // SAFETY: `dst.ptr + at .. + bytes` lies inside the pinned allocation (checked
            // above); the source is valid per the caller's contract.
            let out = unsafe { std::slice::from_raw_parts_mut(dst.ptr.add(at), bytes) };
            unsafe { result::memcpy_dtoh_async(out, src, self.side.cu_stream()) }.map_err(cuda_err(OP))
        })
    }
}

/// Blocks until the work queued so far on device `ordinal`'s compute stream has run, polling
/// rather than blocking in the driver: a kernel that never ends (an NCCL collective whose peer
/// died or stalled) becomes [`NcclError::DeviceTimeout`] after `deadline` instead of a hang.
pub fn wait_for_compute(ordinal: usize, deadline: Duration) -> NcclResult {
    const OP: &str = "the compute stream's queued work";
    let ctx = primary_context(ordinal)?;
    guard("wait_for_compute", || {
        let event = record(&ctx.default_stream())?;
        let started = Instant::now();
        while !event_done(&event)? {
            if started.elapsed() >= deadline {
                let waited = started.elapsed();
                return Err(NcclError::DeviceTimeout { op: OP, waited });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(())
    })
}

/// Whether the work before `event` has run (never blocks).
fn event_done(event: &CudaEvent) -> NcclResult<bool> {
    bind(event.context())?;
    // SAFETY: the event is live for the borrow.
    match unsafe { result::event::query(event.cu_event()) } {
        Ok(()) => Ok(true),
        Err(e) if e.0 == CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        Err(e) => Err(cuda_err("cuEventQuery")(e)),
    }
}

fn record(stream: &CudaStream) -> NcclResult<CudaEvent> {
    let flags = Some(CUevent_flags::CU_EVENT_DISABLE_TIMING);
    stream.record_event(flags).map_err(cuda_err("cuEventRecord"))
}

/// A point in a side stream's work.
#[derive(Debug)]
pub struct DeviceEvent {
    event: CudaEvent,
    compute: Arc<CudaStream>,
}

// SAFETY: as for `SideStream`.
unsafe impl Send for DeviceEvent {}

impl DeviceEvent {
    /// Whether the work before the event has run (never blocks).
    pub fn is_done(&self) -> NcclResult<bool> {
        guard("cuEventQuery", || event_done(&self.event))
    }

    /// Blocks the calling thread until the work before the event has run.
    pub fn wait(&self) -> NcclResult {
        guard("cuEventSynchronize", || {
            self.event.synchronize().map_err(cuda_err("cuEventSynchronize"))
        })
    }

    /// Work queued on the compute stream from now on starts after the event.
    pub fn compute_waits(&self) -> NcclResult {
        guard("cuStreamWaitEvent", || {
            self.compute.wait(&self.event).map_err(cuda_err("cuStreamWaitEvent"))
        })
    }
}

/// Page-locked host memory of one device's context: device→host copies into it run
/// asynchronously and at the bus's speed (a pageable destination makes the driver stage
/// through its own buffer and block). Allocated once and reused: pinning is slow.
#[derive(Debug)]
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain host memory owned by this value; the context is used only to free it.
unsafe impl Send for PinnedBuffer {}
// SAFETY: `&PinnedBuffer` only gives out shared reads.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// `len` bytes (not zeroed) in device `ordinal`'s context.
    pub fn new(ordinal: usize, len: usize) -> NcclResult<PinnedBuffer> {
        const OP: &str = "cuMemHostAlloc";
        let ctx = primary_context(ordinal)?;
        guard(OP, || {
            bind(&ctx)?;
            // Flags 0: cached, readable at full speed by the CPU (write-combined memory is not).
            // SAFETY: a plain allocation; a zero-length one is given one byte instead.
            let ptr = unsafe { result::malloc_host(len.max(1), 0) }.map_err(cuda_err(OP))?;
            Ok(PinnedBuffer {
                ptr: ptr.cast(),
                len,
                ctx,
            })
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes. Read them only after the copies into them have run (see
    /// [`SideStream::copy_to_host`]).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes allocated by `new` and owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let freed = guard("cuMemFreeHost", || {
            bind(&self.ctx)?;
            // SAFETY: allocated by `malloc_host` and never used again.
            unsafe { result::free_host(self.ptr.cast()) }.map_err(cuda_err("cuMemFreeHost"))
        });
        if let Err(e) = freed {
            tracing::warn!("failed to free a pinned host buffer: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU every entry point says `Unavailable`; with one, a copy round-trips.
    #[test]
    fn unavailable_without_gpu_else_a_copy_round_trips() {
        match cuda_available() {
            Err(NcclError::Unavailable(msg)) => {
                assert!(msg.contains("libcuda") || msg.contains("CUDA device"), "{msg}");
                let unavailable = |e: NcclError| assert!(e.is_unavailable(), "{e}");
                unavailable(SideStream::new(0).unwrap_err());
                unavailable(PinnedBuffer::new(0, 16).unwrap_err());
                unavailable(wait_for_compute(0, Duration::from_secs(1)).unwrap_err());
            }
            Err(e) => panic!("the availability check may only fail with Unavailable: {e}"),
            Ok(()) => {
                let side = SideStream::new(0).expect("side stream");
                let host: Vec<u8> = (0..=255).collect();
                let dev = side.compute.clone_htod(&host).expect("upload");
                let mut pinned = PinnedBuffer::new(0, 512).expect("pinned");
                let (ptr, _sync) = cudarc::driver::DevicePtr::device_ptr(&dev, &side.compute);
                side.after_compute().expect("order");
                // SAFETY: `dev` holds 256 bytes and lives until the synchronize below.
                unsafe { side.copy_to_host(ptr, &mut pinned, 256, 256) }.expect("copy");
                let done = side.mark().expect("mark");
                done.wait().expect("wait");
                assert!(done.is_done().unwrap());
                assert_eq!(&pinned.as_slice()[256..], host.as_slice());
                wait_for_compute(0, Duration::from_secs(60)).expect("an idle compute stream");
                // SAFETY: as above; the range check runs before anything is queued.
                let e = unsafe { side.copy_to_host(ptr, &mut pinned, 400, 256) }.unwrap_err();
                assert!(matches!(e, NcclError::InvalidArgument { .. }), "{e}");
            }
        }
    }
}
