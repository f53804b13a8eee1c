//! Perplexity of a token sequence, by the two conventions in use.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::TensorData;

use crate::error::ModelError;
use crate::generate::token_tensor;
use crate::hooks::ForwardHooks;
use crate::opt::Opt;

/// How a long text is cut into windows the model can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PerplexityMethod {
    /// The Hugging Face perplexity guide: windows of `window` tokens starting every
    /// `stride` tokens; each token is scored once, in the first window that has it among
    /// its last `window - stride`-or-so new tokens, so it sees up to `window - stride`
    /// tokens of context.
    Strided { window: usize, stride: usize },
    /// OPT/GPTQ papers: non-overlapping windows of `window` tokens (a tail shorter than a
    /// window is dropped); every token but each window's first is scored.
    NonOverlapping { window: usize },
}

/// The result of [`perplexity`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct PerplexityReport {
    pub method: PerplexityMethod,
    pub perplexity: f64,
    /// Sum of the negative log-likelihoods (nats) of the scored tokens.
    pub nll_sum: f64,
    pub tokens_scored: usize,
    pub windows: usize,
    pub text_tokens: usize,
}

/// One forward pass: the ids of a window and which of its positions are scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    /// Positions `score_from..end - begin` of the window are scored (always ≥ 1: the
    /// first token of a window has no context and no prediction).
    pub score_from: usize,
}

impl PerplexityMethod {
    /// The windows this method runs over a text of `len` tokens.
    pub fn windows(&self, len: usize) -> Result<Vec<Window>, ModelError> {
        if len < 2 {
            return Err(ModelError::InvalidInput(format!(
                "the text has {len} token(s); perplexity needs at least 2"
            )));
        }
        match *self {
            PerplexityMethod::Strided { window, stride } => {
                if window < 2 || stride == 0 || stride > window {
                    return Err(ModelError::InvalidInput(format!(
                        "need window ≥ 2 and 0 < stride ≤ window (got window {window}, stride {stride})"
                    )));
                }
                let mut windows = Vec::new();
                let mut prev_end = 0;
                let mut begin = 0;
                while begin < len {
                    let end = (begin + window).min(len);
                    let new_tokens = end - prev_end;
                    let n = end - begin;
                    windows.push(Window {
                        begin,
                        end,
                        score_from: (n - new_tokens).max(1),
                    });
                    prev_end = end;
                    if end == len {
                        break;
                    }
                    begin += stride;
                }
                Ok(windows)
            }
            PerplexityMethod::NonOverlapping { window } => {
                if window < 2 {
                    return Err(ModelError::InvalidInput(format!("window must be ≥ 2, got {window}")));
                }
                if len < window {
                    return Err(ModelError::InvalidInput(format!(
                        "the text has {len} tokens, fewer than one window of {window}"
                    )));
                }
                Ok((0..len / window)
                    .map(|i| Window {
                        begin: i * window,
                        end: (i + 1) * window,
                        score_from: 1,
                    })
                    .collect())
            }
        }
    }

    pub fn window_len(&self) -> usize {
        match *self {
            PerplexityMethod::Strided { window, .. } | PerplexityMethod::NonOverlapping { window } => window,
        }
    }
}

/// Log-probabilities of the targets `ids[1..]` at positions `0..n-1` of `logits`
/// (`[1, n, vocab]`), read back to the host.
pub fn target_log_probs<B: Backend>(logits: Tensor<B, 3>, ids: &[u32]) -> Vec<f32> {
    let [_, n, vocab] = logits.dims();
    let device = logits.device();
    let log_probs = log_softmax(logits.slice([0..1, 0..n - 1, 0..vocab]), 2);
    let targets: Vec<i32> = ids[1..n].iter().map(|&t| t as i32).collect();
    let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [1, n - 1, 1]), &device);
    log_probs
        .gather(2, targets)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

/// Perplexity of `ids` under `model` (run through `hooks`), calling `progress(done,
/// total)` after each window.
pub fn perplexity<B: Backend, H: ForwardHooks<B> + ?Sized>(
    model: &Opt<B>,
    hooks: &mut H,
    ids: &[u32],
    method: PerplexityMethod,
    mut progress: impl FnMut(usize, usize),
) -> Result<PerplexityReport, ModelError> {
    let windows = method.windows(ids.len())?;
    if method.window_len() > model.max_positions {
        return Err(ModelError::ContextTooLong {
            requested: method.window_len(),
            limit: model.max_positions,
        });
    }
    let device = model.device();
    let mut cache = model.new_cache(1, method.window_len())?;
    let mut nll_sum = 0.0f64;
    let mut scored = 0usize;
    for (i, w) in windows.iter().enumerate() {
        cache.reset();
        let window_ids = &ids[w.begin..w.end];
        let hidden = model.forward_with(token_tensor::<B>(window_ids, &device), &mut cache, hooks)?;
        let log_probs = target_log_probs(model.logits(hidden), window_ids);
        // log_probs[j - 1] is the log-probability of window token j.
        for lp in &log_probs[w.score_from - 1..] {
            nll_sum -= *lp as f64;
        }
        scored += log_probs.len() + 1 - w.score_from;
        progress(i + 1, windows.len());
    }
    Ok(PerplexityReport {
        method,
        perplexity: (nll_sum / scored as f64).exp(),
        nll_sum,
        tokens_scored: scored,
        windows: windows.len(),
        text_tokens: ids.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_windows_score_every_token_but_the_first_once() {
        for (len, window, stride) in [(10, 4, 2), (1000, 1024, 512), (2500, 1024, 512), (7, 3, 2)] {
            let windows = PerplexityMethod::Strided { window, stride }.windows(len).unwrap();
            let mut scored = vec![0; len];
            for w in &windows {
                assert!(w.end - w.begin <= window);
                for j in w.score_from..w.end - w.begin {
                    scored[w.begin + j] += 1;
                }
            }
            assert_eq!(scored[0], 0);
            assert!(scored[1..].iter().all(|&c| c == 1), "{len} {window} {stride}: {scored:?}");
        }
    }

    #[test]
    fn stride_equal_to_window_leaves_window_starts_unscored_as_hugging_face_does() {
        let windows = PerplexityMethod::Strided { window: 3, stride: 3 }.windows(7).unwrap();
        let starts: Vec<_> = windows.iter().map(|w| (w.begin, w.score_from)).collect();
        assert_eq!(starts, vec![(0, 1), (3, 1), (6, 1)]);
    }

    #[test]
    fn non_overlapping_drops_the_tail() {
        let windows = PerplexityMethod::NonOverlapping { window: 4 }.windows(10).unwrap();
        assert_eq!(windows.len(), 2);
        assert_eq!(windows[1], Window { begin: 4, end: 8, score_from: 1 });
        assert!(PerplexityMethod::NonOverlapping { window: 4 }.windows(3).is_err());
    }

    #[test]
    fn too_short_text_is_an_error() {
        let err = PerplexityMethod::Strided { window: 4, stride: 2 }.windows(1).unwrap_err();
        assert!(err.to_string().contains("at least 2"), "{err}");
    }
}
