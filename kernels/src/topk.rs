//! Per-row top-K as a 0/1 mask, two ways with the same result (up to exact ties at the
//! K-th value, which the multisection keeps).
//!
//! - [`topk_mask_sorted`]: Burn's `topk_with_indices` and a scatter. Burn sorts on the host
//!   for backends without a device sort (CubeCL's), so this is for the CPU.
//! - [`topk_mask_multisection`]: no sort. Each row's K-th largest value is bracketed by
//!   `[lo, hi)` and each round counts the values above 15 evenly spaced cut points at once,
//!   keeping the sixteenth of the bracket that holds the K-th value: 8 rounds narrow it by
//!   16⁸ ≈ 2³², below f32 resolution, in a fixed ~50 launches whatever K (CubeCL's own
//!   top-K reduce unrolls K at compile time: one huge kernel per K).

use burn::prelude::*;
use burn::tensor::{DType, IndexingUpdateOp};

/// Rounds of [`topk_mask_multisection`]; each divides the bracket by 16.
const ROUNDS: usize = 8;

/// `[rows, width]` 0/1 (in `logits`' dtype): 1 at each row's `k` largest logits.
pub fn topk_mask_sorted<B: Backend>(logits: Tensor<B, 2>, k: usize) -> Tensor<B, 2> {
    let [rows, width] = logits.dims();
    let (dtype, device) = (logits.dtype(), logits.device());
    let (_, idx) = logits.topk_with_indices(k, 1);
    Tensor::<B, 2>::zeros([rows, width], (&device, dtype)).scatter(
        1,
        idx,
        Tensor::ones([rows, k], (&device, dtype)),
        IndexingUpdateOp::Add,
    )
}

/// [`topk_mask_sorted`] without a sort (see the module comment): 1 where a logit is at
/// least the row's `k`-th largest.
pub fn topk_mask_multisection<B: Backend>(logits: Tensor<B, 2>, k: usize) -> Tensor<B, 2> {
    let dtype = logits.dtype();
    let x = if dtype == DType::F32 { logits } else { logits.cast(DType::F32) };
    let device = x.device();
    let k = k as f32;
    // Invariants: count(x ≥ lo) ≥ k, count(x ≥ hi) < k.
    let mut lo = x.clone().min_dim(1);
    let max = x.clone().max_dim(1);
    let mut hi = max.clone() + max.abs().add_scalar(1.0);
    let cuts = Tensor::<B, 1, Int>::arange(1..16, &device).float().div_scalar(16.0).reshape([1, 1, 15]);
    let values = x.clone().unsqueeze_dim::<3>(2);
    for _ in 0..ROUNDS {
        let span = (hi.clone() - lo.clone()).unsqueeze_dim::<3>(2);
        let at = lo.clone().unsqueeze_dim::<3>(2) + span.clone() * cuts.clone();
        // Values at or above each cut, per row: [rows, 1, 15], non-increasing along the cuts.
        let counts = values.clone().greater_equal(at).float().sum_dim(1);
        let passing = counts.greater_equal_elem(k).float().sum_dim(2);
        // Cut j = passing keeps count ≥ k; cut j + 1 does not. Same arithmetic as `at`, so
        // the new bounds are exactly the cut points counted.
        let span = span.squeeze_dim::<2>(2);
        let new_lo = lo.clone() + span.clone() * passing.clone().squeeze_dim::<2>(2).div_scalar(16.0);
        let next = passing.squeeze_dim::<2>(2).add_scalar(1.0);
        let new_hi = lo + span * next.clone().div_scalar(16.0);
        hi = new_hi.mask_where(next.greater_equal_elem(16.0), hi);
        lo = new_lo;
    }
    let mask = x.greater_equal(lo).float();
    if dtype == DType::F32 { mask } else { mask.cast(dtype) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    #[test]
    fn multisection_keeps_exactly_the_top_k() {
        let device = Default::default();
        for (rows, width, k, scale) in [(5, 1024, 103, 1.0), (3, 8, 1, 1.0), (7, 1024, 1000, 40.0), (2, 4096, 427, 1e-3)] {
            let logits = Tensor::<Flex, 2>::random([rows, width], Distribution::Normal(0.0, scale), &device);
            let sorted = topk_mask_sorted(logits.clone(), k);
            let multi = topk_mask_multisection(logits, k);
            let counts: Vec<f32> = multi.clone().sum_dim(1).into_data().to_vec().unwrap();
            assert!(counts.iter().all(|&c| c == k as f32), "{rows}x{width} k {k}: kept {counts:?}");
            let diff: f32 = (sorted - multi).abs().sum().into_scalar();
            assert_eq!(diff, 0.0, "{rows}x{width} k {k}");
        }
    }
}
