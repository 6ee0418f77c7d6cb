//! tch tensors over gantry communicators. CPU f32 tensors are handed to the collectives as
//! slices of their own storage (no copies); tensors on another device are staged through host
//! memory (correct, not fast: on GPUs the data plane is NCCL, see the architecture notes).
//! Every call adds its wall time to a shared counter so the trainer can report how much of a
//! step was spent waiting on communication.

use crate::error::TrainError;
use gantry_collectives::{Communicator, ReduceOp};
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

/// A communicator for tensors. `None` inside means a group of one: every op is the identity
/// and costs nothing, so layers need no special cases for "not parallel".
pub struct TensorComm {
    comm: Option<Communicator>,
    clock: CommClock,
}

/// The f32 elements of a contiguous CPU tensor. The tensor must stay alive and unaliased by
/// other writers while the slice is used (the callers hold `&mut Tensor` or a fresh tensor).
fn f32_slice_mut(t: &mut Tensor) -> &mut [f32] {
    assert!(t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous());
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: a contiguous CPU float tensor owns `numel` f32 values at data_ptr, and the
    // exclusive borrow of the handle keeps this the only access path for the slice's lifetime.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) }
}

/// Run `f` on a host f32 copy (or view) of `t` and write the result back into `t`.
fn with_host_f32<R>(t: &mut Tensor, f: impl FnOnce(&mut [f32]) -> R) -> R {
    if t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() {
        return f(f32_slice_mut(t));
    }
    let mut host = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let r = f(f32_slice_mut(&mut host));
    tch::no_grad(|| t.copy_(&host));
    r
}

impl TensorComm {
    pub fn new(comm: Option<Communicator>, clock: CommClock) -> TensorComm {
        let comm = comm.filter(|c| c.size() > 1);
        TensorComm { comm, clock }
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

    /// All-reduce a tensor's values in place (no autograd involvement).
    pub fn all_reduce_(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), TrainError> {
        let Some(comm) = self.comm.as_mut() else { return Ok(()) };
        let t0 = Instant::now();
        let r = with_host_f32(t, |s| comm.all_reduce_in_place(s, op));
        self.clock.add(t0.elapsed().as_secs_f64());
        Ok(r?)
    }

    /// A new tensor holding the all-reduce of `t` (detached).
    pub fn all_reduced(&mut self, t: &Tensor, op: ReduceOp) -> Result<Tensor, TrainError> {
        let mut out = t.detach().to_kind(Kind::Float).contiguous().copy();
        self.all_reduce_(&mut out, op)?;
        Ok(out.to_kind(t.kind()))
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

    /// Send a tensor to group rank `peer` (tagged; the receiver must expect the same tag).
    pub fn send(&mut self, t: &Tensor, peer: usize, tag: u32) -> Result<(), TrainError> {
        let mut host = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let s = f32_slice_mut(&mut host);
        match self.timed(|c| c.send(s, peer, tag)) {
            Some(r) => Ok(r?),
            None => Err(TrainError::Internal("send on a group of one".into())),
        }
    }

    /// Receive a tensor of `shape` from group rank `peer`.
    pub fn recv(&mut self, shape: &[i64], device: Device, peer: usize, tag: u32) -> Result<Tensor, TrainError> {
        let mut host = Tensor::empty(shape, (Kind::Float, Device::Cpu));
        let s = f32_slice_mut(&mut host);
        match self.timed(|c| c.recv(s, peer, tag)) {
            Some(r) => r?,
            None => return Err(TrainError::Internal("recv on a group of one".into())),
        }
        Ok(host.to_device(device))
    }

    /// Send `t` to `peer` while receiving a tensor of `shape` from it (both directions at once,
    /// so two stages exchanging activations and gradients cannot deadlock).
    pub fn send_recv(
        &mut self,
        t: &Tensor,
        shape: &[i64],
        device: Device,
        peer: usize,
        tag: u32,
    ) -> Result<Tensor, TrainError> {
        let mut out_host = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let mut in_host = Tensor::empty(shape, (Kind::Float, Device::Cpu));
        let send = f32_slice_mut(&mut out_host);
        let recv = f32_slice_mut(&mut in_host);
        match self.timed(|c| c.send_recv(send, peer, recv, peer, tag)) {
            Some(r) => r?,
            None => return Err(TrainError::Internal("send_recv on a group of one".into())),
        }
        Ok(in_host.to_device(device))
    }
}
