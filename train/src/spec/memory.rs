//! What one rank of a job will hold, estimated from the spec's sizes alone, and the check
//! that refuses a spec whose largest rank would not fit (before anything is built).

use super::{DeviceSpec, JobSpec, Schedule, SpecError};

pub(super) const GIB: f64 = (1u64 << 30) as f64;

impl JobSpec {
    /// What the largest rank of this job will need, estimated from the sizes alone (in `f64`,
    /// so absurd sizes give huge figures, never an overflow). It is meant as a floor: every
    /// term is something the rank really holds, and libtorch's workspaces, the temporary
    /// global tensors of initialization and fragmentation come on top.
    pub fn memory_estimate(&self) -> MemoryEstimate {
        let (m, p, t) = (&self.model, &self.parallel, &self.train);
        let (tp, pp, dp) = (p.tp.max(1) as f64, p.pp.max(1) as f64, p.dp.max(1) as f64);
        let (d, f, v, s, b) = (
            m.d_model as f64,
            m.ffn() as f64,
            m.vocab_size as f64,
            m.seq_len as f64,
            t.micro_batch as f64,
        );
        let params = m.num_params();
        // The largest stage holds at least the average, and TP splits every big tensor.
        let params_per_rank = params as f64 / (tp * pp);
        let moments = if p.zero1 { 8.0 / dp } else { 8.0 };
        let state_bytes = params_per_rank * (4.0 + 4.0 + moments);
        let micro = self.micro_batches().max(1);
        let in_flight = match p.schedule {
            Schedule::OneFOneB => micro.min(p.pp.max(1)),
            Schedule::Gpipe => micro,
        };
        let layers = match p.stage_layers.iter().max() {
            Some(&n) => n,
            None => m.n_layers.div_ceil(p.pp.max(1)),
        };
        // Per token and layer: the two norms' inputs and outputs, QKV, the attention output,
        // the MLP's hidden activations before and after the nonlinearity.
        let elem = match t.device {
            DeviceSpec::Cpu => 4.0,
            DeviceSpec::Cuda => 2.0,
        };
        let per_layer = (4.0 * d + (4.0 * d + 2.0 * f) / tp) * elem;
        let tokens = b * s;
        let logits = tokens * (v / tp) * 4.0 * 2.0;
        let activation_bytes = in_flight as f64 * layers as f64 * tokens * per_layer + logits;
        // The prefetcher queues two steps' micro-batches of token and target ids (i64).
        let data_bytes = 2.0 * micro as f64 * tokens * 16.0;
        MemoryEstimate {
            params,
            params_per_rank,
            state_bytes,
            activation_bytes,
            data_bytes,
            in_flight,
            layers_per_stage: layers,
        }
    }

    /// Refuse the spec when [`memory_estimate`](Self::memory_estimate) is above
    /// `train.max_memory_gib`, or, when that is 0, above `machine_bytes_per_rank` (this
    /// machine's memory divided among its ranks, which the binary reads; `None`: unchecked).
    pub fn check_memory(&self, machine_bytes_per_rank: Option<u64>) -> Result<(), SpecError> {
        let explicit = self.train.max_memory_gib;
        let (limit_bytes, limit_source) = if explicit > 0.0 {
            (explicit * GIB, format!("`train.max_memory_gib` = {explicit}"))
        } else if let Some(bytes) = machine_bytes_per_rank {
            (
                bytes as f64,
                "this machine's memory divided among its ranks; `train.max_memory_gib` sets another limit".into(),
            )
        } else {
            return Ok(());
        };
        let e = self.memory_estimate();
        if e.total_bytes() <= limit_bytes {
            return Ok(());
        }
        let (m, t) = (&self.model, &self.train);
        let detail = format!(
            "{} of the model's {} parameters: {} of weights, gradients and AdamW moments; \
             {} of activations for {} micro-batch(es) in flight of micro_batch {} × seq_len {} \
             through {} layer(s) of d_model {} and logits over vocab_size {}; {} of prefetched tokens",
            count(e.params_per_rank),
            e.params,
            human_bytes(e.state_bytes),
            human_bytes(e.activation_bytes),
            e.in_flight,
            t.micro_batch,
            m.seq_len,
            e.layers_per_stage,
            m.d_model,
            m.vocab_size,
            human_bytes(e.data_bytes),
        );
        Err(SpecError::TooLarge {
            needed_bytes: e.total_bytes(),
            limit_bytes,
            detail,
            limit_source,
        })
    }
}

/// What one rank needs, by [`JobSpec::memory_estimate`].
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// Parameters of the whole model.
    pub params: u64,
    /// Parameters of the largest rank (at least `params / (tp × pp)`).
    pub params_per_rank: f64,
    /// fp32 weights and gradients, AdamW's two moments (divided over DP under ZeRO-1).
    pub state_bytes: f64,
    /// What the first stage keeps for backward, plus the logits and their gradient.
    pub activation_bytes: f64,
    /// Token and target ids queued by the data prefetcher.
    pub data_bytes: f64,
    /// Micro-batches whose activations a stage holds at once (1F1B: at most `pp`).
    pub in_flight: usize,
    pub layers_per_stage: usize,
}

impl MemoryEstimate {
    pub fn total_bytes(&self) -> f64 {
        self.state_bytes + self.activation_bytes + self.data_bytes
    }
}

/// `MemTotal` of `/proc/meminfo`'s text, in bytes (the binary reads the file).
pub fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

/// A count estimated in `f64`: whole below 10^15, else in exponent form (no false digits).
fn count(n: f64) -> String {
    if n < 1e15 {
        format!("{n:.0}")
    } else {
        format!("{n:.3e}")
    }
}

pub(super) fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let (mut value, mut unit) = (bytes, 0);
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value >= 1e6 {
        format!("{value:.3e} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
