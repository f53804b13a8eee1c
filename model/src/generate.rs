//! Autoregressive generation: a prompt prefill, then one token per step through the
//! KV cache, each token handed to the caller as soon as it exists.

use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::TensorData;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use dejavu_kernels::SparseKernels;

use crate::error::ModelError;
use crate::hooks::ForwardHooks;
use crate::opt::Opt;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first one on ties).
    Greedy,
    /// A draw from the softmax of `logits / temperature`, restricted to the `top_k` most
    /// likely tokens and then to the smallest set whose probability reaches `top_p`.
    Random {
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
    },
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Stop after producing this token (OPT's `</s>`), if set.
    pub eos_token: Option<u32>,
}

/// What a generation produced and how long it took.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The new tokens (the prompt not included).
    pub tokens: Vec<u32>,
    /// Time of the prompt forward pass, up to the first new token.
    pub prefill: Duration,
    /// Time of the steps after the first token.
    pub decode: Duration,
}

impl Generation {
    /// New tokens per second over the decode steps (after the first token).
    pub fn decode_tokens_per_second(&self) -> f64 {
        let steps = self.tokens.len().saturating_sub(1);
        if steps == 0 || self.decode.is_zero() {
            return 0.0;
        }
        steps as f64 / self.decode.as_secs_f64()
    }
}

/// Picks tokens from logits, carrying the random state between steps.
#[derive(Debug)]
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Result<Self, ModelError> {
        let seed = match &sampling {
            Sampling::Greedy => 0,
            Sampling::Random {
                temperature,
                top_k,
                top_p,
                seed,
            } => {
                if !(*temperature > 0.0 && temperature.is_finite()) {
                    return Err(ModelError::InvalidInput(format!(
                        "temperature must be positive, got {temperature}"
                    )));
                }
                if *top_k == Some(0) {
                    return Err(ModelError::InvalidInput("top-k must be at least 1".into()));
                }
                if let Some(p) = top_p {
                    if !(*p > 0.0 && *p <= 1.0) {
                        return Err(ModelError::InvalidInput(format!(
                            "top-p must be in (0, 1], got {p}"
                        )));
                    }
                }
                *seed
            }
        };
        Ok(Self {
            sampling,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// The next token for the last position of `hidden` (`[1, n, d]`, the decoder's
    /// output). Greedy selection runs on the device ([`greedy_tokens`]: the argmax of the LM
    /// head's output in the weights' dtype) and reads back one id; a random draw reads back
    /// the f32 logits and samples on the host.
    pub fn next<B: SparseKernels>(&mut self, model: &Opt<B>, hidden: Tensor<B, 3>) -> Result<u32, ModelError> {
        let [_, n, width] = hidden.dims();
        let last = hidden.slice([0..1, n - 1..n, 0..width]);
        match self.sampling.clone() {
            Sampling::Greedy => {
                let id = greedy_tokens(model, last)?.into_data();
                let id = id.iter::<i64>().next().expect("one position's token");
                Ok(id as u32)
            }
            Sampling::Random {
                temperature,
                top_k,
                top_p,
                ..
            } => {
                let row: Vec<f32> = model.logits(last).into_data().iter::<f32>().collect();
                Ok(self.sample(&row, temperature, top_k, top_p))
            }
        }
    }

    fn sample(&mut self, logits: &[f32], temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> u32 {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if let Some(k) = top_k {
            order.truncate(k.max(1));
        }
        let max = logits[order[0]];
        let mut weights: Vec<f64> = order
            .iter()
            .map(|&i| (((logits[i] - max) / temperature) as f64).exp())
            .collect();
        if let Some(p) = top_p {
            let total: f64 = weights.iter().sum();
            let mut cumulative = 0.0;
            let mut keep = weights.len();
            for (i, w) in weights.iter().enumerate() {
                cumulative += w / total;
                if cumulative >= p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            weights.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = weights.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (w, &i) in weights.iter().zip(&order) {
            if u < *w {
                return i as u32;
            }
            u -= w;
        }
        *order.last().expect("at least one candidate") as u32
    }
}

/// Up to this many rows (`batch·n`) a backend with the kernels computes the greedy LM head
/// with our GEMV ([`dejavu_kernels::gemv`]); more rows take Burn's matmul, which reads the
/// weights once for all of them.
const GEMV_LM_HEAD_ROWS: usize = 4;

/// The greedy next token of each position of `hidden` (`[batch, n, d]`), `[batch·n]` on
/// the device: the argmax of the logits in the weights' dtype, read where the LM head left
/// them. With the kernels and a decode step's few rows the LM head is our GEMV: one launch
/// with `Array` arguments, where Burn's matmul also runs its autotuner's bookkeeping and
/// uploads its tensors' shapes at every call — host work a decode step repeats — and
/// sums in f32. Otherwise it is [`Opt::logits_rows`], whose argmax is that of
/// [`Opt::logits`] (a cast to f32 is exact) without its cast and copy launches.
pub fn greedy_tokens<B: SparseKernels>(model: &Opt<B>, hidden: Tensor<B, 3>) -> Result<Tensor<B, 1, Int>, ModelError> {
    let err = |e: dejavu_kernels::KernelError| ModelError::InvalidInput(format!("greedy decoding: {e}"));
    let [batch, n, e] = hidden.dims();
    let logits = match B::has_kernels() && batch * n <= GEMV_LM_HEAD_ROWS {
        true => dejavu_kernels::gemv(model.lm_head(), hidden.reshape([batch * n, e]), None, dejavu_kernels::Activation::Identity).map_err(err)?,
        false => model.logits_rows(hidden),
    };
    dejavu_kernels::argmax_rows(logits).map_err(err)
}

/// `[1, n]` token tensor from ids.
pub fn token_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}

/// Generates up to `options.max_new_tokens` after `prompt`, calling `on_token` with each
/// new token as soon as it is chosen; `on_token` returning `false` stops early.
pub fn generate<B: SparseKernels, H: ForwardHooks<B> + ?Sized>(
    model: &Opt<B>,
    hooks: &mut H,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::InvalidInput("the prompt has no tokens".into()));
    }
    let total = prompt.len() + options.max_new_tokens;
    if total > model.max_positions {
        return Err(ModelError::ContextTooLong {
            requested: total,
            limit: model.max_positions,
        });
    }
    let mut sampler = Sampler::new(options.sampling.clone())?;
    let device = model.device();
    let mut cache = model.new_cache(1, total)?;
    let mut tokens = Vec::with_capacity(options.max_new_tokens);
    let started = Instant::now();
    let mut prefill = Duration::ZERO;
    let mut input = prompt.to_vec();
    while tokens.len() < options.max_new_tokens {
        let hidden = model.forward_with(token_tensor::<B>(&input, &device), &mut cache, hooks)?;
        let next = sampler.next(model, hidden)?;
        if tokens.is_empty() {
            prefill = started.elapsed();
        }
        tokens.push(next);
        if !on_token(next) || options.eos_token == Some(next) {
            break;
        }
        input = vec![next];
    }
    Ok(Generation {
        tokens,
        prefill,
        decode: started.elapsed() - prefill,
    })
}
