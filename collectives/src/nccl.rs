//! NCCL backend for GPU buffers.
//!
//! Compiled into every build: `cudarc` is built with `dynamic-loading`, so nothing links against
//! `libcuda` or `libnccl` at build time and the binary runs on machines without either; the
//! libraries are opened on first use. cudarc *panics* when a library or symbol is missing, so
//! every entry point first runs [`nccl_available`] (which probes the same library names cudarc
//! will open) and wraps its calls in `catch_unwind`. Without a GPU, driver or `libnccl.so` the
//! result is a typed [`NcclError::Unavailable`] naming what is missing, never a panic.
//!
//! Operations take raw device pointers (`CUdeviceptr` as `u64`) instead of a tensor type, so
//! any tensor library can use them (tch: `data_ptr()`, cudarc: `device_ptr()`) and this crate
//! depends on none; that is also why they are `unsafe fn`: the pointers cannot be checked. Work
//! is enqueued on the device's legacy default stream, which torch also uses by default, so it
//! runs after the kernels that produced the data; [`NcclCommunicator::synchronize`] waits.
//!
//! [`device_all_reduce_self_test`] uses a world-size-1 communicator. On a single-GPU host that
//! is all that can be proved: the libraries load, a communicator initializes, NCCL accepts the
//! dtype/op mapping, its kernels run on device memory and leave the data intact, and how long
//! an all_reduce takes. Moving data between GPUs needs two GPUs or two hosts.

use crate::dtype::{DType, ReduceOp};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DriverError};
use cudarc::nccl::{result as nres, sys};
use serde::Serialize;
use std::ffi::{CStr, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::null_mut;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error("NCCL is not available on this machine: {0}")]
    Unavailable(String),
    /// An NCCL call failed; `code` is the `ncclResult_t` name, `detail` NCCL's own message.
    #[error("{op} failed with {code}: {detail}")]
    Call {
        op: &'static str,
        code: String,
        detail: String,
    },
    /// A CUDA driver call failed; `code` is the `CUresult` name.
    #[error("CUDA driver call {op} failed with {code}")]
    Cuda { op: &'static str, code: String },
    #[error("invalid argument to {op}: {message}")]
    InvalidArgument { op: &'static str, message: String },
    /// A call did not finish in time: a peer never joined, died, or is stuck.
    #[error(
        "{op} did not complete within {waited:?} on NCCL rank {rank} of {world} (a peer has not joined, has died or is stuck)"
    )]
    Timeout {
        op: &'static str,
        rank: usize,
        world: usize,
        waited: std::time::Duration,
    },
    /// Device work did not finish in time: a kernel that never ends, typically an NCCL
    /// collective whose peer died or stalled.
    #[error(
        "{op} did not finish within {waited:?} (a kernel never ended: an NCCL collective whose peer died or is stuck?)"
    )]
    DeviceTimeout {
        op: &'static str,
        waited: std::time::Duration,
    },
    /// cudarc panicked (e.g. a symbol missing from an old library); caught at the boundary.
    #[error("the CUDA/NCCL bindings panicked during {op}: {message}")]
    Panicked { op: &'static str, message: String },
}

impl NcclError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, NcclError::Unavailable(_))
    }
}

pub type NcclResult<T = ()> = Result<T, NcclError>;
type Status = Result<nres::NcclStatus, nres::NcclError>;

/// Runs `f`, turning a panic inside cudarc into [`NcclError::Panicked`].
pub(crate) fn guard<T>(op: &'static str, f: impl FnOnce() -> NcclResult<T>) -> NcclResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = (payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        Err(NcclError::Panicked { op, message })
    })
}

pub(crate) fn cuda_err(op: &'static str) -> impl FnOnce(DriverError) -> NcclError {
    move |e| NcclError::Cuda {
        op,
        code: format!("{:?}", e.0),
    }
}

pub(crate) fn bind(ctx: &CudaContext) -> NcclResult {
    ctx.bind_to_thread().map_err(cuda_err("cuCtxSetCurrent"))
}

pub(crate) fn invalid(op: &'static str, message: impl Into<String>) -> NcclError {
    NcclError::InvalidArgument {
        op,
        message: message.into(),
    }
}

/// Maps an NCCL status to `()` or [`NcclError::Call`].
fn check(op: &'static str, comm: sys::ncclComm_t, status: Status) -> NcclResult {
    status.map(drop).map_err(|e| nccl_err(op, comm, e))
}

/// [`NcclError::Call`] with NCCL's last error message (or the code's description) as detail.
fn nccl_err(op: &'static str, comm: sys::ncclComm_t, e: nres::NcclError) -> NcclError {
    // SAFETY: both return NULL or a NUL-terminated string owned by NCCL, copied out at once;
    // `comm` is NULL or a live communicator.
    let detail = unsafe {
        let mut s = sys::ncclGetLastError(comm);
        if s.is_null() || *s == 0 {
            s = sys::ncclGetErrorString(e.0);
        }
        (!s.is_null()).then(|| CStr::from_ptr(s).to_string_lossy().into())
    };
    let code = format!("{:?}", e.0);
    NcclError::Call {
        op,
        code,
        detail: detail.unwrap_or_default(),
    }
}

/// Whether a shared library can be opened by exactly this name (only used for a hint).
fn dl_loadable(name: &CStr) -> bool {
    // SAFETY: `name` is NUL-terminated and a handle we get is closed right away. Loading runs
    // the library's initializers, as cudarc's own probe does.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        !handle.is_null() && libc::dlclose(handle) == 0
    }
}

/// Checks, without panicking, that the CUDA driver and `libnccl.so` load and that there is at
/// least one CUDA device; the error names what is missing.
pub fn nccl_available() -> NcclResult {
    crate::cuda::cuda_available()?;
    guard("nccl_available", || {
        // SAFETY: dlopens (and closes) cudarc's NCCL names (libnccl.so, libnccl.so.13, ...;
        // not .so.2).
        if unsafe { sys::is_culib_present() } {
            return Ok(());
        }
        let hint = if dl_loadable(c"libnccl.so.2") {
            "; libnccl.so.2 loads but cudarc opens libnccl.so: add a symlink libnccl.so -> \
             libnccl.so.2 in a directory on LD_LIBRARY_PATH"
        } else {
            " (set LD_LIBRARY_PATH to the directory holding libnccl.so, e.g. torch's \
             nvidia/nccl/lib, or install NCCL)"
        };
        let msg = format!("libnccl.so not found in the library path{hint}");
        Err(NcclError::Unavailable(msg))
    })
}

/// The NCCL library version as "major.minor.patch".
pub fn nccl_version() -> NcclResult<String> {
    nccl_available()?;
    let v = guard("ncclGetVersion", || {
        nres::get_nccl_version().map_err(|e| nccl_err("ncclGetVersion", null_mut(), e))
    })?;
    // Since NCCL 2.9 the code is major * 10000 + minor * 100 + patch.
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

/// The bytes of an `ncclUniqueId`: made by one rank, sent to the others through the rendezvous
/// store, and passed by every rank to [`NcclCommunicator::new`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclUniqueId(pub [u8; NcclUniqueId::LEN]);

const _: () = assert!(std::mem::size_of::<sys::ncclUniqueId>() == NcclUniqueId::LEN);

impl NcclUniqueId {
    /// `NCCL_UNIQUE_ID_BYTES`.
    pub const LEN: usize = 128;

    /// Calls `ncclGetUniqueId` (after the availability check).
    pub fn new() -> NcclResult<Self> {
        nccl_available()?;
        let id = guard("ncclGetUniqueId", || {
            nres::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", null_mut(), e))
        })?;
        Ok(NcclUniqueId(id.internal.map(|c| c as u8)))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    pub fn from_bytes(bytes: &[u8]) -> NcclResult<Self> {
        let got = bytes.len();
        let msg = || format!("expected {} bytes, got {got}", Self::LEN);
        let id = bytes
            .try_into()
            .map_err(|_| invalid("NcclUniqueId::from_bytes", msg()))?;
        Ok(NcclUniqueId(id))
    }

    fn to_sys(self) -> sys::ncclUniqueId {
        sys::ncclUniqueId {
            internal: self.0.map(|b| b as std::ffi::c_char),
        }
    }
}

impl std::fmt::Debug for NcclUniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head: String = self.0[..8].iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "NcclUniqueId({head}..)")
    }
}

fn nccl_dtype(d: DType) -> sys::ncclDataType_t {
    use sys::ncclDataType_t as T;
    match d {
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        DType::F16 => T::ncclFloat16,
        DType::BF16 => T::ncclBfloat16,
        DType::I32 => T::ncclInt32,
        DType::I64 => T::ncclInt64,
        DType::U8 => T::ncclUint8,
    }
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    use sys::ncclRedOp_t as O;
    match op {
        ReduceOp::Sum => O::ncclSum,
        ReduceOp::Avg => O::ncclAvg,
        ReduceOp::Max => O::ncclMax,
        ReduceOp::Min => O::ncclMin,
        ReduceOp::Product => O::ncclProd,
    }
}

/// One NCCL operation with its op and root/peer argument.
#[derive(Clone, Copy)]
enum Coll {
    AllReduce(ReduceOp),
    Broadcast(usize),
    Reduce(ReduceOp, usize),
    AllGather,
    ReduceScatter(ReduceOp),
    Send(usize),
    Recv(usize),
}

/// One rank's NCCL communicator on one device, plus the stream its work is enqueued on.
///
/// Created non-blocking, so no call can hang: initialization and every operation that NCCL
/// reports as still in progress are polled until done or until the communicator's deadline,
/// then aborted with [`NcclError::Timeout`] naming the operation and the rank.
/// Dropping it calls `ncclCommAbort`, which is local and cannot hang on a dead peer (a failure
/// is logged, never panicked on). [`NcclCommunicator::destroy`] is the graceful, collective way.
#[derive(Debug)]
pub struct NcclCommunicator {
    comm: sys::ncclComm_t,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    deadline: Duration,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time; each call binds the
// CUDA context first. The type is not `Sync`, so calls cannot overlap.
unsafe impl Send for NcclCommunicator {}

/// `NCCL_CONFIG_UNDEF_INT`: "NCCL chooses".
const CONFIG_UNDEF: c_int = c_int::MIN;

/// `NCCL_CONFIG_INITIALIZER` (nccl.h 2.28) with `blocking = 0`: every field NCCL's default,
/// stamped with the struct's size, magic and version so the library knows which fields exist.
fn nonblocking_config() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // NCCL_VERSION(2, 28, 0): the header version these bindings (and this struct) are from.
        version: 22800,
        blocking: 0,
        cgaClusterSize: CONFIG_UNDEF,
        minCTAs: CONFIG_UNDEF,
        maxCTAs: CONFIG_UNDEF,
        netName: std::ptr::null(),
        splitShare: CONFIG_UNDEF,
        trafficClass: CONFIG_UNDEF,
        commName: std::ptr::null(),
        collnetEnable: CONFIG_UNDEF,
        CTAPolicy: CONFIG_UNDEF,
        shrinkShare: CONFIG_UNDEF,
        nvlsCTAs: CONFIG_UNDEF,
        nChannelsPerNetPeer: CONFIG_UNDEF,
        nvlinkCentricSched: CONFIG_UNDEF,
    }
}

/// Polls a non-blocking communicator until the call in progress on it has finished, failed,
/// or run past `deadline` (counted from `started`).
fn settle(
    op: &'static str,
    comm: sys::ncclComm_t,
    started: Instant,
    deadline: Duration,
    who: (usize, usize),
) -> NcclResult {
    loop {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is live and `state` a valid out-pointer.
        let r = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        check("ncclCommGetAsyncError", comm, r.result())?;
        if state != sys::ncclResult_t::ncclInProgress {
            return check(op, comm, state.result());
        }
        if started.elapsed() >= deadline {
            let (rank, world) = who;
            return Err(NcclError::Timeout {
                op,
                rank,
                world,
                waited: started.elapsed(),
            });
        }
        std::thread::yield_now();
    }
}

impl NcclCommunicator {
    /// `ncclCommInitRankConfig` (non-blocking) for `rank` of `world` on CUDA device
    /// `device_ordinal` (its primary context, which torch shares). Returns once all `world`
    /// ranks have called it with `id`, or fails with [`NcclError::Timeout`] after `deadline`
    /// (the communicator is aborted). `deadline` also bounds every later call.
    pub fn new(
        device_ordinal: usize,
        rank: usize,
        world: usize,
        id: &NcclUniqueId,
        deadline: Duration,
    ) -> NcclResult<Self> {
        const OP: &str = "ncclCommInitRankConfig";
        let nranks = c_int::try_from(world).map_err(|_| invalid(OP, "world size too large"))?;
        if rank >= world {
            return Err(invalid(OP, format!("rank {rank} >= world size {world}")));
        }
        nccl_available()?;
        let ctx = crate::cuda::primary_context(device_ordinal)?;
        guard(OP, || {
            // NCCL takes the device from the current context.
            bind(&ctx)?;
            let stream = ctx.default_stream();
            let mut comm: sys::ncclComm_t = null_mut();
            let mut config = nonblocking_config();
            let started = Instant::now();
            // SAFETY: `comm` and `config` are valid pointers, the id plain bytes.
            let status =
                unsafe { nres::comm_init_rank_config(&mut comm, nranks, id.to_sys(), rank as c_int, &mut config) };
            let made = NcclCommunicator {
                comm,
                ctx: ctx.clone(),
                stream,
                rank,
                world,
                deadline,
            };
            if comm.is_null() {
                check(OP, null_mut(), status)?;
                return Err(invalid(OP, "NCCL returned no communicator"));
            }
            // From here `made` owns `comm`: an error drops it, which aborts the communicator.
            check(OP, comm, status)?;
            settle(OP, comm, started, deadline, (rank, world))?;
            Ok(made)
        })
    }

    /// Enqueue this communicator's work on `side` (a stream of the same device) instead of the
    /// compute stream, so it overlaps compute; order it with the side stream's events.
    pub fn use_stream(&mut self, side: &crate::cuda::SideStream) -> NcclResult {
        if side.device_ordinal() != self.device_ordinal() {
            let (theirs, ours) = (side.device_ordinal(), self.device_ordinal());
            return Err(invalid(
                "use_stream",
                format!("a stream of device {theirs} for a communicator of device {ours}"),
            ));
        }
        self.stream = side.stream().clone();
        Ok(())
    }

    /// Maps a call's status: an error as [`check`] does, "in progress" polled to the end.
    fn complete(&self, op: &'static str, status: Status, started: Instant) -> NcclResult {
        match status {
            Ok(nres::NcclStatus::InProgress) => settle(op, self.comm, started, self.deadline, (self.rank, self.world)),
            other => check(op, self.comm, other),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn device_ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The stream operations are enqueued on (the device's legacy default stream unless
    /// [`Self::use_stream`] chose another).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Checks the arguments, binds the context and enqueues one NCCL call.
    fn enqueue(&self, coll: Coll, send: u64, recv: u64, count: usize, dtype: DType) -> NcclResult {
        let world = self.world;
        let all = count
            .checked_mul(world)
            .filter(|n| n.checked_mul(dtype.size()).is_some());
        // (name, elements at send, elements at recv, root or peer)
        let (op, send_n, recv_n, peer) = match coll {
            Coll::AllReduce(_) => ("ncclAllReduce", count, count, None),
            Coll::Broadcast(root) => ("ncclBroadcast", count, count, Some(root)),
            Coll::Reduce(_, root) => ("ncclReduce", count, count, Some(root)),
            Coll::AllGather => ("ncclAllGather", count, all.unwrap_or(0), None),
            Coll::ReduceScatter(_) => ("ncclReduceScatter", all.unwrap_or(0), count, None),
            Coll::Send(peer) => ("ncclSend", count, 0, Some(peer)),
            Coll::Recv(peer) => ("ncclRecv", 0, count, Some(peer)),
        };
        if all.is_none() {
            return Err(invalid(op, format!("{count} x {world} {dtype} overflows")));
        }
        if (send == 0 && send_n > 0) || (recv == 0 && recv_n > 0) {
            return Err(invalid(op, "null device pointer"));
        }
        if let Some(p) = peer.filter(|&p| p >= world) {
            return Err(invalid(op, format!("rank {p} >= world size {world}")));
        }
        let (s, r) = (send as *const c_void, recv as *mut c_void);
        let t = nccl_dtype(dtype);
        let started = Instant::now();
        guard(op, || {
            bind(&self.ctx)?;
            let (c, st) = (self.comm, self.stream.cu_stream() as sys::cudaStream_t);
            // SAFETY: `c` is live, `st` a stream of its device, whose context is current; the
            // buffers are valid per the caller's contract; ranks are below `world`, a c_int.
            let status = unsafe {
                match coll {
                    Coll::AllReduce(o) => nres::all_reduce(s, r, count, t, nccl_op(o), c, st),
                    Coll::Broadcast(root) => nres::broadcast(s, r, count, t, root as c_int, c, st),
                    Coll::Reduce(o, root) => nres::reduce(s, r, count, t, nccl_op(o), root as c_int, c, st),
                    Coll::AllGather => nres::all_gather(s, r, count, t, c, st),
                    Coll::ReduceScatter(o) => nres::reduce_scatter(s, r, count, t, nccl_op(o), c, st),
                    Coll::Send(peer) => nres::send(s, count, t, peer as c_int, c, st),
                    Coll::Recv(peer) => nres::recv(r, count, t, peer as c_int, c, st),
                }
            };
            self.complete(op, status, started)
        })
    }

    /// All-reduce `count` elements from `send` into `recv`; `send == recv` is in place.
    ///
    /// # Safety
    /// The pointers must be device memory of this communicator's device, valid for the
    /// elements the operation touches and neither freed nor reused until
    /// [`Self::synchronize`] returns (or later work on the same stream is ordered after it).
    /// The same holds for every operation below.
    pub unsafe fn all_reduce(&self, send: u64, recv: u64, count: usize, dtype: DType, op: ReduceOp) -> NcclResult {
        self.enqueue(Coll::AllReduce(op), send, recv, count, dtype)
    }

    /// Broadcast `count` elements of `buf` from rank `root` to every rank, in place.
    /// # Safety
    /// As for [`Self::all_reduce`].
    pub unsafe fn broadcast(&self, buf: u64, count: usize, dtype: DType, root: usize) -> NcclResult {
        self.enqueue(Coll::Broadcast(root), buf, buf, count, dtype)
    }

    /// Reduce `count` elements of every rank's `send` into `recv` on rank `root` only.
    /// # Safety
    /// As for [`Self::all_reduce`].
    pub unsafe fn reduce(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        root: usize,
    ) -> NcclResult {
        self.enqueue(Coll::Reduce(op, root), send, recv, count, dtype)
    }

    /// Gather `count_per_rank` elements from every rank into `recv` (`count_per_rank * world`
    /// elements, rank-major) on every rank.
    /// # Safety
    /// As for [`Self::all_reduce`].
    pub unsafe fn all_gather(&self, send: u64, recv: u64, count_per_rank: usize, dtype: DType) -> NcclResult {
        self.enqueue(Coll::AllGather, send, recv, count_per_rank, dtype)
    }

    /// Reduce `send` (`count_per_rank * world` elements) across ranks; leave block `rank` of
    /// the result in `recv` (`count_per_rank` elements).
    /// # Safety
    /// As for [`Self::all_reduce`].
    pub unsafe fn reduce_scatter(
        &self,
        send: u64,
        recv: u64,
        count_per_rank: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> NcclResult {
        self.enqueue(Coll::ReduceScatter(op), send, recv, count_per_rank, dtype)
    }

    /// Send `count` elements to `peer`. A send and a receive that must progress together (an
    /// exchange between two ranks) belong in one [`Self::group`].
    /// # Safety
    /// As for [`Self::all_reduce`].
    pub unsafe fn send(&self, buf: u64, count: usize, dtype: DType, peer: usize) -> NcclResult {
        self.enqueue(Coll::Send(peer), buf, 0, count, dtype)
    }

    /// Receive `count` elements from `peer` into `buf`.
    /// # Safety
    /// As for [`Self::all_reduce`].
    pub unsafe fn recv(&self, buf: u64, count: usize, dtype: DType, peer: usize) -> NcclResult {
        self.enqueue(Coll::Recv(peer), 0, buf, count, dtype)
    }

    /// Runs `f` between `ncclGroupStart` and `ncclGroupEnd`; the end is always called.
    pub fn group<R>(&self, f: impl FnOnce(&Self) -> NcclResult<R>) -> NcclResult<R> {
        let (start, end) = ("ncclGroupStart", "ncclGroupEnd");
        guard(start, || check(start, self.comm, nres::group_start()))?;
        let r = f(self);
        let started = Instant::now();
        let ended = guard(end, || self.complete(end, nres::group_end(), started));
        r.and_then(|r| ended.map(|_| r))
    }

    /// Waits for all enqueued work, then reports any asynchronous NCCL error. Polls rather
    /// than blocks in the driver, so a peer that died mid-collective (its kernels would spin
    /// forever) ends in [`NcclError::Timeout`] after the communicator's deadline.
    pub fn synchronize(&self) -> NcclResult {
        const OP: &str = "synchronize";
        let started = Instant::now();
        guard(OP, || {
            bind(&self.ctx)?;
            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
            let event = self.stream.record_event(flags).map_err(cuda_err("cuEventRecord"))?;
            loop {
                let mut state = sys::ncclResult_t::ncclSuccess;
                // SAFETY: `self.comm` is live and `state` a valid out-pointer.
                let r = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
                check("ncclCommGetAsyncError", self.comm, r.result())?;
                check("asynchronous NCCL operation", self.comm, state.result())?;
                // SAFETY: the event is live until the end of this function.
                match unsafe { cudarc::driver::result::event::query(event.cu_event()) } {
                    Ok(()) => return Ok(()),
                    Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                    Err(e) => return Err(cuda_err("cuEventQuery")(e)),
                }
                if started.elapsed() >= self.deadline {
                    let (rank, world, waited) = (self.rank, self.world, started.elapsed());
                    return Err(NcclError::Timeout {
                        op: OP,
                        rank,
                        world,
                        waited,
                    });
                }
                std::thread::sleep(Duration::from_micros(20));
            }
        })
    }

    /// Graceful teardown: `ncclCommFinalize` then `ncclCommDestroy`. Collective: all ranks on
    /// the node must call it or it may hang. Dropping aborts instead.
    pub fn destroy(mut self) -> NcclResult {
        let comm = self.comm;
        guard("ncclCommDestroy", || {
            bind(&self.ctx)?;
            // SAFETY: `comm` is live. If finalizing fails it stays set and `Drop` aborts it.
            let started = Instant::now();
            let status = unsafe { nres::comm_finalize(comm) };
            self.complete("ncclCommFinalize", status, started)?;
            self.comm = null_mut();
            // SAFETY: finalized above and never used again (`Drop` skips a NULL handle).
            let status = unsafe { nres::comm_destroy(comm) };
            check("ncclCommDestroy", null_mut(), status)
        })
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        let r = guard("ncclCommAbort", || {
            bind(&self.ctx)?;
            // SAFETY: `self.comm` is live and never used again.
            let status = unsafe { nres::comm_abort(self.comm) };
            check("ncclCommAbort", null_mut(), status)
        });
        if let Err(e) = r {
            tracing::warn!("failed to abort NCCL communicator: {e}");
        }
    }
}

/// What [`device_all_reduce_self_test`] found.
#[derive(Clone, Debug, Serialize)]
pub struct SelfTestReport {
    /// Every reduce op left the data intact (over one rank each is the identity).
    pub ok: bool,
    pub count: usize,
    pub bytes: usize,
    /// Elements that differed from what was uploaded, summed over the ops.
    pub mismatches: usize,
    /// Number of timed in-place f32 sum all_reduces of `count` elements.
    pub iterations: usize,
    pub avg_us: f64,
    pub nccl_version: Option<String>,
    pub device_name: Option<String>,
}

const SELF_TEST_ITERATIONS: usize = 20;
/// World size 1 has no peer to wait for: anything this slow is a broken driver.
const SELF_TEST_DEADLINE: Duration = Duration::from_secs(60);

/// World-size-1 check of the whole path on device 0: upload `count` f32, all_reduce them in
/// place with every [`ReduceOp`], download and compare, then time `SELF_TEST_ITERATIONS` (20)
/// sum all_reduces. [`NcclError::Unavailable`] where there is no GPU or NCCL.
pub fn device_all_reduce_self_test(count: usize) -> NcclResult<SelfTestReport> {
    const OP: &str = "device_all_reduce_self_test";
    if count == 0 {
        return Err(invalid(OP, "count must be positive"));
    }
    nccl_available()?;
    let comm = NcclCommunicator::new(0, 0, 1, &NcclUniqueId::new()?, SELF_TEST_DEADLINE)?;
    let stream = comm.stream().clone();
    // Small integers: exact in f32 and unchanged by sum/avg/max/min/product over one rank.
    let host: Vec<f32> = (0..count).map(|i| (i % 251) as f32 - 125.0).collect();
    let report = guard(OP, || {
        let buf = stream.clone_htod(host.as_slice());
        let buf = buf.map_err(cuda_err("cuMemcpyHtoDAsync"))?;
        let ptr = buf.device_ptr(&stream).0;
        let mut mismatches = 0;
        for op in ReduceOp::ALL {
            // SAFETY: `buf` holds `count` f32 on device 0 and outlives the synchronize below.
            unsafe { comm.all_reduce(ptr, ptr, count, DType::F32, op)? };
            comm.synchronize()?;
            let back = stream.clone_dtoh(&buf).map_err(cuda_err("cuMemcpyDtoHAsync"));
            let back = back?;
            mismatches += back.iter().zip(&host).filter(|(a, b)| a != b).count();
        }
        let start = Instant::now();
        for _ in 0..SELF_TEST_ITERATIONS {
            // SAFETY: as above.
            unsafe { comm.all_reduce(ptr, ptr, count, DType::F32, ReduceOp::Sum)? };
        }
        comm.synchronize()?;
        Ok(SelfTestReport {
            ok: mismatches == 0,
            count,
            bytes: count * DType::F32.size(),
            mismatches,
            iterations: SELF_TEST_ITERATIONS,
            avg_us: start.elapsed().as_secs_f64() * 1e6 / SELF_TEST_ITERATIONS as f64,
            nccl_version: nccl_version().ok(),
            device_name: comm.ctx.name().ok(),
        })
    })?;
    comm.destroy()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::{ncclDataType_t as T, ncclRedOp_t as O};

    #[test]
    fn dtype_and_op_mapping() {
        let dtypes = [
            (DType::F32, T::ncclFloat32),
            (DType::F64, T::ncclFloat64),
            (DType::F16, T::ncclFloat16),
            (DType::BF16, T::ncclBfloat16),
            (DType::I32, T::ncclInt32),
            (DType::I64, T::ncclInt64),
            (DType::U8, T::ncclUint8),
        ];
        assert_eq!(dtypes.map(|(d, _)| d), DType::ALL);
        for (d, t) in dtypes {
            assert_eq!(nccl_dtype(d), t, "{d}");
        }
        let ops = [
            (ReduceOp::Sum, O::ncclSum),
            (ReduceOp::Avg, O::ncclAvg),
            (ReduceOp::Max, O::ncclMax),
            (ReduceOp::Min, O::ncclMin),
            (ReduceOp::Product, O::ncclProd),
        ];
        assert_eq!(ops.map(|(o, _)| o), ReduceOp::ALL);
        for (o, n) in ops {
            assert_eq!(nccl_op(o), n, "{o}");
        }
    }

    /// `NCCL_CONFIG_INITIALIZER` as nccl.h 2.28 spells it, with `blocking = 0`.
    #[test]
    fn the_config_is_nccls_initializer_made_non_blocking() {
        let c = nonblocking_config();
        assert_eq!(
            (c.size, c.magic, c.version),
            (std::mem::size_of::<sys::ncclConfig_t>(), 0xcafe_beef, 22800)
        );
        assert_eq!(c.blocking, 0);
        let undefined = [
            c.cgaClusterSize,
            c.minCTAs,
            c.maxCTAs,
            c.splitShare,
            c.trafficClass,
            c.collnetEnable,
            c.CTAPolicy,
            c.shrinkShare,
            c.nvlsCTAs,
            c.nChannelsPerNetPeer,
            c.nvlinkCentricSched,
        ];
        assert!(undefined.iter().all(|&v| v == i32::MIN), "{undefined:?}");
        assert!(c.netName.is_null() && c.commName.is_null());
    }

    #[test]
    fn unique_id_round_trips_through_bytes() {
        let id = NcclUniqueId(std::array::from_fn(|i| (i * 7) as u8));
        assert_eq!(NcclUniqueId::from_bytes(&id.to_bytes()).unwrap(), id);
        assert_eq!(NcclUniqueId(id.to_sys().internal.map(|c| c as u8)), id);
        let err = NcclUniqueId::from_bytes(&[0; 127]).unwrap_err();
        assert!(matches!(err, NcclError::InvalidArgument { .. }), "{err}");
    }

    #[test]
    fn bad_arguments_are_rejected_before_loading_anything() {
        let id = NcclUniqueId([0; NcclUniqueId::LEN]);
        let err = NcclCommunicator::new(0, 2, 2, &id, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, NcclError::InvalidArgument { .. }), "{err}");
        let err = device_all_reduce_self_test(0).unwrap_err();
        assert!(matches!(err, NcclError::InvalidArgument { .. }), "{err}");
    }

    /// Without a GPU every entry point says `Unavailable`; with one the self test must pass.
    #[test]
    fn unavailable_without_gpu_else_self_test_passes() {
        match nccl_available() {
            Err(NcclError::Unavailable(msg)) => {
                let named = ["libcuda", "libnccl.so", "no CUDA device"];
                assert!(named.iter().any(|m| msg.contains(m)), "names nothing: {msg}");
                let id = NcclUniqueId([0; NcclUniqueId::LEN]);
                let unavailable = |e: NcclError| assert!(e.is_unavailable(), "{e}");
                unavailable(NcclUniqueId::new().unwrap_err());
                unavailable(NcclCommunicator::new(0, 0, 1, &id, Duration::from_secs(1)).unwrap_err());
                unavailable(device_all_reduce_self_test(1024).unwrap_err());
                unavailable(nccl_version().unwrap_err());
            }
            Err(e) => panic!("the availability check may only fail with Unavailable: {e}"),
            Ok(()) => {
                let report = device_all_reduce_self_test(1 << 20).expect("self test");
                assert!(report.ok && report.nccl_version.is_some(), "{report:?}");
            }
        }
    }
}
