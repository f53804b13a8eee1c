//! The model on the GPU code path that a machine without a GPU can run: Burn's wgpu
//! backend (what `--backend wgpu` uses) on Mesa's lavapipe, a software Vulkan device (CI
//! installs it). One prompt of the pre-LN fixture, f32: every position's logits within
//! 1e-3 of Hugging Face's (lavapipe's f32 arithmetic, other summation orders) and the
//! same argmax. Set `DEJAVU_SKIP_WGPU_TESTS=1` on a machine that cannot have Vulkan.

mod common;

use burn::tensor::DType;
use common::{fixtures, max_abs_diff, stepped_logits, Golden};
use dejavu_model::generate::{greedy_tokens, token_tensor};
use dejavu_model::{load_model, Dense};

type W = burn::backend::Wgpu;

#[test]
fn wgpu_forward_matches_hugging_face() {
    if std::env::var_os("DEJAVU_SKIP_WGPU_TESTS").is_some() {
        eprintln!("skipped: DEJAVU_SKIP_WGPU_TESTS is set");
        return;
    }
    let name = "opt-tiny-preln";
    let device = Default::default();
    let (config, model) = load_model::<W>(&fixtures().join(name), DType::F32, &device).unwrap();
    let golden = Golden::of(name);
    let ids = golden.ids("short.input_ids");
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    let hidden = model.forward_with(token_tensor::<W>(&ids, &device), &mut cache, &mut Dense).unwrap();
    let logits: Vec<f32> = model.logits(hidden).into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let (_, want) = golden.f32("short.logits");
    let err = max_abs_diff(&logits, &want);
    assert!(err < 1e-3, "wgpu logits: max abs err {err}");
    let argmax = |v: &[f32]| -> Vec<usize> {
        v.chunks_exact(config.vocab_size)
            .map(|row| (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }))
            .collect()
    };
    assert_eq!(argmax(&logits), argmax(&want), "greedy tokens differ");
}

/// Dense decode through the CubeCL kernels (`KernelDecode` on `CubeBackend`, which runs
/// them; the fused `Wgpu` backend would run the tensor-op reference): every position of the
/// short prompt as a one-token step, within 1e-3 of Hugging Face's logits, same argmax.
/// The steps' buffers come from CubeCL's pool of fixed sizes after the first step (the
/// default); the same steps with the default pool give the same logits to the bit, as
/// they must if no buffer of the pool is handed out while still in use.
#[test]
fn wgpu_kernel_decode_matches_hugging_face() {
    if std::env::var_os("DEJAVU_SKIP_WGPU_TESTS").is_some() {
        eprintln!("skipped: DEJAVU_SKIP_WGPU_TESTS is set");
        return;
    }
    type C = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
    let name = "opt-tiny-preln";
    let device = Default::default();
    let (config, mut model) = load_model::<C>(&fixtures().join(name), DType::F32, &device).unwrap();
    let weights = dejavu_model::use_row_major_weights(&mut model);
    let golden = Golden::of(name);
    let ids = golden.ids("short.input_ids");
    // Without the pool first: a size the pool holds is served from it in any mode.
    let plain = stepped_logits(&model, &mut dejavu_model::KernelDecode::new(&weights).without_step_buffer_pool(), &ids);
    let logits = stepped_logits(&model, &mut dejavu_model::KernelDecode::new(&weights), &ids);
    assert!(logits == plain, "decode with the step buffer pool differs from decode without it");
    let (_, want) = golden.f32("short.logits");
    let err = max_abs_diff(&logits, &want);
    assert!(err < 1e-3, "wgpu kernel decode logits: max abs err {err}");
    let argmax = |v: &[f32]| -> Vec<usize> {
        v.chunks_exact(config.vocab_size)
            .map(|row| (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }))
            .collect()
    };
    assert_eq!(argmax(&logits), argmax(&want), "greedy tokens differ");
    // Greedy decoding as `generate` runs it on the kernels (the LM head through our GEMV,
    // then the argmax kernels): each step's token is Hugging Face's argmax.
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    let mut hooks = dejavu_model::KernelDecode::new(&weights);
    let greedy: Vec<usize> = ids
        .iter()
        .map(|&id| {
            let hidden = model.forward_with(token_tensor::<C>(&[id], &device), &mut cache, &mut hooks).unwrap();
            greedy_tokens(&model, hidden).unwrap().into_data().convert::<i64>().into_vec::<i64>().unwrap()[0] as usize
        })
        .collect();
    assert_eq!(greedy, argmax(&want), "greedy tokens through the kernels' LM head differ");
}

/// Sparse decode through the CubeCL kernels on wgpu — the decode-step predictor kernels
/// included (the first factor reading the f32 residual, head selection with its predictor
/// in one launch, fc1 gated by its predictor in the same launch) — against the same sparse
/// model through the tensor-op reference on the CPU: every position of a prompt as a
/// one-token step, logits within 1e-3. Random rank-8 predictors (saved once, loaded on both
/// backends), threshold 0 for heads and neurons: about half kept. A logit within rounding
/// of 0 could select differently on the two devices; with f32 on both that is about one
/// run in a thousand.
#[test]
fn wgpu_sparse_decode_matches_the_cpu_reference() {
    if std::env::var_os("DEJAVU_SKIP_WGPU_TESTS").is_some() {
        eprintln!("skipped: DEJAVU_SKIP_WGPU_TESTS is set");
        return;
    }
    type C = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
    type F = burn::backend::Flex;
    use dejavu_model::{content_hash, SparseModel, SparseOptions};
    use dejavu_predictor::{DenseLayers, OperatingPoint, PredictorSet, SparsityPlan};

    let name = "opt-tiny-preln";
    let dir = fixtures().join(name);
    let hash = content_hash(&dir).unwrap();
    let (config, cpu) = load_model::<F>(&dir, DType::F32, &Default::default()).unwrap();
    let manifest = common::random_predictor_manifest(&config, 1, &hash, 8);
    let folder = tempfile::tempdir().unwrap();
    let predictors = folder.path().to_path_buf();
    PredictorSet::<F>::init(manifest.clone(), &Default::default()).unwrap().save(&predictors).unwrap();
    let plan = SparsityPlan::new(&manifest, &OperatingPoint::Threshold, &DenseLayers::default()).unwrap();
    let ids = Golden::of(name).ids("wiki128.input_ids")[..16].to_vec();

    let cpu_set = PredictorSet::<F>::load(&predictors, &Default::default()).unwrap();
    // Keys and values of every head written at every step on the CPU, lazily (window 4,
    // shorter than the run) on wgpu.
    let every_head = SparseOptions { lazy_kv_window: 0, ..Default::default() };
    let cpu_sparse = SparseModel::new(&cpu, &hash, plan.clone(), cpu_set.modules, every_head).unwrap();
    let want = stepped_logits(&cpu, &mut cpu_sparse.hooks(), &ids);

    let device = Default::default();
    let (_, mut gpu) = load_model::<C>(&dir, DType::F32, &device).unwrap();
    let weights = dejavu_model::use_row_major_weights(&mut gpu);
    let gpu_set = PredictorSet::<C>::load(&predictors, &device).unwrap();
    // The MLP as the separate kernels (the default) and as the fused predicted-MLP kernel;
    // the residual stream kept in f32 (out_proj and fc2 adding into it, fc2 with f32
    // atomics: lavapipe has them), with attention and out_proj as two launches and as one;
    // and with the LayerNorms written by the launches that finish the residual (every head
    // written each step, so the next layer's attention first factor rides in qkv_append;
    // and written lazily).
    // (The LayerNorms applied by qkv_append, `deferred_norms`, need a layer with a next
    // layer's predictor after it: the fixture's two layers have none; the kernel is checked
    // on lavapipe in kernels/tests/wgpu.rs and the path on the CPU in tests/sparse.rs.)
    let variants = [(4, false, false, false, false), (4, true, false, false, false), (4, false, true, false, false), (4, false, true, true, false), (0, false, true, true, true), (0, false, true, false, true), (4, false, true, true, true)];
    for (window, fused_mlp, f32_residual, fused_attention, fused_norms) in variants {
        let options = SparseOptions { lazy_kv_window: window, fused_mlp, f32_residual, fused_attention, fused_norms, ..Default::default() };
        let gpu_sparse = SparseModel::with_weights(&gpu, &hash, plan.clone(), gpu_set.modules.clone(), options, weights.clone()).unwrap();
        let mut hooks = gpu_sparse.hooks();
        let got = stepped_logits(&gpu, &mut hooks, &ids);
        let stats = hooks.stats();
        let err = max_abs_diff(&got, &want);
        assert!(err < 1e-3, "sparse decode on wgpu ({options:?}) vs the CPU reference: max abs err {err}");
        // The plan was sparse where it had predictors: something was skipped.
        assert!(stats.mean_mlp_density() < 0.9 && stats.mean_attention_density() < 0.9, "{stats:?}");
    }
}
