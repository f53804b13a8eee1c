//! Plain host loops (f64 accumulation) that define what each kernel must compute. Tests
//! and `dejavu-bench kernels --check` compare the device's results with these, never
//! with Burn's own matmul (which runs in TF32 on CUDA).

/// `out [batch, k] = act(W[row_j] · x[b] + bias[row_j])`, `w` row-major `[rows, d]`.
/// `idx` `None` means every row; out-of-range entries give 0.
#[allow(clippy::too_many_arguments)]
pub fn rows_gemv(
    w: &[f32],
    rows: usize,
    d: usize,
    idx: Option<&[i64]>,
    x: &[f32],
    batch: usize,
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let selected: Vec<i64> = match idx {
        Some(i) => i.to_vec(),
        None => (0..rows as i64).collect(),
    };
    let k = selected.len();
    let mut out = vec![0f32; batch * k];
    for b in 0..batch {
        for (j, &row) in selected.iter().enumerate() {
            if row < 0 || row as usize >= rows {
                continue;
            }
            let row = row as usize;
            let mut acc = 0f64;
            for t in 0..d {
                acc += w[row * d + t] as f64 * x[b * d + t] as f64;
            }
            if let Some(bias) = bias {
                acc += bias[row] as f64;
            }
            if relu {
                acc = acc.max(0.0);
            }
            out[b * k + j] = acc as f32;
        }
    }
    out
}

/// `out [batch, rows] = W[:, cols] · x[b] + bias + residual[b]`, `w` row-major `[rows, d]`,
/// `cols` the column blocks `idx` picks (`block` columns each; every column when `None`),
/// `x [batch, len·block]` their inputs side by side; an out-of-range id contributes 0.
#[allow(clippy::too_many_arguments)]
pub fn block_cols_gemv(
    w: &[f32],
    rows: usize,
    d: usize,
    idx: Option<&[i64]>,
    block: usize,
    x: &[f32],
    batch: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let cols: Vec<i64> = match idx {
        Some(ids) => block_rows(ids, block, d),
        None => (0..d as i64).collect(),
    };
    let width = cols.len();
    let mut out = vec![0f32; batch * rows];
    for b in 0..batch {
        for r in 0..rows {
            let mut acc = 0f64;
            for (t, &c) in cols.iter().enumerate() {
                if c >= 0 && (c as usize) < d {
                    acc += w[r * d + c as usize] as f64 * x[b * width + t] as f64;
                }
            }
            if let Some(bias) = bias {
                acc += bias[r] as f64;
            }
            if let Some(res) = residual {
                acc += res[b * rows + r] as f64;
            }
            out[b * rows + r] = acc as f32;
        }
    }
    out
}

/// `out [batch, d] = Σ_j h[b, j] · Wt[row_j] + bias`, `w_t` row-major `[rows, d]`.
/// The rows a list of block ids selects: block `b` is rows `b·block .. (b+1)·block`; an
/// id outside `0..rows/block` (an empty slot) gives `block` copies of `rows`, which the
/// host loops skip.
pub fn block_rows(ids: &[i64], block: usize, rows: usize) -> Vec<i64> {
    let blocks = rows / block;
    ids.iter()
        .flat_map(|&b| (0..block as i64).map(move |r| if b < 0 || b as usize >= blocks { rows as i64 } else { b * block as i64 + r }))
        .collect()
}

/// Elementwise `a + b` (a residual added to a block's output).
pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

pub fn rows_transposed_gemv(
    w_t: &[f32],
    rows: usize,
    d: usize,
    idx: Option<&[i64]>,
    h: &[f32],
    batch: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let selected: Vec<i64> = match idx {
        Some(i) => i.to_vec(),
        None => (0..rows as i64).collect(),
    };
    let k = selected.len();
    let mut out = vec![0f32; batch * d];
    let mut acc = vec![0f64; d];
    for b in 0..batch {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (j, &row) in selected.iter().enumerate() {
            if row < 0 || row as usize >= rows {
                continue;
            }
            let hv = h[b * k + j] as f64;
            let base = row as usize * d;
            for c in 0..d {
                acc[c] += hv * w_t[base + c] as f64;
            }
        }
        for c in 0..d {
            out[b * d + c] = (acc[c] + bias.map(|b| b[c] as f64).unwrap_or(0.0)) as f32;
        }
    }
    out
}

/// Ascending indices with `logits[b, i] > threshold` for some `b`, padded with `n` to
/// `capacity`, and how many there were.
pub fn select_above_threshold(
    logits: &[f32],
    batch: usize,
    n: usize,
    threshold: f32,
    capacity: usize,
) -> (Vec<i64>, usize) {
    let hits: Vec<i64> = (0..n)
        .filter(|&i| (0..batch).any(|b| logits[b * n + i] > threshold))
        .map(|i| i as i64)
        .collect();
    let count = hits.len();
    let mut indices: Vec<i64> = hits.into_iter().take(capacity).collect();
    indices.resize(capacity, n as i64);
    (indices, count)
}

/// Decode attention over the selected heads: `q [batch, slots·hd]`, caches
/// `[batch, heads, cap, hd]` row-major, positions `0..len`; empty slots give zeros.
#[allow(clippy::too_many_arguments)]
pub fn selected_heads_attention(
    q: &[f32],
    heads: &[i64],
    k_cache: &[f32],
    v_cache: &[f32],
    dims: [usize; 4],
    len: usize,
    scale: f32,
) -> Vec<f32> {
    let [batch, n_heads, cap, hd] = dims;
    let slots = heads.len();
    let mut out = vec![0f32; batch * slots * hd];
    for b in 0..batch {
        for (j, &h) in heads.iter().enumerate() {
            if h < 0 || h as usize >= n_heads {
                continue;
            }
            let base = (b * n_heads + h as usize) * cap * hd;
            let qv = &q[(b * slots + j) * hd..(b * slots + j + 1) * hd];
            let scores: Vec<f64> = (0..len)
                .map(|t| {
                    let k = &k_cache[base + t * hd..base + (t + 1) * hd];
                    qv.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for c in 0..hd {
                let acc: f64 = (0..len).map(|t| e[t] * v_cache[base + t * hd + c] as f64).sum();
                out[(b * slots + j) * hd + c] = (acc / total) as f32;
            }
        }
    }
    out
}

/// Largest `|a - b| / (atol + rtol·|b| + slack)` over all elements; ≤ 1 means within
/// tolerance. `slack` is an extra per-element allowance (empty: none). Also the index
/// where it happens. A NaN anywhere (a poisoned, unwritten output) gives infinity.
pub fn worst_ratio(actual: &[f32], expected: &[f32], atol: f32, rtol: f32, slack: &[f32]) -> (f32, usize) {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    assert!(slack.is_empty() || slack.len() == actual.len(), "slack length mismatch");
    let mut worst = (0f32, 0usize);
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let r = if a.is_nan() || e.is_nan() {
            f32::INFINITY
        } else {
            (a - e).abs() / (atol + rtol * e.abs() + slack.get(i).copied().unwrap_or(0.0))
        };
        if r > worst.0 {
            worst = (r, i);
        }
    }
    worst
}

/// Row-wise LayerNorm of `x [rows, d]` (f64 statistics, biased variance).
pub fn layer_norm(x: &[f32], rows: usize, d: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; rows * d];
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for c in 0..d {
            out[r * d + c] = ((row[c] as f64 - mean) * inv * gamma[c] as f64 + beta[c] as f64) as f32;
        }
    }
    out
}
