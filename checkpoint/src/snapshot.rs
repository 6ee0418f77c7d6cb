//! The bytes of a save, and the host buffers they live in.
//!
//! A [`SnapshotBytes`] is either owned bytes or a range of a shared [`HostBuffer`]: one buffer
//! per save holding every slice, which may still be filling (a device→host copy on a side
//! stream) when the request reaches the writer, so the writer calls
//! [`SnapshotBytes::wait_ready`] before it reads them. Buffers come from a [`BufferPool`]:
//! when the last slice of one has been written (the writer drops it), it goes back to the
//! pool for the next save, so a run allocates (and, on a GPU, pins) its snapshot memory once
//! instead of at every save. Nothing here knows about devices: the trainer's buffer type says
//! what "ready" means.

use bytes::Bytes;
use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

/// Host memory holding the bytes of a save's slices.
pub trait HostBuffer: Send + Sync + 'static {
    /// Blocks until the bytes are final (an asynchronous copy into them has run); the error
    /// says why they never will be.
    fn wait_ready(&self) -> Result<(), String>;
    /// All of the buffer. Its contents are meaningful only once [`Self::wait_ready`] returned.
    fn bytes(&self) -> &[u8];
}

impl HostBuffer for Vec<u8> {
    fn wait_ready(&self) -> Result<(), String> {
        Ok(())
    }
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// One slice's bytes (row-major, little-endian) as handed to the writer.
#[derive(Clone)]
pub struct SnapshotBytes(Repr);

#[derive(Clone)]
enum Repr {
    Owned(Bytes),
    Shared {
        buffer: Arc<dyn HostBuffer>,
        range: Range<usize>,
    },
}

/// A range of a shared buffer that keeps it alive inside a [`Bytes`].
struct SharedRange {
    buffer: Arc<dyn HostBuffer>,
    range: Range<usize>,
}

impl AsRef<[u8]> for SharedRange {
    fn as_ref(&self) -> &[u8] {
        &self.buffer.bytes()[self.range.clone()]
    }
}

impl SnapshotBytes {
    /// Bytes `range` of `buffer`, or `None` when the range does not lie inside it.
    pub fn in_buffer(buffer: Arc<dyn HostBuffer>, range: Range<usize>) -> Option<SnapshotBytes> {
        (range.start <= range.end && range.end <= buffer.bytes().len())
            .then_some(SnapshotBytes(Repr::Shared { buffer, range }))
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Owned(b) => b.len(),
            Repr::Shared { range, .. } => range.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blocks until the bytes can be read.
    pub fn wait_ready(&self) -> Result<(), String> {
        match &self.0 {
            Repr::Owned(_) => Ok(()),
            Repr::Shared { buffer, .. } => buffer.wait_ready(),
        }
    }

    /// Where the bytes live (to tell buffers apart; not to read through).
    pub fn as_ptr(&self) -> *const u8 {
        self.ready_slice().as_ptr()
    }

    /// A copy of the bytes, once they are ready.
    pub fn to_vec(&self) -> Result<Vec<u8>, String> {
        self.wait_ready()?;
        Ok(self.ready_slice().to_vec())
    }

    /// The bytes, for whoever has seen [`Self::wait_ready`] return.
    pub(crate) fn ready_slice(&self) -> &[u8] {
        match &self.0 {
            Repr::Owned(b) => b,
            Repr::Shared { buffer, range } => &buffer.bytes()[range.clone()],
        }
    }

    /// The bytes without a copy; a shared buffer is released when the last of them drops.
    pub(crate) fn into_bytes(self) -> Bytes {
        match self.0 {
            Repr::Owned(b) => b,
            Repr::Shared { buffer, range } => Bytes::from_owner(SharedRange { buffer, range }),
        }
    }
}

impl From<Vec<u8>> for SnapshotBytes {
    fn from(v: Vec<u8>) -> SnapshotBytes {
        SnapshotBytes(Repr::Owned(Bytes::from(v)))
    }
}

impl From<Bytes> for SnapshotBytes {
    fn from(b: Bytes) -> SnapshotBytes {
        SnapshotBytes(Repr::Owned(b))
    }
}

/// Buffers handed back once written, for the next save. With one save in flight at a time
/// ([`crate::Saver`]) and one buffer taken per save, at most two exist: the one being written
/// and the one the next snapshot fills.
pub struct BufferPool<B: HostBuffer> {
    home: Sender<B>,
    returned: Receiver<B>,
    allocations: usize,
}

impl<B: HostBuffer> Default for BufferPool<B> {
    fn default() -> Self {
        let (home, returned) = channel();
        BufferPool {
            home,
            returned,
            allocations: 0,
        }
    }
}

impl<B: HostBuffer> BufferPool<B> {
    pub fn new() -> BufferPool<B> {
        BufferPool::default()
    }

    /// A returned buffer that `fits`, else a new one from `alloc`. Returned buffers that do
    /// not fit are freed, so the pool never holds more than the saves in flight need.
    pub fn take<E>(
        &mut self,
        fits: impl Fn(&B) -> bool,
        alloc: impl FnOnce() -> Result<B, E>,
    ) -> Result<Recycled<B>, E> {
        let mut found = None;
        for b in self.returned.try_iter() {
            if found.is_none() && fits(&b) {
                found = Some(b);
            }
        }
        let buffer = match found {
            Some(b) => b,
            None => {
                let b = alloc()?;
                self.allocations += 1;
                b
            }
        };
        Ok(Recycled {
            buffer: Some(buffer),
            home: self.home.clone(),
        })
    }

    /// How many buffers `take` has allocated so far.
    pub fn allocations(&self) -> usize {
        self.allocations
    }
}

/// A pool's buffer: back to the pool when dropped, once it is ready (so a copy still running
/// into it never overlaps the next use, nor a free).
pub struct Recycled<B: HostBuffer> {
    buffer: Option<B>,
    home: Sender<B>,
}

impl<B: HostBuffer> Recycled<B> {
    /// The buffer, to fill before it is shared.
    pub fn get_mut(&mut self) -> &mut B {
        self.buffer.as_mut().expect("present until dropped")
    }

    pub fn get(&self) -> &B {
        self.buffer.as_ref().expect("present until dropped")
    }
}

impl<B: HostBuffer> HostBuffer for Recycled<B> {
    fn wait_ready(&self) -> Result<(), String> {
        self.get().wait_ready()
    }
    fn bytes(&self) -> &[u8] {
        self.get().bytes()
    }
}

impl<B: HostBuffer> Drop for Recycled<B> {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            if let Err(e) = b.wait_ready() {
                // A failed copy may have left the buffer in any state: do not reuse it.
                tracing::warn!("dropping a snapshot buffer whose copy failed: {e}");
                return;
            }
            // The pool is gone (its trainer stopped): the buffer is simply freed.
            let _ = self.home.send(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{DType, JobState, SliceSpec};
    use crate::reader::{Checkpoint, Which};
    use crate::store::{S3Options, Store};
    use crate::writer::{SaveRequest, Saver, SaverConfig, TensorData};
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    /// A buffer whose bytes are "still being copied" until its gate opens.
    struct Gated {
        bytes: Vec<u8>,
        gate: Arc<(Mutex<bool>, Condvar)>,
    }

    impl HostBuffer for Gated {
        fn wait_ready(&self) -> Result<(), String> {
            let (open, cv) = &*self.gate;
            let mut g = open.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
            Ok(())
        }
        fn bytes(&self) -> &[u8] {
            &self.bytes
        }
    }

    fn open_gate(gate: &(Mutex<bool>, Condvar)) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    fn request(step: u64, buffer: Arc<dyn HostBuffer>, slices: &[SliceSpec]) -> SaveRequest {
        let mut at = 0;
        let tensors = slices
            .iter()
            .map(|s| {
                let len = s.nbytes() as usize;
                at += len;
                TensorData {
                    slice: s.clone(),
                    bytes: SnapshotBytes::in_buffer(Arc::clone(&buffer), at - len..at).unwrap(),
                }
            })
            .collect();
        SaveRequest {
            step,
            tensors,
            rank_state: serde_json::json!({}),
            job: JobState::default(),
        }
    }

    /// The writer reads nothing before the buffer is ready, and the pool hands a buffer out
    /// again only after the writer let go of it: a save still writing forces a second one,
    /// the third save reuses the first.
    #[test]
    fn the_writer_waits_for_a_filling_buffer_and_only_then_returns_it() {
        let dir = std::env::temp_dir().join(format!("gantry-snapshot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(dir.to_str().unwrap(), &S3Options::default()).unwrap();
        let mut config = SaverConfig::new(0, 1, "a");
        config.poll = Duration::from_millis(5);
        let mut saver = Saver::new(store.clone(), config);
        let slices = [
            SliceSpec::full("w", DType::U8, &[40]),
            SliceSpec::full("b", DType::U8, &[24]),
        ];
        let fill = |step: u64| (0..64u8).map(|i| i.wrapping_mul(step as u8 + 3)).collect::<Vec<u8>>();
        let mut pool: BufferPool<Gated> = BufferPool::new();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let alloc = |step| {
            let gate = Arc::clone(&gate);
            move || {
                Ok::<_, ()>(Gated {
                    bytes: fill(step),
                    gate,
                })
            }
        };
        let first = pool.take(|_| true, alloc(1)).unwrap();
        let first_ptr = first.bytes().as_ptr();
        saver.save(request(1, Arc::new(first), &slices)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            store.list("step-00000001/").unwrap().is_empty(),
            "written before the copy ended"
        );
        assert_eq!(saver.poll().unwrap(), None);
        // Step 1 is still held by the writer: step 2 needs memory of its own.
        let second = pool.take(|_| true, alloc(2)).unwrap();
        assert_eq!(pool.allocations(), 2);
        assert_ne!(second.bytes().as_ptr(), first_ptr);
        open_gate(&gate);
        saver
            .save(request(2, Arc::new(second), &slices))
            .unwrap()
            .expect("step 1 committed");
        let third = pool.take(|_| true, || Err(())).expect("step 1's buffer came back");
        assert_eq!(third.bytes().as_ptr(), first_ptr);
        saver.wait().unwrap().expect("step 2 committed");
        for step in [1, 2] {
            let loaded = Checkpoint::open(&store, Which::Step(step))
                .unwrap()
                .load(&slices)
                .unwrap();
            assert_eq!(loaded.concat(), fill(step), "step {step}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
