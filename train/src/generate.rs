//! End-of-run samples: continue the start of a validation sample with sampled tokens, run
//! through the same pipeline and tensor-parallel layers as training (forward only, the full
//! window recomputed per token; these are short demonstrations, not a serving path).
//! The data-parallel rank 0 replica does the work; the last stage samples with the same
//! sampler as serving (`gantry_sharding::next_token`: temperature 0.8, top-k 40, seeded) and
//! broadcasts each token to the other stages.

use crate::comm::TensorComm;
use crate::error::TrainError;
use crate::feed::split;
use crate::model::{MicroBatch, Model};
use crate::pipeline::forward_stage;
use crate::place::RankPlace;
use crate::schedule::{Op, tag};
use crate::spec::JobSpec;
use crate::tensor_parallel::gather_vocab;
use gantry_sharding::gpt::{GptDataset, OpenOptions};
use gantry_sharding::manifest::{Manifest, TokenizerInfo};
use gantry_sharding::next_token::{SamplingParams, TokenSampler};
use tch::{Device, Kind, Tensor};

const SAMPLES: usize = 2;

/// How end-of-run samples are drawn: seeded from the job's seed, so a run's samples repeat.
fn sampling(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 1.0,
        seed: seed ^ 0x005a_4d50_4c45,
    }
}

/// Returns the decoded samples on the reporting rank, nothing elsewhere.
pub fn sample(
    spec: &JobSpec,
    model: &Model,
    tp: &mut TensorComm,
    pp: &mut TensorComm,
    place: &RankPlace,
    data: &OpenOptions,
) -> Result<Vec<String>, TrainError> {
    let device = place.device;
    if place.dp_rank != 0 {
        return Ok(Vec::new());
    }
    let seq = spec.model.seq_len;
    let prompt_len = (seq / 4).clamp(1, 32);
    let last_stage = pp.size() - 1;
    let mut sampler = TokenSampler::new(sampling(spec.train.seed));
    let mut out = Vec::new();
    // Prompts come from the validation split, read by stage 0 only.
    let prompts = match model.plan.first {
        true => Some(GptDataset::open_with(spec.data.dir()?, seq, split(spec, true), data)?),
        false => None,
    };
    for s in 0..SAMPLES {
        // The prompt: the first tokens of validation sample `s`, read by stage 0, broadcast.
        let mut prompt = vec![0i64; prompt_len];
        if let Some(ds) = &prompts {
            let mut toks = Vec::new();
            ds.sample_into((s as u64) % ds.num_samples().max(1), &mut toks)?;
            prompt.copy_from_slice(&toks[..prompt_len]);
        }
        pp.broadcast_slice(&mut prompt, 0)?;
        let mut context = prompt.clone();
        for _ in 0..spec.train.sample_tokens {
            let window = &context[context.len().saturating_sub(seq)..];
            let t = window.len() as i64;
            let tokens = Tensor::from_slice(window).view([1, t]).to_device(device);
            let batch = MicroBatch {
                targets: tokens.shallow_clone(),
                tokens,
            };
            let input = if model.plan.first {
                None
            } else {
                let shape = [1, t, spec.model.d_model as i64];
                Some(pp.recv(&shape, device, pp.rank() - 1, tag(Op::RecvForward { mb: 0 }))?)
            };
            let (y, _) = tch::no_grad(|| forward_stage(model, input, &batch, tp, false, device != Device::Cpu, true))?;
            let mut next = [0i64];
            if model.plan.last {
                let shard = model.vocab_shard().expect("the last stage has the head");
                let logits = gather_vocab(tp, &y, shard)?;
                next[0] = i64::from(sampler.next(&logits_row(&logits)?));
            } else {
                pp.send(&y, pp.rank() + 1, tag(Op::SendForward { mb: 0 }))?;
            }
            pp.broadcast_slice(&mut next, last_stage)?;
            context.push(next[0]);
        }
        if place.reports() {
            out.push(decode(spec, &prompt, &context[prompt_len..]));
        }
    }
    Ok(out)
}

/// `[1, V]` logits as one row of `f32` on the host, for the sampler.
fn logits_row(logits: &Tensor) -> Result<Vec<f32>, TrainError> {
    Ok(Vec::<f32>::try_from(
        &logits.to_kind(Kind::Float).view([-1]).to_device(Device::Cpu),
    )?)
}

/// `prompt ⟶ continuation` as text when the data has a tokenizer, else as token ids.
fn decode(spec: &JobSpec, prompt: &[i64], cont: &[i64]) -> String {
    let text = |ids: &[i64]| -> String {
        let as_ids = || ids.iter().map(i64::to_string).collect::<Vec<_>>().join(" ");
        let Ok(dir) = spec.data.dir() else {
            return as_ids();
        };
        match Manifest::read(dir).map(|m| m.tokenizer) {
            Ok(TokenizerInfo::File { path }) => {
                let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                gantry_sharding::prepare::decode_with(&dir.join(path), &ids).unwrap_or_else(|_| as_ids())
            }
            Ok(TokenizerInfo::Bytes) => {
                String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned()
            }
            _ => as_ids(),
        }
    };
    format!("{} ⟶ {}", text(prompt), text(cont))
}
