//! The steps planned ahead of a reader, as both streaming plans keep them ([`super::Plan`]
//! over shards, [`super::RangePlan`] over blocks): the step being read, what each planned step
//! after it reads (sorted, each once), and the limits on planning more (the horizon, the end
//! of training). Pure: the plans add their own window and holdings on top.

use super::plan::PlanError;
use std::collections::VecDeque;

#[derive(Clone, Debug, Default)]
pub struct Ahead {
    /// The step the reader is on.
    reading: u64,
    /// `steps[i]`: what step `reading + i` reads.
    steps: VecDeque<Vec<usize>>,
    /// Steps planned ahead of the reader at most (at least 1).
    horizon: u64,
    /// The first step not to plan (the end of training), if known.
    end: Option<u64>,
}

impl Ahead {
    pub fn new(start: u64, horizon: u64, end: Option<u64>) -> Ahead {
        Ahead {
            reading: start,
            steps: VecDeque::new(),
            horizon: horizon.max(1),
            end,
        }
    }

    /// The step the reader is on.
    pub fn reading(&self) -> u64 {
        self.reading
    }

    /// The first step not planned yet.
    pub fn planned_until(&self) -> u64 {
        self.reading + self.steps.len() as u64
    }

    /// The next step to plan, if the end and the horizon leave room for one (a plan may want
    /// none for reasons of its own).
    pub fn next(&self) -> Option<u64> {
        let next = self.planned_until();
        let room = self.end.is_none_or(|end| next < end) && (self.steps.len() as u64) < self.horizon;
        room.then_some(next)
    }

    /// Refuse to plan `step` unless it is the next one.
    pub fn check_next(&self, step: u64) -> Result<(), PlanError> {
        let expected = self.planned_until();
        match step == expected {
            true => Ok(()),
            false => Err(PlanError::OutOfOrder { expected, got: step }),
        }
    }

    /// Plan the next step, which reads `reads` (sorted, each once).
    pub fn push(&mut self, reads: Vec<usize>) {
        self.steps.push_back(reads);
    }

    /// The reader moved on to step `step` (an earlier one is ignored: readers only move
    /// forward); the steps before it are done. Whether it moved.
    pub fn advance(&mut self, step: u64) -> bool {
        let before = self.reading;
        while self.reading < step {
            if self.steps.pop_front().is_none() {
                self.reading = step;
                break;
            }
            self.reading += 1;
        }
        self.reading != before
    }

    /// The planned steps, the reader's first: each with what it reads.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, &Vec<usize>)> {
        let reading = self.reading;
        self.steps.iter().enumerate().map(move |(i, s)| (reading + i as u64, s))
    }

    /// What planned step `step` reads; `None` when it is not planned.
    pub fn get(&self, step: u64) -> Option<&Vec<usize>> {
        let i = usize::try_from(step.checked_sub(self.reading)?).ok()?;
        self.steps.get(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_planned_in_order_within_the_horizon_and_the_end() {
        let mut a = Ahead::new(5, 2, Some(8));
        assert_eq!((a.reading(), a.next()), (5, Some(5)));
        assert!(matches!(
            a.check_next(6),
            Err(PlanError::OutOfOrder { expected: 5, got: 6 })
        ));
        a.push(vec![1]);
        a.push(vec![2, 3]);
        assert_eq!((a.planned_until(), a.next()), (7, None), "the horizon is full");
        assert!(!a.advance(4), "never back");
        assert!(a.advance(6));
        assert_eq!((a.get(5), a.get(6), a.get(7)), (None, Some(&vec![2, 3]), None));
        a.push(vec![4]);
        assert!(a.advance(7));
        assert_eq!(a.next(), None, "step 8 is the end");
        assert!(a.advance(20), "past everything planned");
        assert_eq!((a.reading(), a.iter().count()), (20, 0));
        let b = Ahead::new(0, 3, None);
        assert_eq!(b.next(), Some(0));
    }
}
