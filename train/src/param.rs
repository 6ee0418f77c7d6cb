//! Parameters as slices of global tensors. Every parameter knows its global name and shape
//! and which hyper-rectangle of it this rank holds, so initialization, gradient-norm
//! accounting and (later) checkpoints see the same global model whatever the layout.
//!
//! Initialization is layout-independent: a tensor's values come from a seed derived from
//! (job seed, tensor name) and are generated globally, then sliced. Two layouts therefore
//! start from bit-identical global weights.

use crate::error::TrainError;
use tch::{Device, Kind, TchError, Tensor};

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal { std: f64 },
    Zeros,
    Ones,
}

/// Index of a parameter in its stage's [`ParamStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

pub struct Param {
    /// Global name, e.g. `layers.3.attn.qkv.weight`.
    pub name: String,
    pub global_shape: Vec<i64>,
    /// Start of this rank's slice along each dimension (all zero when unsharded).
    pub offsets: Vec<i64>,
    /// The local values: a leaf that requires grad. In training, a view of its bucket's flat
    /// buffer, with its `.grad` a view of the bucket's gradient buffer ([`crate::data_parallel`]).
    pub tensor: Tensor,
    /// Identical on every TP rank (norms, biases after a reduction, position embeddings):
    /// counted once in the global gradient norm.
    pub tp_replicated: bool,
    /// Gets weight decay (matrices and embeddings; not norms or biases).
    pub decay: bool,
    /// The last pipeline stage's copy of a tied embedding: kept equal to the first stage's
    /// by summing their gradients; not counted again in the norm.
    pub tied_copy: bool,
    /// The dimension tensor parallelism splits this parameter along (whatever the TP degree
    /// of this run), or `None` when every TP rank holds all of it.
    pub tp_split: Option<usize>,
}

impl Param {
    pub fn local_shape(&self) -> Vec<i64> {
        self.tensor.size()
    }
    pub fn numel(&self) -> usize {
        self.tensor.numel()
    }
    /// Counts toward the global gradient norm on this rank (with `tp_rank`).
    pub fn counts_in_norm(&self, tp_rank: usize) -> bool {
        !self.tied_copy && (!self.tp_replicated || tp_rank == 0)
    }
}

/// The parameters of one pipeline stage on one rank, in creation order (= forward order;
/// gradients become ready roughly in reverse).
pub struct ParamStore {
    params: Vec<Param>,
    seed: u64,
    device: Device,
    fill: Fill,
}

/// What [`ParamStore::add`] puts in a new parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    /// Its initialization, generated globally from the tensor's seed and sliced.
    Initialized,
    /// Zeros, for weights about to be loaded (no global tensor is generated).
    Zeros,
    /// Nothing: only names, shapes and splits are recorded ([`ParamStore::meta`]).
    Meta,
}

static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Deterministic per-tensor seed (FNV-1a over the name, mixed with the job seed).
pub fn tensor_seed(seed: u64, name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 1) as i64
}

pub struct NewParam<'a> {
    pub name: &'a str,
    pub global_shape: &'a [i64],
    /// (dimension, number of parts, this rank's part): the slice along one dimension.
    pub split: Option<(usize, i64, i64)>,
    pub init: Init,
    pub decay: bool,
    pub tied_copy: bool,
}

impl ParamStore {
    pub fn new(seed: u64, device: Device) -> ParamStore {
        ParamStore {
            params: Vec::new(),
            seed,
            device,
            fill: Fill::Initialized,
        }
    }

    /// A store whose parameters start as zeros of their local shape, for a model whose
    /// weights are loaded right after (evaluation, serving): nothing is generated.
    pub fn zeroed(device: Device) -> ParamStore {
        ParamStore {
            fill: Fill::Zeros,
            ..ParamStore::new(0, device)
        }
    }

    /// A store that creates no values: building a model into it lists every parameter's
    /// name, global shape and TP split without allocating the model (tensors are empty).
    pub fn meta() -> ParamStore {
        ParamStore {
            fill: Fill::Meta,
            ..ParamStore::new(0, Device::Cpu)
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// A store from [`ParamStore::meta`]: names and shapes only.
    pub fn is_meta(&self) -> bool {
        self.fill == Fill::Meta
    }

    /// Create a parameter: generate the global tensor from its seed (on the CPU, so every
    /// device and layout gets the same numbers), keep this rank's slice. A libtorch failure
    /// (an allocation it cannot make) is an error naming the tensor, not a panic.
    pub fn add(&mut self, p: NewParam<'_>) -> Result<ParamId, TrainError> {
        let shape = p.global_shape.to_vec();
        let mut offsets = vec![0i64; shape.len()];
        let tp_split = p.split.map(|(dim, _, _)| dim);
        let tp_replicated = !matches!(p.split, Some((_, parts, _)) if parts > 1);
        let tensor = self.values(&p, &mut offsets).map_err(|source| TrainError::ModelBuild {
            tensor: p.name.to_string(),
            shape: shape.clone(),
            source,
        })?;
        self.params.push(Param {
            name: p.name.to_string(),
            global_shape: shape,
            offsets,
            tensor,
            tp_replicated,
            decay: p.decay,
            tied_copy: p.tied_copy,
            tp_split,
        });
        Ok(ParamId(self.params.len() - 1))
    }

    /// A new parameter's local values (and its slice's `offsets`), through libtorch's
    /// fallible calls.
    fn values(&self, p: &NewParam<'_>, offsets: &mut [i64]) -> Result<Tensor, TchError> {
        let shape = p.global_shape;
        let cpu = (Kind::Float, Device::Cpu);
        if self.fill == Fill::Meta {
            return Tensor::f_empty([0], cpu);
        }
        let full = match p.init {
            _ if self.fill == Fill::Zeros => {
                let mut local = shape.to_vec();
                if let Some((dim, parts, _)) = p.split.filter(|s| s.1 > 1) {
                    local[dim] /= parts;
                }
                Tensor::f_zeros(&local, cpu)?
            }
            Init::Zeros => Tensor::f_zeros(shape, cpu)?,
            Init::Ones => Tensor::f_ones(shape, cpu)?,
            Init::Normal { std } => {
                // libtorch's generator is global: seed and draw under one lock, so models built
                // on several threads at once (tests, a server) still get their own numbers.
                let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
                tch::manual_seed(tensor_seed(self.seed, p.name));
                Tensor::f_randn(shape, cpu)?.f_mul_scalar(std)?
            }
        };
        let local = match p.split {
            Some((dim, parts, part)) if parts > 1 && self.fill == Fill::Zeros => {
                offsets[dim] = part * (shape[dim] / parts);
                full
            }
            Some((dim, parts, part)) if parts > 1 => {
                let len = shape[dim] / parts;
                offsets[dim] = part * len;
                full.f_narrow(dim as i64, part * len, len)?
            }
            _ => full,
        };
        local
            .f_contiguous()?
            .f_to_device(self.device)?
            .f_detach()?
            .f_set_requires_grad(true)
    }

    pub fn get(&self, id: ParamId) -> &Tensor {
        &self.params[id.0].tensor
    }

    pub fn param(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }

    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &Param)> {
        self.params.iter().enumerate().map(|(i, p)| (ParamId(i), p))
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    pub fn numel(&self) -> usize {
        self.params.iter().map(Param::numel).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_of_a_split_parameter_tile_the_unsplit_one() {
        let mut whole = ParamStore::new(7, Device::Cpu);
        let w = whole
            .add(NewParam {
                name: "w",
                global_shape: &[3, 8, 4],
                split: None,
                init: Init::Normal { std: 1.0 },
                decay: true,
                tied_copy: false,
            })
            .unwrap();
        let parts: Vec<Tensor> = (0..2)
            .map(|r| {
                let mut s = ParamStore::new(7, Device::Cpu);
                let id = s
                    .add(NewParam {
                        name: "w",
                        global_shape: &[3, 8, 4],
                        split: Some((1, 2, r)),
                        init: Init::Normal { std: 1.0 },
                        decay: true,
                        tied_copy: false,
                    })
                    .unwrap();
                assert_eq!(s.param(id).offsets, vec![0, 4 * r, 0]);
                assert!(!s.param(id).tp_replicated);
                s.get(id).detach()
            })
            .collect();
        let joined = Tensor::cat(&parts, 1);
        assert!(joined.equal(&whole.get(w).detach()));
    }

    #[test]
    fn a_tensor_libtorch_cannot_create_is_an_error_naming_it() {
        for fill in [ParamStore::new(7, Device::Cpu), ParamStore::zeroed(Device::Cpu)] {
            let mut s = fill;
            let e = s
                .add(NewParam {
                    name: "layers.0.mlp.fc.weight",
                    global_shape: &[-4, 8],
                    split: None,
                    init: Init::Normal { std: 1.0 },
                    decay: true,
                    tied_copy: false,
                })
                .unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, TrainError::ModelBuild { .. }), "{msg}");
            assert!(
                msg.contains("layers.0.mlp.fc.weight") && msg.contains("[-4, 8]"),
                "{msg}"
            );
            assert!(s.is_empty(), "nothing is added on failure");
        }
    }

    #[test]
    fn seeds_differ_by_name_and_job_seed() {
        assert_ne!(tensor_seed(1, "a"), tensor_seed(1, "b"));
        assert_ne!(tensor_seed(1, "a"), tensor_seed(2, "a"));
        assert_eq!(tensor_seed(3, "x.y"), tensor_seed(3, "x.y"));
    }
}
