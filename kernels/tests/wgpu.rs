//! The CubeCL kernels on wgpu (in CI: Mesa's lavapipe, a software Vulkan device) against
//! host loops, with outputs poisoned before each launch. Everything is in one test so the
//! process pays the shader compilation once; shapes are tiny because lavapipe takes about
//! a millisecond per launch.
//!
//! Without a Vulkan device this test fails (CI installs `mesa-vulkan-drivers`); set
//! `DEJAVU_SKIP_WGPU_TESTS=1` to skip it on a machine that cannot have one.

use burn::tensor::DType;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use dejavu_kernels::checks::{
    check_attention, check_attention_out_proj, check_block_cols_gemv, check_gemvs, check_gated_rows_gemv, check_kv_append, check_layer_norm, check_qkv_lazy, check_norm_predict, check_norms_ahead, check_predicted_mlp, check_predictor_kernels, check_selection, check_argmax, check_embed_rows, cube_supports, fresh_seed, Case, Cube, Poisoned,
};
use dejavu_kernels::cube::LaunchConfig;

#[test]
fn cube_kernels_on_wgpu_match_host_loops() {
    if std::env::var_os("DEJAVU_SKIP_WGPU_TESTS").is_some() {
        eprintln!("skipped: DEJAVU_SKIP_WGPU_TESTS is set");
        return;
    }
    let device = WgpuDevice::default();
    let seed = fresh_seed();
    let mut dtypes = vec![DType::F32];
    if cube_supports::<WgpuRuntime>(&device, DType::F16) {
        dtypes.push(DType::F16);
    } else {
        eprintln!("this wgpu device has no f16: checking f32 only");
    }
    // Which form `accumulate_transposed_gemv` takes here (both are checked the same way).
    let client = <WgpuRuntime as cubecl::Runtime>::client(&device);
    if dejavu_kernels::cube::supports_atomic_f32_add(&client) {
        eprintln!("f32 atomic adds: yes (the accumulating transposed GEMV runs its one-launch form)");
    } else {
        eprintln!("f32 atomic adds: no (the accumulating transposed GEMV runs its two passes)");
    }
    let mut outcomes = Vec::new();
    for &dtype in &dtypes {
        // 96 and 256 columns take vectorised loads; 1036 also the 8-deep unrolled loop
        // (it needs more than 7 × 32 vectors per row) and its tail; 37 takes width-1
        // vectors.
        for (rows, d, k, batch) in [(64, 96, 20, 1), (50, 37, 13, 3), (300, 256, 40, 2), (48, 1036, 12, 2)] {
            let case = Case { rows, d, k, batch, dtype, seed };
            outcomes.extend(check_gemvs::<Cube<WgpuRuntime>, _>(&Poisoned(LaunchConfig::default()), &device, &case));
            // Odd grid shapes: partial cubes, many splits (the second pass's unrolled
            // loop and its tail), one K lane; the accumulating GEMV's two passes (an f32
            // output from f16 weights).
            for config in [
                LaunchConfig { rows_per_cube: 3, cols_per_cube: 16, lanes_k: 4, rows_per_lane: 2, max_splits: 256, compact_rows: 0, fused_mlp_rows: 128, fused_mlp_threads: 1024, atomic_accumulate: true, accumulate_compact_rows: 64, attention_out_rows: 256, norm_plain_reads: true, qkv_norm_rows_per_cube: 16, attention_round_positions: 4, attention_out_threads: 256 },
                LaunchConfig { rows_per_cube: 1, cols_per_cube: 8, lanes_k: 1, rows_per_lane: 5, max_splits: 3, compact_rows: 0, fused_mlp_rows: 128, fused_mlp_threads: 1024, atomic_accumulate: false, accumulate_compact_rows: 0, attention_out_rows: 0, norm_plain_reads: true, qkv_norm_rows_per_cube: 16, attention_round_positions: 4, attention_out_threads: 256 },
                // The compacting transposed GEMV: several splits of 64 rows (two rows per
                // unit), splits of 8 units × 32 rows (the most a unit scans), and 8 rows per unit with 4 lanes
                // along K (several live rows per lane: the unrolled loop and its tail).
                LaunchConfig { compact_rows: 64, accumulate_compact_rows: 64, cols_per_cube: 8, lanes_k: 4, ..LaunchConfig::default() },
                LaunchConfig { compact_rows: 1000, accumulate_compact_rows: 1000, cols_per_cube: 8, lanes_k: 1, ..LaunchConfig::default() },
                LaunchConfig { compact_rows: 256, accumulate_compact_rows: 256, cols_per_cube: 8, lanes_k: 4, ..LaunchConfig::default() },
            ] {
                outcomes.extend(check_gemvs::<Cube<WgpuRuntime>, _>(&Poisoned(config), &device, &case));
            }
        }
        // 1000 and 777 (odd: width-1 vectors) take one round; 40000 several.
        outcomes.extend(check_selection::<Cube<WgpuRuntime>>(&device, 1000, 1, dtype, seed));
        outcomes.extend(check_selection::<Cube<WgpuRuntime>>(&device, 777, 3, dtype, seed));
        outcomes.extend(check_selection::<Cube<WgpuRuntime>>(&device, 40000, 2, dtype, seed));
        // OPT's vocabulary (several parts of the split), a few rows, an odd width (width-1
        // vectors), a row shorter than one part.
        for (rows, width) in [(1, 50272), (3, 5000), (2, 1037), (1, 40)] {
            outcomes.extend(check_argmax::<Cube<WgpuRuntime>>(&device, rows, width, dtype, seed));
        }
        // A decode step's row (width 256: vectors of 4, one per unit), a prompt's rows of a
        // width longer than the cube (several vectors a unit), an odd width (width-1
        // vectors); an id past the table in the last two.
        for (vocab, d, n) in [(50, 256, 1), (64, 2056, 5), (7, 37, 3)] {
            outcomes.extend(check_embed_rows::<Cube<WgpuRuntime>>(&device, vocab, d, n, dtype, seed));
        }
        // Head dims of 16 (vectors of 4 or 8) and 12; lengths below and at the capacity; one
        // cube per head up to 256 positions, split beyond.
        outcomes.extend(check_attention::<Cube<WgpuRuntime>>(&device, [2, 6, 40, 16], 33, dtype, seed));
        outcomes.extend(check_attention::<Cube<WgpuRuntime>>(&device, [1, 4, 256, 16], 256, dtype, seed));
        outcomes.extend(check_attention::<Cube<WgpuRuntime>>(&device, [1, 5, 300, 12], 300, dtype, seed));
        // Long enough for the value pass's 4-deep unrolled loop.
        outcomes.extend(check_attention::<Cube<WgpuRuntime>>(&device, [1, 3, 2048, 16], 2000, dtype, seed));
        // Attention with out_proj into an f32 accumulator: the two kernels, and one launch
        // with 256 and 64 rows per cube (rows in partial cubes, several row groups, batch 2;
        // head dims of 16 and 32), its attention by the two-phase softmax (0) or the online
        // one with 1, 4 or 8 positions a round (33 positions: fewer than a round's; 256: whole
        // rounds); past 256 positions always the two kernels.
        for (attention_out_rows, attention_round_positions, attention_out_threads) in [(0, 0, 256), (256, 0, 256), (64, 0, 256), (256, 4, 256), (64, 8, 256), (256, 1, 256), (512, 8, 512), (64, 4, 128)] {
            let launcher = Poisoned(LaunchConfig { attention_out_rows, attention_round_positions, attention_out_threads, ..LaunchConfig::default() });
            outcomes.extend(check_attention_out_proj::<Cube<WgpuRuntime>, _>(&launcher, &device, [2, 6, 40, 16], 33, 300, dtype, seed));
            outcomes.extend(check_attention_out_proj::<Cube<WgpuRuntime>, _>(&launcher, &device, [1, 4, 256, 32], 256, 70, dtype, seed));
            outcomes.extend(check_attention_out_proj::<Cube<WgpuRuntime>, _>(&launcher, &device, [1, 5, 300, 16], 300, 40, dtype, seed));
        }
        // Widths of at most a vector per unit (one pass), several vectors per unit (8196: more
        // than any cube's units), and odd (width-1 vectors).
        for (rows, d) in [(3, 64), (2, 2304), (1, 8196), (1, 37)] {
            outcomes.extend(check_layer_norm::<Cube<WgpuRuntime>>(&device, rows, d, dtype, seed));
        }
        // Head dims 8 and 12 (odd d: width-1 vectors), the first and the last position.
        outcomes.extend(check_kv_append::<Cube<WgpuRuntime>>(&device, [2, 3, 5, 8], 40, 4, dtype, seed));
        outcomes.extend(check_kv_append::<Cube<WgpuRuntime>>(&device, [1, 4, 7, 12], 37, 0, dtype, seed));
        // Lazy keys and values: whole heads per cube (hd 8), and a cube per row (hd 12);
        // with the LayerNorm in the launch and the first factor riding along, whole heads
        // per cube (hd 16) and a cube per row (hd 12). Rows of 512 take the owed positions'
        // four-vector rounds (rows of 40 and 64 have too few vectors a lane for one).
        outcomes.extend(check_qkv_lazy::<Cube<WgpuRuntime>>(&device, 5, 8, 40, 4, 11, false, dtype, seed));
        outcomes.extend(check_qkv_lazy::<Cube<WgpuRuntime>>(&device, 3, 12, 37, 3, 8, false, dtype, seed));
        outcomes.extend(check_qkv_lazy::<Cube<WgpuRuntime>>(&device, 4, 16, 64, 4, 11, true, dtype, seed));
        outcomes.extend(check_qkv_lazy::<Cube<WgpuRuntime>>(&device, 3, 12, 37, 3, 8, true, dtype, seed));
        outcomes.extend(check_qkv_lazy::<Cube<WgpuRuntime>>(&device, 4, 16, 512, 4, 11, true, dtype, seed));
        outcomes.extend(check_qkv_lazy::<Cube<WgpuRuntime>>(&device, 4, 16, 512, 3, 9, false, dtype, seed));
        outcomes.extend(check_gated_rows_gemv::<Cube<WgpuRuntime>>(&device, 77, 1036, dtype, seed));
        // Ranks below and above one lane group, head counts below and above the cube's groups.
        outcomes.extend(check_predictor_kernels::<Cube<WgpuRuntime>>(&device, 77, 1036, 24, 5, dtype, seed));
        outcomes.extend(check_predictor_kernels::<Cube<WgpuRuntime>>(&device, 40, 64, 72, 41, dtype, seed));
        // A rank of more than four loads per lane (the logit's unrolled loop and its tail).
        outcomes.extend(check_predictor_kernels::<Cube<WgpuRuntime>>(&device, 77, 1036, 136, 5, dtype, seed));
        // The fused sparse MLP: several splits of neurons, the last one partial, ranks
        // above and below a unit's four-deep loop, widths of several vectors per unit
        // (1036: vectors of 4) and of width-1 vectors (37), one partial split (40 rows).
        outcomes.extend(check_predicted_mlp::<Cube<WgpuRuntime>>(&device, 300, 1036, 136, dtype, seed));
        outcomes.extend(check_predicted_mlp::<Cube<WgpuRuntime>>(&device, 40, 37, 24, dtype, seed));
        outcomes.extend(check_predicted_mlp::<Cube<WgpuRuntime>>(&device, 1000, 64, 8, dtype, seed));
        // GEMV cubes, the LayerNorm's, the selection's: odd sizes so no cube is full.
        outcomes.extend(check_norm_predict::<Cube<WgpuRuntime>>(&device, 1036, 24, 5, dtype, seed));
        outcomes.extend(check_norm_predict::<Cube<WgpuRuntime>>(&device, 64, 130, 41, dtype, seed));
        // Rows of several vectors per unit of the cube (the dot's four-deep loop, its tail).
        outcomes.extend(check_norm_predict::<Cube<WgpuRuntime>>(&device, 4100, 9, 7, dtype, seed));
        // LayerNorms from the last cube and the predictors riding along: a row narrower
        // than the cube, and one of several elements a unit (1040 = 65 × 16; 130 rows of
        // fc1 with a partial cube, 41 ranks).
        outcomes.extend(check_norms_ahead::<Cube<WgpuRuntime>>(&device, 4, 16, 100, 9, 40, 33, dtype, seed));
        outcomes.extend(check_norms_ahead::<Cube<WgpuRuntime>>(&device, 65, 16, 130, 41, 32, 20, dtype, seed));
        // 72 key and value rows (head dim 12), not a whole number of qkv_append's 16-row
        // cubes: with the LayerNorm in the launch its last cube is partial.
        outcomes.extend(check_norms_ahead::<Cube<WgpuRuntime>>(&device, 3, 12, 100, 9, 40, 33, dtype, seed));
        // out_proj over selected heads: head dims of 16 (whole vectors) and 12, empty slots
        // (10 heads), a row of more than 8 × 32 vectors (the unrolled loop), batch 2.
        outcomes.extend(check_block_cols_gemv::<Cube<WgpuRuntime>>(&device, 37, 10, 16, 1, dtype, seed));
        outcomes.extend(check_block_cols_gemv::<Cube<WgpuRuntime>>(&device, 20, 6, 12, 2, dtype, seed));
        outcomes.extend(check_block_cols_gemv::<Cube<WgpuRuntime>>(&device, 9, 16, 160, 1, dtype, seed));
    }
    check_topk_mask(&device, seed);
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.passed).collect();
    for o in &outcomes {
        eprintln!("{:<34} {:<50} worst {:.3}", o.op, o.case, o.worst_ratio);
    }
    assert!(failed.is_empty(), "{} of {} checks failed: {failed:#?}", failed.len(), outcomes.len());
}

/// The sort-free top-K mask (multisection on `CubeBackend`) against a host sort.
fn check_topk_mask(device: &WgpuDevice, seed: u64) {
    use burn::prelude::*;
    use burn::tensor::TensorData;
    use rand::{Rng, SeedableRng};
    type Wb = burn_cubecl::CubeBackend<WgpuRuntime, f32, i32, u32>;
    let (rows, width) = (3, 1000);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..rows * width).map(|_| rng.random_range(-8.0f32..8.0)).collect();
    for k in [1, 97, 999] {
        let logits = Tensor::<Wb, 2>::from_data(TensorData::new(values.clone(), [rows, width]), device);
        let mask: Vec<f32> = dejavu_kernels::topk_mask(logits, k).unwrap().into_data().to_vec().unwrap();
        for r in 0..rows {
            let row = &values[r * width..(r + 1) * width];
            let mut order: Vec<usize> = (0..width).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let mut expected = vec![0.0f32; width];
            for &i in &order[..k] {
                expected[i] = 1.0;
            }
            assert_eq!(&mask[r * width..(r + 1) * width], &expected[..], "top-{k} mask, row {r}, seed {seed}");
        }
    }
}
