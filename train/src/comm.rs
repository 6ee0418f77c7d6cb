//! tch tensors over a group's communicators, the backend chosen by where a tensor lives.
//!
//! - CPU tensors go through the gantry [`Communicator`]: contiguous f32 and f64 tensors as
//!   slices of their own storage (no copies), other kinds through an f32 copy.
//! - CUDA tensors go through the group's NCCL twin ([`NcclCommunicator`], made by
//!   [`TensorComm::for_device`] for a group of more than one on a CUDA device), on device
//!   memory, in the tensor's own dtype, enqueued on the compute stream (the legacy default
//!   stream libtorch computes on). That stream orders NCCL with libtorch's kernels without
//!   events, and it is also why a temporary handed to NCCL may be dropped at once: the caching
//!   allocator hands its block only to later work on the same stream, which runs after NCCL.
//!   A group without an NCCL twin refuses CUDA tensors instead of staging them through host
//!   memory.
//! - Host values (`all_reduce_f64`, the `*_slice` calls) always use the gantry communicator.
//!
//! Every call adds its wall time to a shared counter so the trainer can report how much of a
//! step was spent waiting on communication; an NCCL call counts only its enqueueing, its
//! transfer overlaps the compute stream's queue and is paid at the step's host read.

use crate::error::TrainError;
use gantry_collectives::nccl::{NcclCommunicator, NcclError};
use gantry_collectives::{Communicator, DType, ReduceOp};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Seconds spent in communication calls on this thread, shared by the communicators of a rank.
#[derive(Clone, Default)]
pub struct CommClock(Rc<Cell<f64>>);

impl CommClock {
    pub fn seconds(&self) -> f64 {
        self.0.get()
    }
    pub fn add(&self, s: f64) {
        self.0.set(self.0.get() + s);
    }
    pub fn take(&self) -> f64 {
        self.0.replace(0.0)
    }
}

/// Which backend moves a group's tensors (and data parallelism's gradient buckets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A group of one: every operation is the identity.
    Local,
    /// The gantry collectives, on host memory.
    Host,
    /// NCCL, on device memory.
    Nccl,
}

/// The backend for a group of `group_size` ranks whose tensors live on `device`: NCCL for CUDA
/// devices, gantry's collectives otherwise, nothing for a group of one.
pub fn choose_backend(device: Device, group_size: usize) -> Backend {
    match device {
        _ if group_size <= 1 => Backend::Local,
        Device::Cuda(_) => Backend::Nccl,
        _ => Backend::Host,
    }
}

/// The NCCL dtype of a tensor kind, if NCCL has one.
pub(crate) fn nccl_dtype(kind: Kind) -> Option<DType> {
    Some(match kind {
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::BF16,
        Kind::Int => DType::I32,
        Kind::Int64 => DType::I64,
        Kind::Uint8 => DType::U8,
        _ => return None,
    })
}

/// A communicator for tensors. `None` inside means a group of one: every op is the identity
/// and costs nothing, so layers need no special cases for "not parallel".
pub struct TensorComm {
    comm: Option<Communicator>,
    /// The group's NCCL twin, for its CUDA tensors (see the module notes).
    nccl: Option<NcclCommunicator>,
    clock: CommClock,
}

/// The elements of a contiguous CPU tensor of kind `T::KIND`. The tensor must stay alive and
/// unaliased by other writers while the slice is used (the callers hold `&mut Tensor` or a
/// fresh tensor).
fn host_slice_mut<T: tch::kind::Element>(t: &mut Tensor) -> &mut [T] {
    assert!(t.device() == Device::Cpu && t.kind() == T::KIND && t.is_contiguous());
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: a contiguous CPU tensor of kind `T::KIND` owns `numel` `T` values at data_ptr,
    // and the exclusive borrow of the handle keeps this the only access path for the slice's
    // lifetime.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) }
}

/// Run `f` on a host copy (or view) of `t` as `T` values and write the result back into `t`.
fn with_host<T: tch::kind::Element, R>(t: &mut Tensor, f: impl FnOnce(&mut [T]) -> R) -> R {
    if t.device() == Device::Cpu && t.kind() == T::KIND && t.is_contiguous() {
        return f(host_slice_mut(t));
    }
    let mut host = t.to_device(Device::Cpu).to_kind(T::KIND).contiguous();
    let r = f(host_slice_mut(&mut host));
    tch::no_grad(|| t.copy_(&host));
    r
}

/// The host kind a tensor is reduced in: f64 stays f64 (a sum of squares must not lose its
/// precision), everything else goes through f32.
fn host_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

impl TensorComm {
    /// A communicator for host tensors (and host values). CUDA tensors need
    /// [`TensorComm::for_device`].
    pub fn new(comm: Option<Communicator>, clock: CommClock) -> TensorComm {
        let comm = comm.filter(|c| c.size() > 1);
        TensorComm {
            comm,
            nccl: None,
            clock,
        }
    }

    /// A communicator for tensors on `device`: for a CUDA device and a group of more than one,
    /// this also makes the group's NCCL twin (collective over the group: every member must
    /// call it, and it is bounded by the fabric's join timeout). Fails, naming the group and
    /// why, where that twin cannot be made.
    pub fn for_device(comm: Option<Communicator>, clock: CommClock, device: Device) -> Result<TensorComm, TrainError> {
        let mut made = TensorComm::new(comm, clock);
        if let (Backend::Nccl, Some(c), Device::Cuda(ordinal)) =
            (choose_backend(device, made.size()), &made.comm, device)
        {
            let nccl = c.nccl_peer(ordinal).map_err(|source| TrainError::NcclSetup {
                rank: c.members()[c.rank()],
                group: c.name().to_string(),
                source,
            })?;
            made.nccl = Some(nccl);
        }
        Ok(made)
    }

    pub fn size(&self) -> usize {
        self.comm.as_ref().map_or(1, Communicator::size)
    }

    pub fn rank(&self) -> usize {
        self.comm.as_ref().map_or(0, Communicator::rank)
    }

    pub fn is_trivial(&self) -> bool {
        self.comm.is_none()
    }

    /// The group's per-call deadline; `None` for a group of one (no peer to wait for).
    pub fn timeout(&self) -> Option<std::time::Duration> {
        self.comm.as_ref().map(Communicator::timeout)
    }

    /// Whether CUDA tensors of this group go through NCCL.
    pub fn has_nccl(&self) -> bool {
        self.nccl.is_some()
    }

    pub fn clock(&self) -> &CommClock {
        &self.clock
    }

    fn timed<R>(&mut self, f: impl FnOnce(&mut Communicator) -> R) -> Option<R> {
        let comm = self.comm.as_mut()?;
        let t0 = Instant::now();
        let r = f(comm);
        self.clock.add(t0.elapsed().as_secs_f64());
        Some(r)
    }

    /// The group's NCCL twin for `op` on a tensor of `device` (`None`: not a CUDA tensor), or
    /// the error that this group has none.
    fn nccl_for(&self, device: Device, op: &'static str) -> Result<Option<&NcclCommunicator>, TrainError> {
        let Device::Cuda(ordinal) = device else { return Ok(None) };
        let (rank, group) = self.who();
        match &self.nccl {
            Some(n) if n.device_ordinal() == ordinal => Ok(Some(n)),
            Some(n) => Err(TrainError::NcclMisuse {
                rank,
                group,
                op,
                why: format!(
                    "the tensor is on CUDA device {ordinal}, the communicator on {}",
                    n.device_ordinal()
                ),
            }),
            None => Err(TrainError::NcclMisuse {
                rank,
                group,
                op,
                why: "CUDA tensors need the group's NCCL communicator and this group was built without one \
                      (TensorComm::new instead of TensorComm::for_device)"
                    .into(),
            }),
        }
    }

    /// This rank's global rank and the group's name, for errors.
    fn who(&self) -> (usize, String) {
        self.comm
            .as_ref()
            .map_or((0, String::new()), |c| (c.members()[c.rank()], c.name().to_string()))
    }

    fn nccl_failed(&self, op: &'static str) -> impl FnOnce(NcclError) -> TrainError {
        let (rank, group) = self.who();
        move |source| TrainError::Nccl {
            rank,
            group,
            op,
            source,
        }
    }

    /// All-reduce a tensor's values in place (no autograd involvement).
    pub fn all_reduce_(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), TrainError> {
        if self.comm.is_none() {
            return Ok(());
        }
        let t0 = Instant::now();
        let r = match self.nccl_for(t.device(), "all_reduce")? {
            Some(nccl) => self.nccl_all_reduce(nccl, t, op),
            None => {
                let comm = self.comm.as_mut().expect("checked above");
                let r = match host_kind(t.kind()) {
                    Kind::Double => with_host(t, |s: &mut [f64]| comm.all_reduce_in_place(s, op)),
                    _ => with_host(t, |s: &mut [f32]| comm.all_reduce_in_place(s, op)),
                };
                r.map_err(TrainError::from)
            }
        };
        self.clock.add(t0.elapsed().as_secs_f64());
        r
    }

    /// In place on a CUDA tensor, in its own dtype (through a contiguous copy if it is not).
    fn nccl_all_reduce(&self, nccl: &NcclCommunicator, t: &mut Tensor, op: ReduceOp) -> Result<(), TrainError> {
        const OP: &str = "all_reduce";
        let dtype = self.device_dtype(t, OP)?;
        let buf = if t.is_contiguous() {
            t.shallow_clone()
        } else {
            t.f_contiguous()?
        };
        let ptr = buf.data_ptr() as u64;
        // SAFETY: `buf` is contiguous device memory of `numel` elements of `dtype` on the
        // communicator's device; NCCL runs on the compute stream, so everything that reads or
        // reuses the memory later is queued after it.
        unsafe { nccl.all_reduce(ptr, ptr, buf.numel(), dtype, op) }.map_err(self.nccl_failed(OP))?;
        if !t.is_contiguous() {
            tch::no_grad(|| t.f_copy_(&buf))?;
        }
        Ok(())
    }

    /// `t`'s NCCL dtype, or an error naming the kind NCCL cannot carry.
    fn device_dtype(&self, t: &Tensor, op: &'static str) -> Result<DType, TrainError> {
        nccl_dtype(t.kind()).ok_or_else(|| {
            let (rank, group) = self.who();
            TrainError::NcclMisuse {
                rank,
                group,
                op,
                why: format!("NCCL has no dtype for {:?} tensors", t.kind()),
            }
        })
    }

    /// A new tensor holding the all-reduce of `t` (detached). CUDA tensors keep their dtype;
    /// host tensors are reduced in f64 or f32 ([`host_kind`]) and returned in their own.
    pub fn all_reduced(&mut self, t: &Tensor, op: ReduceOp) -> Result<Tensor, TrainError> {
        let wire = match t.device() {
            Device::Cuda(_) => t.kind(),
            _ => host_kind(t.kind()),
        };
        let mut out = t.detach().f_to_kind(wire)?.f_contiguous()?;
        if out.data_ptr() == t.data_ptr() {
            // Still `t`'s storage: reduce a copy, not the caller's tensor.
            out = out.f_detach_copy()?;
        }
        self.all_reduce_(&mut out, op)?;
        Ok(out.f_to_kind(t.kind())?)
    }

    /// All-reduce plain host values.
    pub fn all_reduce_f64(&mut self, values: &mut [f64], op: ReduceOp) -> Result<(), TrainError> {
        match self.timed(|c| c.all_reduce_in_place(values, op)) {
            Some(r) => Ok(r?),
            None => Ok(()),
        }
    }

    pub fn all_reduce_slice(&mut self, values: &mut [f32], op: ReduceOp) -> Result<(), TrainError> {
        match self.timed(|c| c.all_reduce_in_place(values, op)) {
            Some(r) => Ok(r?),
            None => Ok(()),
        }
    }

    pub fn reduce_scatter_slice(&mut self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<(), TrainError> {
        match self.timed(|c| c.reduce_scatter(send, recv, op)) {
            Some(r) => Ok(r?),
            None => {
                recv.copy_from_slice(send);
                Ok(())
            }
        }
    }

    pub fn all_gather_slice(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), TrainError> {
        match self.timed(|c| c.all_gather(send, recv)) {
            Some(r) => Ok(r?),
            None => {
                recv.copy_from_slice(send);
                Ok(())
            }
        }
    }

    pub fn broadcast_slice<T: gantry_collectives::Element>(
        &mut self,
        values: &mut [T],
        root: usize,
    ) -> Result<(), TrainError> {
        match self.timed(|c| c.broadcast(values, root)) {
            Some(r) => Ok(r?),
            None => Ok(()),
        }
    }

    /// Send a tensor to group rank `peer` (tagged; the receiver must expect the same tag). The
    /// wire carries f32, whatever `t`'s kind, so the receiver needs only the shape. NCCL has no
    /// tags: on CUDA, messages between two ranks match in the order they were sent, which the
    /// pipeline's schedule keeps the same on both sides.
    pub fn send(&mut self, t: &Tensor, peer: usize, tag: u32) -> Result<(), TrainError> {
        const OP: &str = "send";
        self.not_alone(OP)?;
        let t0 = Instant::now();
        let wire = t.detach().f_to_kind(Kind::Float)?.f_contiguous()?;
        let r = match self.nccl_for(t.device(), OP)? {
            // SAFETY: `wire` is contiguous f32 device memory of `numel` elements; the compute
            // stream orders its reuse after the send (module notes).
            Some(nccl) => unsafe { nccl.send(wire.data_ptr() as u64, wire.numel(), DType::F32, peer) }
                .map_err(self.nccl_failed(OP)),
            None => {
                let mut host = wire.f_to_device(Device::Cpu)?;
                let s = host_slice_mut::<f32>(&mut host);
                let comm = self.comm.as_mut().expect("checked by not_alone");
                comm.send(s, peer, tag).map_err(TrainError::from)
            }
        };
        self.clock.add(t0.elapsed().as_secs_f64());
        r
    }

    /// Receive an f32 tensor of `shape` from group rank `peer`, onto `device`.
    pub fn recv(&mut self, shape: &[i64], device: Device, peer: usize, tag: u32) -> Result<Tensor, TrainError> {
        const OP: &str = "recv";
        self.not_alone(OP)?;
        let t0 = Instant::now();
        let r = match self.nccl_for(device, OP)? {
            Some(nccl) => {
                let out = Tensor::f_empty(shape, (Kind::Float, device))?;
                // SAFETY: `out` is a fresh contiguous f32 buffer of `numel` elements on the
                // communicator's device, written on the compute stream before anyone reads it.
                unsafe { nccl.recv(out.data_ptr() as u64, out.numel(), DType::F32, peer) }
                    .map_err(self.nccl_failed(OP))
                    .map(|_| out)
            }
            None => {
                let mut host = Tensor::f_empty(shape, (Kind::Float, Device::Cpu))?;
                let s = host_slice_mut::<f32>(&mut host);
                let comm = self.comm.as_mut().expect("checked by not_alone");
                match comm.recv(s, peer, tag) {
                    Ok(()) => Ok(host.f_to_device(device)?),
                    Err(e) => Err(e.into()),
                }
            }
        };
        self.clock.add(t0.elapsed().as_secs_f64());
        r
    }

    /// Send `t` to `peer` while receiving an f32 tensor of `shape` from it (both directions at
    /// once, so two stages exchanging activations and gradients cannot deadlock; on CUDA one
    /// NCCL group).
    pub fn send_recv(
        &mut self,
        t: &Tensor,
        shape: &[i64],
        device: Device,
        peer: usize,
        tag: u32,
    ) -> Result<Tensor, TrainError> {
        const OP: &str = "send_recv";
        self.not_alone(OP)?;
        let t0 = Instant::now();
        let wire = t.detach().f_to_kind(Kind::Float)?.f_contiguous()?;
        let r = match self.nccl_for(device, OP)? {
            Some(nccl) => {
                let wire = wire.f_to_device(device)?;
                let out = Tensor::f_empty(shape, (Kind::Float, device))?;
                let (send, recv) = (wire.data_ptr() as u64, out.data_ptr() as u64);
                // SAFETY: both are contiguous f32 device buffers of `numel` elements on the
                // communicator's device, ordered by the compute stream (module notes).
                let r = nccl.group(|c| unsafe {
                    c.send(send, wire.numel(), DType::F32, peer)?;
                    c.recv(recv, out.numel(), DType::F32, peer)
                });
                r.map_err(self.nccl_failed(OP)).map(|_| out)
            }
            None => {
                let mut out_host = wire.f_to_device(Device::Cpu)?;
                let mut in_host = Tensor::f_empty(shape, (Kind::Float, Device::Cpu))?;
                let send = host_slice_mut::<f32>(&mut out_host);
                let recv = host_slice_mut::<f32>(&mut in_host);
                let comm = self.comm.as_mut().expect("checked by not_alone");
                match comm.send_recv(send, peer, recv, peer, tag) {
                    Ok(()) => Ok(in_host.f_to_device(device)?),
                    Err(e) => Err(e.into()),
                }
            }
        };
        self.clock.add(t0.elapsed().as_secs_f64());
        r
    }

    /// Point-to-point needs a peer.
    fn not_alone(&self, op: &str) -> Result<(), TrainError> {
        match self.comm {
            Some(_) => Ok(()),
            None => Err(TrainError::Internal(format!("{op} on a group of one"))),
        }
    }
}

/// Run `f(rank, world communicator)` on each rank of an in-process world of `n` (tests here
/// and in data parallelism).
#[cfg(test)]
pub(crate) fn on_ranks<R: Send + 'static>(n: usize, f: fn(usize, Communicator) -> R) -> Vec<R> {
    use gantry_collectives::{Fabric, FabricConfig};
    let ranks: Vec<_> = Fabric::local_world(n, FabricConfig::default(), 1 << 16)
        .into_iter()
        .enumerate()
        .map(|(rank, fabric)| std::thread::spawn(move || f(rank, fabric.world())))
        .collect();
    ranks.into_iter().map(|h| h.join().expect("rank thread")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_collectives::FabricConfig;

    #[test]
    fn the_backend_follows_the_device_and_the_group_size() {
        assert_eq!(choose_backend(Device::Cpu, 1), Backend::Local);
        assert_eq!(choose_backend(Device::Cuda(0), 1), Backend::Local);
        assert_eq!(choose_backend(Device::Cpu, 0), Backend::Local);
        assert_eq!(choose_backend(Device::Cpu, 2), Backend::Host);
        assert_eq!(choose_backend(Device::Mps, 4), Backend::Host);
        assert_eq!(choose_backend(Device::Cuda(0), 2), Backend::Nccl);
        assert_eq!(choose_backend(Device::Cuda(3), 8), Backend::Nccl);
    }

    #[test]
    fn nccl_dtypes_are_the_tensors_own() {
        let kinds = [
            (Kind::Float, DType::F32),
            (Kind::Double, DType::F64),
            (Kind::Half, DType::F16),
            (Kind::BFloat16, DType::BF16),
            (Kind::Int64, DType::I64),
        ];
        for (k, d) in kinds {
            assert_eq!(nccl_dtype(k), Some(d), "{k:?}");
        }
        assert_eq!(nccl_dtype(Kind::ComplexFloat), None);
    }

    /// Values f32 cannot hold survive a sum over two ranks exactly: the reduction is in f64,
    /// for a contiguous 0-dimensional tensor (reduced in its own storage), a strided one and
    /// `all_reduced`'s copy.
    #[test]
    fn f64_tensors_are_all_reduced_in_f64() {
        let results = on_ranks(2, |rank, world| {
            let mut comm = TensorComm::for_device(Some(world), CommClock::default(), Device::Cpu).unwrap();
            assert!(!comm.has_nccl() && comm.size() == 2);
            let x = 1.0 + (rank as f64 + 1.0) * 1e-12;
            let mut scalar = Tensor::from(x);
            let storage = scalar.data_ptr();
            comm.all_reduce_(&mut scalar, ReduceOp::Sum).unwrap();
            assert_eq!((scalar.kind(), scalar.data_ptr()), (Kind::Double, storage));
            let mut strided = Tensor::from_slice(&[x, -1.0, x, -1.0]).view([2, 2]).transpose(0, 1);
            assert!(!strided.is_contiguous());
            comm.all_reduce_(&mut strided, ReduceOp::Sum).unwrap();
            let fresh = Tensor::from_slice(&[x, 2.0 * x]);
            let reduced = comm.all_reduced(&fresh, ReduceOp::Sum).unwrap();
            assert_eq!(
                Vec::<f64>::try_from(&fresh).unwrap(),
                [x, 2.0 * x],
                "the input is left alone"
            );
            assert!(comm.clock().seconds() > 0.0);
            let strided = Vec::<f64>::try_from(&strided.contiguous().view([-1])).unwrap();
            (
                scalar.double_value(&[]),
                strided,
                Vec::<f64>::try_from(&reduced).unwrap(),
            )
        });
        let sum = (1.0 + 1e-12) + (1.0 + 2e-12);
        assert_ne!(sum as f32 as f64, sum, "the test needs a value f32 rounds");
        for (scalar, strided, reduced) in results {
            assert_eq!(scalar, sum);
            assert_eq!(strided, [sum, sum, -2.0, -2.0]);
            assert_eq!(reduced, [sum, 2.0 * sum]);
        }
    }

    /// f32 and bf16 host tensors still reduce as before (bf16 through f32, back in bf16).
    #[test]
    fn f32_and_bf16_host_tensors_reduce_in_their_kind() {
        let results = on_ranks(2, |rank, world| {
            let mut comm = TensorComm::for_device(Some(world), CommClock::default(), Device::Cpu).unwrap();
            let mut f = Tensor::from_slice(&[rank as f32, 1.5]);
            comm.all_reduce_(&mut f, ReduceOp::Avg).unwrap();
            let b = Tensor::from_slice(&[rank as f32 + 1.0, 4.0]).to_kind(Kind::BFloat16);
            let b = comm.all_reduced(&b, ReduceOp::Max).unwrap();
            assert_eq!(b.kind(), Kind::BFloat16);
            (
                Vec::<f32>::try_from(&f).unwrap(),
                Vec::<f32>::try_from(&b.to_kind(Kind::Float)).unwrap(),
            )
        });
        for (f, b) in results {
            assert_eq!((f, b), (vec![0.5, 1.5], vec![2.0, 4.0]));
        }
    }

    /// Without a GPU or NCCL, asking for a CUDA group's communicator fails on every rank with
    /// `Unavailable`, naming the group (and neither panics nor waits for a timeout).
    #[test]
    fn a_cuda_group_without_nccl_is_refused_by_name() {
        if gantry_collectives::nccl::nccl_available().is_ok() {
            return; // Two ranks cannot share this machine's GPU; nothing to refuse here.
        }
        let started = Instant::now();
        let errors = on_ranks(2, |_, world| {
            let name = world.name().to_string();
            match TensorComm::for_device(Some(world), CommClock::default(), Device::Cuda(0)) {
                Ok(_) => panic!("a CUDA group was made without NCCL"),
                Err(e) => (name, e.is_nccl_unavailable(), e.to_string()),
            }
        });
        for (rank, (group, unavailable, message)) in errors.into_iter().enumerate() {
            assert!(unavailable, "{message}");
            assert!(message.contains(&format!("group `{group}`")), "{message}");
            assert!(message.contains(&format!("rank {rank}")), "{message}");
        }
        assert!(
            started.elapsed() < FabricConfig::default().join_timeout,
            "it waited for a timeout"
        );
        // A group of one needs no NCCL, whatever the device.
        let alone = TensorComm::for_device(None, CommClock::default(), Device::Cuda(0)).unwrap();
        assert!(alone.is_trivial() && !alone.has_nccl());
    }
}
