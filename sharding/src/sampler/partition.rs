//! Steps, micro-batches and data-parallel ranks over the global sample stream, and the
//! [`Cursor`] a checkpoint stores to resume it.
//!
//! See the parent module for the global-position model; in short, global position `g` is
//! sample `shuffle(seed, g / N, g % N)` of epoch `g / N` (`N` = samples per epoch), a step is
//! `global_batch` consecutive positions starting at [`Cursor::consumed`], and within a step the
//! positions are ordered `[micro-batch][dp rank][index]`.

use serde::{Deserialize, Serialize};

use super::SamplerError;
use super::shuffle::Shuffle;

/// One sample of the global stream: sample id `sample` as drawn in `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SampleRef {
    pub epoch: u64,
    pub sample: u64,
}

/// Where a run stands in the global sample stream: what a checkpoint stores.
///
/// The position is [`Self::consumed`] alone; the other fields identify the stream so that a
/// cursor cannot be resumed against different data or settings ([`Sampler::check_cursor`]).
/// The data-parallel size and micro-batch count are deliberately absent: they do not affect the
/// stream, so a run may resume with different values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Identifies the dataset (supplied by the caller, e.g. a hash of the dataset manifest).
    pub fingerprint: u64,
    /// Shuffle seed.
    pub seed: u64,
    /// Samples per epoch (catches a changed packing, e.g. another `seq_len`, under the same
    /// manifest).
    pub num_samples: u64,
    /// Samples per step.
    pub global_batch: u64,
    /// Global samples consumed so far: the global position of the next step's first sample.
    pub consumed: u64,
}

impl Cursor {
    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.consumed.checked_div(self.global_batch).unwrap_or(0)
    }

    /// Epoch of the next sample to be consumed.
    pub fn epoch(&self) -> u64 {
        self.consumed.checked_div(self.num_samples).unwrap_or(0)
    }

    /// Moves past `steps` more steps of `global_batch` samples.
    pub fn advance(&mut self, steps: u64) -> Result<(), SamplerError> {
        let more = u128::from(steps) * u128::from(self.global_batch);
        let consumed = u64::try_from(u128::from(self.consumed) + more).map_err(|_| SamplerError::PositionOverflow {
            consumed: self.consumed,
            more,
        })?;
        self.consumed = consumed;
        Ok(())
    }
}

/// Cuts the shuffled global stream into steps and hands each (rank, micro-batch) its slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sampler {
    shuffle: Shuffle,
    global_batch: u64,
}

impl Sampler {
    /// A sampler over `num_samples` samples per epoch, shuffled with `seed`, `global_batch`
    /// samples per step. Errors if either count is zero.
    pub fn new(num_samples: u64, seed: u64, global_batch: usize) -> Result<Sampler, SamplerError> {
        if global_batch == 0 {
            return Err(SamplerError::ZeroGlobalBatch);
        }
        Ok(Sampler {
            shuffle: Shuffle::new(num_samples, seed)?,
            global_batch: global_batch as u64,
        })
    }

    /// Samples per epoch.
    pub fn num_samples(&self) -> u64 {
        self.shuffle.num_samples()
    }

    /// Shuffle seed.
    pub fn seed(&self) -> u64 {
        self.shuffle.seed()
    }

    /// Samples per step.
    pub fn global_batch(&self) -> u64 {
        self.global_batch
    }

    /// A cursor at the very start of the stream, for the dataset identified by `fingerprint`.
    pub fn start(&self, fingerprint: u64) -> Cursor {
        Cursor {
            fingerprint,
            seed: self.seed(),
            num_samples: self.num_samples(),
            global_batch: self.global_batch,
            consumed: 0,
        }
    }

    /// Checks that a restored cursor belongs to this dataset (`fingerprint`) and this sampler
    /// (seed, samples per epoch, global batch) and sits on a step boundary. The error names the
    /// first field that differs, with the checkpoint's and the current value.
    pub fn check_cursor(&self, cursor: &Cursor, fingerprint: u64) -> Result<(), SamplerError> {
        mismatch("fingerprint", cursor.fingerprint, fingerprint)?;
        self.check_compatible(cursor)
    }

    /// Everything of [`Self::check_cursor`] this sampler can know without the fingerprint.
    fn check_compatible(&self, cursor: &Cursor) -> Result<(), SamplerError> {
        mismatch("seed", cursor.seed, self.seed())?;
        mismatch("num_samples", cursor.num_samples, self.num_samples())?;
        mismatch("global_batch", cursor.global_batch, self.global_batch)?;
        if !cursor.consumed.is_multiple_of(self.global_batch) {
            return Err(SamplerError::MisalignedCursor {
                consumed: cursor.consumed,
                global_batch: self.global_batch,
            });
        }
        Ok(())
    }

    /// The sample at global position `position`.
    pub fn at(&self, position: u64) -> SampleRef {
        let n = self.num_samples();
        let epoch = position / n;
        SampleRef {
            epoch,
            sample: self.shuffle.sample_at(epoch, position % n),
        }
    }

    /// Samples per micro-batch per rank: `global_batch / (dp_size · micro_batches)`, or an
    /// error if that does not divide evenly (or a count is zero).
    pub fn micro_batch_size(&self, dp_size: usize, micro_batches: usize) -> Result<u64, SamplerError> {
        if dp_size == 0 {
            return Err(SamplerError::ZeroDegree { what: "dp_size" });
        }
        if micro_batches == 0 {
            return Err(SamplerError::ZeroDegree { what: "micro_batches" });
        }
        let product = dp_size as u128 * micro_batches as u128;
        if !u128::from(self.global_batch).is_multiple_of(product) {
            return Err(SamplerError::IndivisibleBatch {
                global_batch: self.global_batch,
                dp_size,
                micro_batches,
                product,
            });
        }
        // product divides global_batch, so it is at most global_batch and fits in u64.
        Ok(self.global_batch / product as u64)
    }

    /// The global positions of micro-batch `micro` on rank `dp_rank` in the step starting at
    /// `cursor` (see [`Self::micro_batch`]); for callers that map positions themselves, such as
    /// a blend of several datasets.
    pub fn micro_batch_positions(
        &self,
        cursor: &Cursor,
        dp_rank: usize,
        dp_size: usize,
        micro_batches: usize,
        micro: usize,
    ) -> Result<std::ops::Range<u64>, SamplerError> {
        self.check_compatible(cursor)?;
        let size = self.micro_batch_size(dp_size, micro_batches)?;
        if dp_rank >= dp_size {
            return Err(SamplerError::RankOutOfRange { dp_rank, dp_size });
        }
        if micro >= micro_batches {
            return Err(SamplerError::MicroBatchOutOfRange { micro, micro_batches });
        }
        // The whole step must be addressable; afterwards nothing below can overflow.
        cursor
            .consumed
            .checked_add(self.global_batch)
            .ok_or(SamplerError::PositionOverflow {
                consumed: cursor.consumed,
                more: u128::from(self.global_batch),
            })?;
        let per_micro = self.global_batch / micro_batches as u64;
        let first = cursor.consumed + micro as u64 * per_micro + dp_rank as u64 * size;

        Ok(first..first + size)
    }

    /// The samples of micro-batch `micro` (of `micro_batches`) on data-parallel rank `dp_rank`
    /// (of `dp_size`) in the step starting at `cursor`: global positions
    /// `consumed + micro·(GB/M) + dp_rank·(GB/(M·D)) + k` for `k` in `0..GB/(M·D)`, in that
    /// order. Over all ranks and micro-batches these are exactly the step's `GB` positions,
    /// each once.
    ///
    /// Errors if the cursor belongs to another sampler (seed, samples per epoch, global batch)
    /// or is not on a step boundary, if the batch does not divide, or a rank / micro-batch
    /// index is out of range.
    pub fn micro_batch(
        &self,
        cursor: &Cursor,
        dp_rank: usize,
        dp_size: usize,
        micro_batches: usize,
        micro: usize,
    ) -> Result<Vec<SampleRef>, SamplerError> {
        let positions = self.micro_batch_positions(cursor, dp_rank, dp_size, micro_batches, micro)?;
        let n = self.num_samples();
        let mut out = Vec::with_capacity(usize::try_from(positions.end - positions.start).unwrap_or(0));
        let mut ids = Vec::with_capacity(out.capacity());
        let mut position = positions.start;
        // A micro-batch spans at most a few epochs: one set of round keys per epoch.
        while position < positions.end {
            let epoch = position / n;
            let epoch_end = (epoch + 1).saturating_mul(n).min(positions.end);
            ids.clear();
            let keys = self.shuffle.epoch_keys(epoch);
            self.shuffle
                .permute_range(&keys, position % n..(epoch_end - 1) % n + 1, &mut ids);
            out.extend(ids.iter().map(|&sample| SampleRef { epoch, sample }));
            position = epoch_end;
        }
        Ok(out)
    }
}

fn mismatch(field: &'static str, checkpoint: u64, current: u64) -> Result<(), SamplerError> {
    if checkpoint == current {
        Ok(())
    } else {
        Err(SamplerError::CursorMismatch {
            field,
            checkpoint,
            current,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashSet};

    /// One step read in `[micro][rank]` order: the step's samples in global order.
    fn step_samples(sampler: &Sampler, cursor: &Cursor, dp_size: usize, micro_batches: usize) -> Vec<SampleRef> {
        let mut out = Vec::new();
        for micro in 0..micro_batches {
            for rank in 0..dp_size {
                out.extend(
                    sampler
                        .micro_batch(cursor, rank, dp_size, micro_batches, micro)
                        .unwrap(),
                );
            }
        }
        out
    }

    /// Divisor pairs: `(global_batch, dp_size, micro_batches)` with `dp · micro | global_batch`.
    fn batch_config() -> impl Strategy<Value = (usize, usize, usize)> {
        (1usize..=8, 1usize..=8, 1usize..=6).prop_map(|(d, m, f)| (d * m * f, d, m))
    }

    proptest! {
        #[test]
        fn a_step_is_partitioned_exactly(
            (global_batch, dp_size, micro_batches) in batch_config(),
            num_samples in 1u64..500,
            seed in any::<u64>(),
            steps in 0u64..50,
        ) {
            let sampler = Sampler::new(num_samples, seed, global_batch).unwrap();
            let mut cursor = sampler.start(1);
            cursor.advance(steps).unwrap();
            let size = sampler.micro_batch_size(dp_size, micro_batches).unwrap();
            prop_assert_eq!(size * (dp_size * micro_batches) as u64, global_batch as u64);
            // Positions, via the documented formula, cover the step exactly once...
            let mut positions = BTreeSet::new();
            for micro in 0..micro_batches as u64 {
                for rank in 0..dp_size as u64 {
                    let first = cursor.consumed + micro * (global_batch as u64 / micro_batches as u64) + rank * size;
                    for p in first..first + size {
                        prop_assert!(positions.insert(p), "position {} twice", p);
                    }
                }
            }
            let expected: BTreeSet<u64> = (cursor.consumed..cursor.consumed + global_batch as u64).collect();
            prop_assert_eq!(&positions, &expected);
            // ...and the returned samples are those positions' samples, in [micro][rank] order.
            let got = step_samples(&sampler, &cursor, dp_size, micro_batches);
            let want: Vec<SampleRef> = expected.iter().map(|&p| sampler.at(p)).collect();
            prop_assert_eq!(got, want);
        }

        /// The important one: stop anywhere, serialize the cursor, resume with another DP size
        /// and micro-batch count, and the stream continues exactly.
        #[test]
        fn resume_with_a_different_dp_size_is_exact(
            num_samples in 1u64..2000,
            seed in any::<u64>(),
            (d1, m1, d2, m2) in (1usize..=4, 1usize..=4, 1usize..=4, 1usize..=4),
            factor in 1usize..=8,
            total_steps in 1u64..=12,
            stop_fraction in 0.0f64..=1.0,
        ) {
            let lcm = |a: usize, b: usize| a / gcd(a, b) * b;
            let global_batch = lcm(d1 * m1, d2 * m2) * factor;
            let stop = ((total_steps as f64 * stop_fraction) as u64).min(total_steps);
            let fingerprint = 0xfeed;

            let sampler = Sampler::new(num_samples, seed, global_batch).unwrap();
            let mut cursor = sampler.start(fingerprint);
            let mut uninterrupted = Vec::new();
            for _ in 0..total_steps {
                uninterrupted.extend(step_samples(&sampler, &cursor, d1, m1));
                cursor.advance(1).unwrap();
            }

            // First run: D1 ranks, M1 micro-batches, until `stop`.
            let mut cursor = sampler.start(fingerprint);
            let mut resumed = Vec::new();
            for _ in 0..stop {
                resumed.extend(step_samples(&sampler, &cursor, d1, m1));
                cursor.advance(1).unwrap();
            }
            let json = serde_json::to_string(&cursor).unwrap();

            // Second run: a fresh sampler, the restored cursor, D2 ranks and M2 micro-batches.
            let sampler = Sampler::new(num_samples, seed, global_batch).unwrap();
            let mut cursor: Cursor = serde_json::from_str(&json).unwrap();
            sampler.check_cursor(&cursor, fingerprint).unwrap();
            prop_assert_eq!(cursor.step(), stop);
            for _ in stop..total_steps {
                resumed.extend(step_samples(&sampler, &cursor, d2, m2));
                cursor.advance(1).unwrap();
            }

            // Same samples in the same global order: nothing repeated, nothing skipped.
            prop_assert_eq!(&resumed, &uninterrupted);
            let total = total_steps * global_batch as u64;
            prop_assert_eq!(resumed.len() as u64, total);
            let global: Vec<SampleRef> = (0..total).map(|p| sampler.at(p)).collect();
            prop_assert_eq!(&resumed, &global);
            // Every epoch draws each sample at most once, and full epochs draw all of them.
            let distinct: HashSet<SampleRef> = resumed.iter().copied().collect();
            prop_assert_eq!(distinct.len(), resumed.len());
            for epoch in 0..total / num_samples {
                let drawn = resumed.iter().filter(|s| s.epoch == epoch).count() as u64;
                prop_assert_eq!(drawn, num_samples);
            }
            prop_assert!(resumed.iter().all(|s| s.sample < num_samples));
        }
    }

    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }

    #[test]
    fn stream_wraps_into_the_next_epoch() {
        let sampler = Sampler::new(5, 3, 4).unwrap();
        let mut cursor = sampler.start(0);
        cursor.advance(1).unwrap();
        // Step 1 holds positions 4..8: the last sample of epoch 0 and three of epoch 1.
        let step = step_samples(&sampler, &cursor, 2, 1);
        assert_eq!(step.iter().map(|s| s.epoch).collect::<Vec<_>>(), [0, 1, 1, 1]);
        assert_eq!(step[0], sampler.at(4));
        assert_eq!(cursor.epoch(), 0);
        cursor.advance(1).unwrap();
        assert_eq!((cursor.step(), cursor.epoch(), cursor.consumed), (2, 1, 8));
    }

    #[test]
    fn construction_errors() {
        assert_eq!(Sampler::new(0, 1, 8), Err(SamplerError::NoSamples));
        assert_eq!(Sampler::new(10, 1, 0), Err(SamplerError::ZeroGlobalBatch));
    }

    #[test]
    fn partition_errors_name_the_numbers() {
        let sampler = Sampler::new(100, 1, 12).unwrap();
        let cursor = sampler.start(0);
        let err = sampler.micro_batch(&cursor, 0, 5, 2, 0).unwrap_err();
        assert_eq!(
            err,
            SamplerError::IndivisibleBatch {
                global_batch: 12,
                dp_size: 5,
                micro_batches: 2,
                product: 10
            }
        );
        assert_eq!(
            err.to_string(),
            "global batch 12 is not divisible by dp_size (5) × micro_batches (2) = 10"
        );
        assert_eq!(
            sampler.micro_batch(&cursor, 3, 3, 2, 0),
            Err(SamplerError::RankOutOfRange { dp_rank: 3, dp_size: 3 })
        );
        assert_eq!(
            sampler.micro_batch(&cursor, 0, 3, 2, 2),
            Err(SamplerError::MicroBatchOutOfRange {
                micro: 2,
                micro_batches: 2
            })
        );
        assert_eq!(
            sampler.micro_batch(&cursor, 0, 0, 2, 0),
            Err(SamplerError::ZeroDegree { what: "dp_size" })
        );
        assert_eq!(
            sampler.micro_batch_size(3, 0),
            Err(SamplerError::ZeroDegree { what: "micro_batches" })
        );
        assert_eq!(sampler.micro_batch_size(3, 2), Ok(2));
    }

    #[test]
    fn cursor_checks_name_the_field_and_both_values() {
        let sampler = Sampler::new(100, 7, 8).unwrap();
        let good = sampler.start(0xabc);
        sampler.check_cursor(&good, 0xabc).unwrap();
        let cases = [
            (
                Cursor {
                    fingerprint: 0xabd,
                    ..good.clone()
                },
                "fingerprint",
                0xabd,
                0xabc,
            ),
            (
                Cursor {
                    seed: 8,
                    ..good.clone()
                },
                "seed",
                8,
                7,
            ),
            (
                Cursor {
                    num_samples: 99,
                    ..good.clone()
                },
                "num_samples",
                99,
                100,
            ),
            (
                Cursor {
                    global_batch: 16,
                    ..good.clone()
                },
                "global_batch",
                16,
                8,
            ),
        ];
        for (cursor, field, checkpoint, current) in cases {
            let err = sampler.check_cursor(&cursor, 0xabc).unwrap_err();
            assert_eq!(
                err,
                SamplerError::CursorMismatch {
                    field,
                    checkpoint,
                    current
                }
            );
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("{field} is {checkpoint} in the checkpoint but {current} now")),
                "{msg}"
            );
        }
        // A cursor from another sampler cannot be used to draw samples either.
        let other = Cursor {
            seed: 8,
            ..good.clone()
        };
        assert!(matches!(
            sampler.micro_batch(&other, 0, 1, 1, 0),
            Err(SamplerError::CursorMismatch { field: "seed", .. })
        ));
        let misaligned = Cursor { consumed: 4, ..good };
        assert_eq!(
            sampler.check_cursor(&misaligned, 0xabc),
            Err(SamplerError::MisalignedCursor {
                consumed: 4,
                global_batch: 8
            })
        );
    }

    #[test]
    fn cursor_json_format_is_stable() {
        // Checkpoints written by earlier versions must keep loading.
        let json = r#"{"fingerprint":1,"seed":2,"num_samples":3,"global_batch":4,"consumed":8}"#;
        let cursor: Cursor = serde_json::from_str(json).unwrap();
        assert_eq!(
            cursor,
            Cursor {
                fingerprint: 1,
                seed: 2,
                num_samples: 3,
                global_batch: 4,
                consumed: 8
            }
        );
        assert_eq!(serde_json::to_string(&cursor).unwrap(), json);
        assert_eq!((cursor.step(), cursor.epoch()), (2, 2));
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let sampler = Sampler::new(10, 0, 8).unwrap();
        let mut cursor = sampler.start(0);
        assert!(matches!(
            cursor.advance(u64::MAX),
            Err(SamplerError::PositionOverflow { .. })
        ));
        cursor.consumed = u64::MAX - 7;
        assert!(matches!(cursor.advance(1), Err(SamplerError::PositionOverflow { .. })));
        cursor.consumed = u64::MAX / 8 * 8;
        assert!(matches!(
            sampler.micro_batch(&cursor, 0, 1, 1, 0),
            Err(SamplerError::PositionOverflow { .. })
        ));
        cursor.consumed -= 8;
        assert_eq!(sampler.micro_batch(&cursor, 0, 1, 1, 0).unwrap().len(), 8);
    }
}
