//! The reference implementation (Burn tensor ops, Flex on the CPU) against host loops,
//! and the shape/dtype errors of the public functions.

use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::DType;
use dejavu_kernels::checks::{
    check_attention, check_attention_out_proj, check_block_cols_gemv, check_gemvs, check_gated_rows_gemv, check_kv_append, check_layer_norm, check_qkv_lazy, check_norm_predict, check_norms_ahead, check_predicted_mlp, check_predictor_kernels, check_selection, check_argmax, check_embed_rows, fresh_seed, Case,
    PublicApi,
};
use dejavu_kernels::{accumulate_transposed_gemv, gather_rows_gemv, predict_select, predicted_mlp, predicted_rows_gemv, select_above_threshold, Activation, KernelError, MlpWeights};

fn assert_all_passed(outcomes: Vec<dejavu_kernels::checks::Outcome>) {
    assert!(!outcomes.is_empty());
    for o in &outcomes {
        assert!(o.passed, "{} failed on {}: worst error {}× the tolerance at {}", o.op, o.case, o.worst_ratio, o.worst_index);
    }
}

#[test]
fn reference_gemvs_match_host_loops() {
    let device = Default::default();
    let seed = fresh_seed();
    for dtype in [DType::F32, DType::F16] {
        for (rows, d, k, batch) in [(64, 96, 20, 1), (50, 37, 13, 3), (300, 256, 40, 2), (48, 1036, 12, 2)] {
            let case = Case { rows, d, k, batch, dtype, seed };
            assert_all_passed(check_gemvs::<Flex, _>(&PublicApi, &device, &case));
        }
    }
}

#[test]
fn reference_selection_matches_host() {
    let device = Default::default();
    let seed = fresh_seed();
    for (n, batch) in [(1000, 1), (777, 3)] {
        assert_all_passed(check_selection::<Flex>(&device, n, batch, DType::F32, seed));
    }
    // Burn's argmax, the reference greedy step: the first of two planted maxima.
    for (rows, width) in [(1, 50272), (3, 1037)] {
        assert_all_passed(check_argmax::<Flex>(&device, rows, width, DType::F32, seed));
    }
    // Burn's lookup, add and cast, the reference decoder input (an id past the table: zeros).
    assert_all_passed(check_embed_rows::<Flex>(&device, 20, 24, 4, DType::F32, seed));
}

#[test]
fn reference_attention_matches_host() {
    let device = Default::default();
    let seed = fresh_seed();
    for dtype in [DType::F32, DType::F16] {
        assert_all_passed(check_attention::<Flex>(&device, [2, 6, 40, 16], 33, dtype, seed));
        assert_all_passed(check_attention_out_proj::<Flex, _>(&PublicApi, &device, [2, 6, 40, 16], 33, 30, dtype, seed));
    }
}

#[test]
fn reference_layer_norm_matches_host() {
    let device = Default::default();
    let seed = fresh_seed();
    for dtype in [DType::F32, DType::F16] {
        assert_all_passed(check_layer_norm::<Flex>(&device, 3, 100, dtype, seed));
        assert_all_passed(check_kv_append::<Flex>(&device, [2, 3, 5, 8], 40, 3, dtype, seed));
        assert_all_passed(check_qkv_lazy::<Flex>(&device, 5, 8, 40, 4, 11, false, dtype, seed));
        assert_all_passed(check_qkv_lazy::<Flex>(&device, 4, 16, 64, 4, 11, true, dtype, seed));
        assert_all_passed(check_gated_rows_gemv::<Flex>(&device, 50, 40, dtype, seed));
        assert_all_passed(check_predictor_kernels::<Flex>(&device, 50, 40, 12, 7, dtype, seed));
        assert_all_passed(check_predicted_mlp::<Flex>(&device, 50, 40, 12, dtype, seed));
        assert_all_passed(check_norm_predict::<Flex>(&device, 40, 12, 7, dtype, seed));
        assert_all_passed(check_norms_ahead::<Flex>(&device, 4, 8, 100, 6, 20, 13, dtype, seed));
        assert_all_passed(check_block_cols_gemv::<Flex>(&device, 12, 10, 4, 2, dtype, seed));
    }
}

#[test]
fn shape_and_dtype_errors_are_named() {
    let device = Default::default();
    let w = Tensor::<Flex, 2>::zeros([8, 4], &device);
    let idx = Tensor::<Flex, 1, Int>::from_ints([0, 1], &device);
    let x = Tensor::<Flex, 2>::zeros([1, 5], &device);
    let err = gather_rows_gemv(w.clone(), idx.clone(), x, None, Activation::Relu).unwrap_err();
    assert_eq!(
        err,
        KernelError::Shape { op: "gather_rows_gemv", what: "x has 5 columns but the weight rows have 4".into() }
    );
    let x = Tensor::<Flex, 2>::zeros([1, 4], &device).cast(DType::F16);
    let err = gather_rows_gemv(w, idx, x, None, Activation::Relu).unwrap_err();
    assert!(matches!(err, KernelError::Dtype { .. }), "{err}");
    let logits = Tensor::<Flex, 2>::zeros([1, 4], &device);
    assert!(select_above_threshold(logits, 0.0, 0).is_err());

    // The predictor kernels: the predictor's shape and dtype, and the capacity.
    let w = Tensor::<Flex, 2>::zeros([8, 4], &device);
    let x = Tensor::<Flex, 2>::zeros([1, 4], &device);
    let up = Tensor::<Flex, 2>::zeros([8, 3], &device);
    let h = Tensor::<Flex, 2>::zeros([1, 5], &device);
    let err = predicted_rows_gemv(w.clone(), x.clone(), None, Activation::Relu, up.clone(), h, 0.0).unwrap_err();
    assert_eq!(
        err,
        KernelError::Shape { op: "predicted_rows_gemv", what: "h is [1, 5], expected [1, 3] (one token, the predictor's rank)".into() }
    );
    let h = Tensor::<Flex, 2>::zeros([1, 3], &device);
    let err = predicted_rows_gemv(w.clone(), x.clone(), None, Activation::Relu, up.clone().slice([0..6, 0..3]), h.clone(), 0.0).unwrap_err();
    assert_eq!(err, KernelError::Shape { op: "predicted_rows_gemv", what: "the predictor scores 6 rows for 8".into() });
    // The second factor may be stored in a half type; the first factor's output is f32.
    let err = predict_select(up.clone(), h.clone().cast(DType::F16), 0.0, 4).err();
    assert!(matches!(err, Some(KernelError::Dtype { op: "predict_select", .. })), "{err:?}");
    assert!(predict_select(up.clone().cast(DType::F16), h.clone(), 0.0, 4).is_ok());
    assert!(predict_select(up.clone(), h.clone(), 0.0, 0).is_err());

    // The fused predicted MLP: fc2's shape and the residual's shape and dtype.
    let mlp = |w2_t: Tensor<Flex, 2>| MlpWeights { w1: w.clone(), b1: None, w2_t, b2: None };
    let err = predicted_mlp(mlp(Tensor::zeros([8, 3], &device)), x.clone(), None, up.clone(), h.clone(), 0.0).unwrap_err();
    assert_eq!(err, KernelError::Shape { op: "predicted_mlp", what: "fc2 (transposed) is [8, 3], expected fc1's [8, 4]".into() });
    let residual = Tensor::<Flex, 2>::zeros([2, 4], &device);
    let err = predicted_mlp(mlp(w.clone()), x.clone(), Some(residual), up.clone(), h.clone(), 0.0).unwrap_err();
    assert_eq!(err, KernelError::Shape { op: "predicted_mlp", what: "residual is [2, 4] for an output of [1, 4]".into() });
    let residual = Tensor::<Flex, 2>::zeros([1, 4], &device).cast(DType::F16);
    let err = predicted_mlp(mlp(w.clone()), x.clone(), Some(residual), up.clone(), h.clone(), 0.0).err();
    assert!(matches!(err, Some(KernelError::Dtype { op: "predicted_mlp", .. })), "{err:?}");
    assert!(predicted_mlp(mlp(w.clone()), x, Some(Tensor::zeros([1, 4], &device)), up, h, 0.0).is_ok());

    // The f32 accumulator: its dtype (f16 weights, an f16 accumulator) and its shape.
    let w16 = w.clone().cast(DType::F16);
    let h16 = Tensor::<Flex, 2>::zeros([1, 2], &device).cast(DType::F16);
    let two = Tensor::<Flex, 1, Int>::from_ints([0, 5], &device);
    let err = accumulate_transposed_gemv(Tensor::<Flex, 2>::zeros([1, 4], &device).cast(DType::F16), w16.clone(), Some((two.clone(), 1)), h16.clone(), None).err();
    assert!(matches!(err, Some(KernelError::Dtype { op: "accumulate_transposed_gemv", .. })), "{err:?}");
    let err = accumulate_transposed_gemv(Tensor::zeros([1, 3], &device), w16.clone(), Some((two.clone(), 1)), h16.clone(), None).unwrap_err();
    assert_eq!(err, KernelError::Shape { op: "accumulate_transposed_gemv", what: "residual is [1, 3] for an output of [1, 4]".into() });
    let err = accumulate_transposed_gemv(Tensor::zeros([1, 4], &device), w16.clone(), None, h16.clone(), None).unwrap_err();
    assert_eq!(err, KernelError::Shape { op: "accumulate_transposed_gemv", what: "h has 2 columns but 8 rows are selected".into() });
    assert!(accumulate_transposed_gemv(Tensor::zeros([1, 4], &device), w16, Some((two, 1)), h16, None).is_ok());
}
