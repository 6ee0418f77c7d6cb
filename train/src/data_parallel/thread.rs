//! The thread that owns the data-parallel communicator, so gradient buckets are averaged
//! while the main thread continues backward. Jobs go in by bucket index; results come back
//! in completion order, tagged with it.

use gantry_collectives::{CommError, Communicator, ReduceOp};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

pub(crate) enum Job {
    AllReduce(usize, Vec<f32>),
    ReduceScatter(usize, Vec<f32>),
    AllGather(usize, Vec<f32>),
}

pub(crate) type JobResult = (usize, Result<Vec<f32>, CommError>);

pub(crate) struct DpThread {
    jobs: Option<Sender<Job>>,
    results: Receiver<JobResult>,
    handle: Option<JoinHandle<()>>,
}

impl DpThread {
    /// Run `comm`'s collectives for `dp` data-parallel ranks, this one being `dp_rank`; fails
    /// only where the OS refuses a thread.
    pub fn spawn(mut comm: Communicator, dp: usize, dp_rank: usize) -> std::io::Result<DpThread> {
        let (jobs, rx) = channel::<Job>();
        let (tx, results) = channel::<JobResult>();
        let handle = std::thread::Builder::new()
            .name("gantry-dp-grads".into())
            .spawn(move || {
                for job in rx {
                    let out = match job {
                        Job::AllReduce(b, mut v) => (b, comm.all_reduce_in_place(&mut v, ReduceOp::Avg).map(|_| v)),
                        // In place on the packed bucket we own (`reduce_scatter` would copy
                        // it first); this rank's block is then its shard.
                        Job::ReduceScatter(b, mut v) => {
                            let n = v.len() / dp;
                            let out = comm.reduce_scatter_in_place(&mut v, ReduceOp::Avg);
                            (
                                b,
                                out.map(|_| {
                                    v.copy_within(dp_rank * n..(dp_rank + 1) * n, 0);
                                    v.truncate(n);
                                    v
                                }),
                            )
                        }
                        Job::AllGather(b, v) => {
                            let mut out = vec![0f32; v.len() * dp];
                            (b, comm.all_gather(&v, &mut out).map(|_| out))
                        }
                    };
                    if tx.send(out).is_err() {
                        break;
                    }
                }
            })?;
        Ok(DpThread {
            jobs: Some(jobs),
            results,
            handle: Some(handle),
        })
    }

    /// Hand `job` to the thread; `false` when it has stopped.
    pub fn send(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }

    /// The next finished job; `None` when the thread has exited.
    pub fn recv(&self) -> Option<JobResult> {
        self.results.recv().ok()
    }
}

impl Drop for DpThread {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
