//! Calibration: from a predictor's logits on validation rows and the true labels, the
//! operating points that reach a target recall.
//!
//! Recall is micro-averaged, as the reference reports it: over all validation rows, the
//! fraction of true positives (active neurons, or top heads) that the selection keeps.
//! Two ways to select are calibrated:
//! - **top-K** (what the reference does at inference): the smallest K whose per-row top-K
//!   keeps the target fraction of positives; its density is K / outputs.
//! - **logit threshold**: the largest threshold t with `logit ≥ t` keeping the target
//!   fraction; its density (mean fraction of outputs selected) varies per token.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub target_recall: f64,
    /// Mean fraction of outputs that are truly positive.
    pub true_density: f64,
    pub k: usize,
    pub recall_at_k: f64,
    /// K / outputs.
    pub density_at_k: f64,
    pub threshold: f32,
    pub recall_at_threshold: f64,
    pub density_at_threshold: f64,
}

/// `logits` and `labels` are `rows × outputs`, row-major. Rows without a positive count
/// toward densities but not recall. Returns `None` when there is no positive at all.
pub fn calibrate(logits: &[f32], labels: &[bool], outputs: usize, target_recall: f64) -> Option<Calibration> {
    assert_eq!(logits.len(), labels.len(), "logits and labels differ in length");
    assert!(outputs > 0 && logits.len() % outputs == 0, "logits are not rows of {outputs}");
    let rows = logits.len() / outputs;
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 {
        return None;
    }
    let needed = (target_recall * positives as f64).ceil() as usize;

    // rank_hist[r]: positives that are the r-th largest logit of their row (ties broken
    // against the positive, so recall is never overstated).
    let mut rank_hist = vec![0usize; outputs];
    let mut order: Vec<usize> = Vec::with_capacity(outputs);
    for r in 0..rows {
        let row = &logits[r * outputs..(r + 1) * outputs];
        let lab = &labels[r * outputs..(r + 1) * outputs];
        order.clear();
        order.extend(0..outputs);
        // Descending logit; among equal logits negatives first.
        order.sort_unstable_by(|&a, &b| row[b].total_cmp(&row[a]).then(lab[a].cmp(&lab[b])));
        for (rank, &j) in order.iter().enumerate() {
            if lab[j] {
                rank_hist[rank] += 1;
            }
        }
    }
    let mut kept = 0usize;
    let mut k = outputs;
    for (rank, &count) in rank_hist.iter().enumerate() {
        kept += count;
        if kept >= needed {
            k = rank + 1;
            break;
        }
    }
    let recall_at_k = rank_hist[..k].iter().sum::<usize>() as f64 / positives as f64;

    let mut positive_logits: Vec<f32> = logits.iter().zip(labels).filter(|(_, &l)| l).map(|(&z, _)| z).collect();
    positive_logits.sort_unstable_by(|a, b| b.total_cmp(a));
    let threshold = positive_logits[needed.max(1) - 1];
    let recall_at_threshold = positive_logits.iter().filter(|&&z| z >= threshold).count() as f64 / positives as f64;
    let selected = logits.iter().filter(|&&z| z >= threshold).count();

    Some(Calibration {
        target_recall,
        true_density: positives as f64 / logits.len() as f64,
        k,
        recall_at_k,
        density_at_k: k as f64 / outputs as f64,
        threshold,
        recall_at_threshold,
        density_at_threshold: selected as f64 / logits.len() as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_scores_need_only_the_positives() {
        // 2 rows of 4: row 0 has positives {1, 3}, row 1 has {0}.
        let labels = [false, true, false, true, true, false, false, false];
        let logits = [-1.0, 2.0, -3.0, 1.0, 5.0, -1.0, -2.0, -4.0];
        let c = calibrate(&logits, &labels, 4, 1.0).unwrap();
        assert_eq!(c.k, 2);
        assert_eq!(c.recall_at_k, 1.0);
        assert_eq!(c.threshold, 1.0);
        assert_eq!(c.recall_at_threshold, 1.0);
        assert!((c.density_at_threshold - 3.0 / 8.0).abs() < 1e-12);
        assert!((c.true_density - 3.0 / 8.0).abs() < 1e-12);
    }

    #[test]
    fn a_badly_ranked_positive_raises_k_only_when_the_target_needs_it() {
        // 4 rows of 4, one positive each; the last row's positive ranks last.
        let mut logits = vec![0.0f32; 16];
        let mut labels = vec![false; 16];
        for r in 0..4 {
            let j = if r == 3 { 0 } else { r };
            labels[r * 4 + j] = true;
            for c in 0..4 {
                logits[r * 4 + c] = if c == j { if r == 3 { -9.0 } else { 3.0 } } else { -(c as f32) };
            }
        }
        let loose = calibrate(&logits, &labels, 4, 0.75).unwrap();
        assert_eq!((loose.k, loose.recall_at_k), (1, 0.75));
        assert_eq!(loose.threshold, 3.0);
        let strict = calibrate(&logits, &labels, 4, 1.0).unwrap();
        assert_eq!((strict.k, strict.recall_at_k), (4, 1.0));
        assert_eq!(strict.threshold, -9.0);
        assert_eq!(strict.density_at_threshold, 1.0);
        assert!(calibrate(&logits, &[false; 16], 4, 0.9).is_none());
    }
}
