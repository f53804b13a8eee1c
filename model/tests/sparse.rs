//! The sparse path (`SparseModel` / `SparseHooks`) on the CPU, against the dense model:
//! full width equals dense, an oracle MLP equals dense, the masked every-token forward
//! equals the gathered kernels run token by token, skipped heads' keys and values stay
//! exact, and predictors of another model are refused.

mod common;

use burn::prelude::*;
use common::*;
use dejavu_model::generate::token_tensor;
use dejavu_model::layer::norm;
use dejavu_model::{content_hash, Activation, ForwardHooks, LayerKvCache, Opt, OptConfig, SparseModel, SparseOptions, Step, Tapped};
use dejavu_predictor::{
    DenseLayers, Manifest, OperatingPoint, PredictorModules, PredictorSet, Selection,
    SparsityPlan,
};

const MODEL: &str = "opt-tiny-preln";

fn ids() -> Vec<u32> {
    Golden::of(MODEL).ids("wiki128.input_ids")[..24].to_vec()
}

/// Random predictors of rank 8 for every layer from `lookahead` on, and their manifest.
fn predictors(config: &OptConfig, lookahead: usize, hash: &str) -> (Manifest, PredictorModules<B>) {
    let manifest = random_predictor_manifest(config, lookahead, hash, 8);
    let set = PredictorSet::<B>::init(manifest.clone(), &Default::default()).unwrap();
    // Burn initialises parameters lazily and a clone of an uninitialised one draws its own
    // values: materialise them so that clones are the same predictors.
    for p in set.modules.mlp.iter().chain(&set.modules.attention).flatten() {
        let _ = (p.down.weight.val(), p.up.weight.val());
    }
    (manifest, set.modules)
}

/// A plan with the given selections in every layer that has a predictor.
fn plan(manifest: &Manifest, mlp: Selection, attention: Selection) -> SparsityPlan {
    let mut plan = SparsityPlan::new(manifest, &OperatingPoint::Calibrated, &DenseLayers::default()).unwrap();
    for (l, layer) in plan.layers.iter_mut().enumerate() {
        if l >= manifest.lookahead {
            layer.mlp = mlp;
            layer.attention = attention;
        }
    }
    plan
}

fn sparse(
    model: &Opt<B>,
    lookahead: usize,
    mlp: Selection,
    attention: Selection,
    options: SparseOptions,
) -> SparseModel<B> {
    let (hash, manifest, modules) = setup(lookahead);
    SparseModel::new(model, &hash, plan(&manifest, mlp, attention), modules, options).unwrap()
}

/// The fixture's content hash, and random predictors for it.
fn setup(lookahead: usize) -> (String, Manifest, PredictorModules<B>) {
    let (config, _) = load(MODEL);
    let hash = content_hash(&fixtures().join(MODEL)).unwrap();
    let (manifest, modules) = predictors(&config, lookahead, &hash);
    (hash, manifest, modules)
}

fn dense_logits(model: &Opt<B>, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    to_vec(model.forward(token_tensor::<B>(ids, &Default::default()), &mut cache).unwrap())
}

/// Logits of every position from one forward over the whole sequence.
fn whole_logits<H: ForwardHooks<B>>(model: &Opt<B>, hooks: &mut H, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    let hidden = model.forward_with(token_tensor::<B>(ids, &Default::default()), &mut cache, hooks).unwrap();
    to_vec(model.logits(hidden))
}

#[test]
fn every_neuron_and_head_selected_is_the_dense_model() {
    let (config, model) = load(MODEL);
    let ids = ids();
    let dense = dense_logits(&model, &ids);
    let all = (Selection::TopK { k: config.ffn_dim }, Selection::TopK { k: config.num_attention_heads });
    let kernels = sparse(&model, 1, all.0, all.1, SparseOptions::default());
    let mut hooks = kernels.hooks();
    let err = max_abs_diff(&dense, &stepped_logits(&model, &mut hooks, &ids));
    assert!(err < 1e-4, "full-width kernels vs dense: {err}");
    let stats = hooks.stats();
    assert_eq!(stats.mlp[0], None, "layer 0 has no predictor under lookahead 1 and runs dense");
    assert_eq!(stats.mlp[1], Some(1.0));

    let masked = sparse(&model, 1, all.0, all.1, SparseOptions { every_token: true, ..Default::default() });
    let err = max_abs_diff(&dense, &whole_logits(&model, &mut masked.hooks(), &ids));
    assert!(err < 1e-4, "full-width masked vs dense: {err}");
}

#[test]
fn an_oracle_mlp_keeping_the_active_neurons_equals_the_dense_model() {
    let (_, model) = load(MODEL);
    let ids = ids();
    let dense = dense_logits(&model, &ids);
    let options = SparseOptions { oracle_mlp: true, ..Default::default() };
    // Lookahead 0, so layer 0's MLP is sparse too; attention stays dense.
    let oracle = sparse(&model, 0, Selection::Threshold { threshold: 0.0 }, Selection::Dense, options);
    let mut hooks = oracle.hooks();
    let err = max_abs_diff(&dense, &stepped_logits(&model, &mut hooks, &ids));
    // Only the summation order differs: ReLU zeros contribute nothing.
    assert!(err < 1e-5, "oracle MLP through the kernels vs dense: {err}");
    let stats = hooks.stats();
    let density = stats.mlp[0].unwrap();
    assert!(density > 0.05 && density < 0.95, "the oracle keeps the active neurons only: {density}");
}

#[test]
fn masked_every_token_forward_equals_the_kernels_token_by_token() {
    let (config, model) = load(MODEL);
    let ids = ids();
    let dense = dense_logits(&model, &ids);
    let cases = [
        (Selection::TopK { k: config.ffn_dim / 4 }, Selection::TopK { k: config.num_attention_heads / 2 }),
        (Selection::Threshold { threshold: 0.0 }, Selection::Threshold { threshold: 0.0 }),
    ];
    for lookahead in [0, 1] {
        for (mlp, attention) in cases {
            let (hash, manifest, modules) = setup(lookahead);
            let plan = plan(&manifest, mlp, attention);
            let kernels = SparseModel::new(&model, &hash, plan.clone(), modules.clone(), SparseOptions::default()).unwrap();
            let mut hooks = kernels.hooks();
            let stepped = stepped_logits(&model, &mut hooks, &ids);
            let every_token = SparseOptions { every_token: true, ..Default::default() };
            let masked = SparseModel::new(&model, &hash, plan, modules, every_token).unwrap();
            let mut masked_hooks = masked.hooks();
            let whole = whole_logits(&model, &mut masked_hooks, &ids);
            let err = max_abs_diff(&stepped, &whole);
            assert!(err < 1e-4, "lookahead {lookahead}, {mlp:?}/{attention:?}: kernels vs masked {err}");
            assert_eq!(hooks.stats(), masked_hooks.stats());
            // And the sparsity is real: the logits move away from the dense model's.
            assert!(max_abs_diff(&dense, &whole) > 1e-3, "{mlp:?}/{attention:?} changed nothing");
        }
    }
}

/// Every head's keys and values in the cache after a sparse decode, against the dense
/// projections of the inputs the run saw: written at every step (window 0), and written
/// lazily (window 4) then settled.
#[test]
fn heads_skipped_while_decoding_keep_exact_keys_and_values() {
    for window in [0, 4] {
        skipped_heads_keys_and_values(window);
    }
}

fn skipped_heads_keys_and_values(window: usize) {
    let (_, model) = load(MODEL);
    let ids: Vec<u32> = Golden::of(MODEL).ids("wiki128.input_ids")[..64].to_vec();
    // One head of four per token: most heads are skipped at most steps.
    let options = SparseOptions { lazy_kv_window: window, ..Default::default() };
    let one_head = sparse(&model, 1, Selection::Dense, Selection::TopK { k: 1 }, options);
    let mut hooks = one_head.hooks();
    // Each layer's attention input, step by step, recorded while the sparse hooks run.
    let mut inputs: Vec<Vec<Tensor<B, 3>>> = vec![Vec::new(); model.decoder.layers.len()];
    let mut tap = Tapped {
        inner: &mut hooks,
        tap: |activation: &Activation<'_, B>| {
            if let Activation::AttentionInput { layer, value } = activation {
                inputs[*layer].push((*value).clone());
            }
        },
    };
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    for t in 0..ids.len() {
        model.forward_with(token_tensor::<B>(&ids[t..t + 1], &Default::default()), &mut cache, &mut tap).unwrap();
    }
    drop(tap);
    let lazy_layers = cache.layers.iter().filter(|l| l.lazy.is_some()).count();
    assert_eq!(lazy_layers > 0, window > 0, "window {window}: {lazy_layers} layers hold lazy keys and values");
    one_head.settle_kv(&model, &mut cache);
    assert!(cache.layers.iter().all(|l| l.lazy.is_none()));
    let n = ids.len();
    for (l, layer) in model.decoder.layers.iter().enumerate() {
        // Keys and values recomputed densely from the attention inputs the sparse run saw.
        let x = Tensor::cat(inputs[l].clone(), 1);
        let h = norm(&layer.self_attn_layer_norm, x);
        let attention = &layer.self_attn;
        let keys = attention.split_heads(attention.k_proj.forward(h.clone()));
        let values = attention.split_heads(attention.v_proj.forward(h));
        let [b, heads, _, hd] = cache.layers[l].key.dims();
        let cached_k = cache.layers[l].key.clone().slice([0..b, 0..heads, 0..n, 0..hd]);
        let cached_v = cache.layers[l].value.clone().slice([0..b, 0..heads, 0..n, 0..hd]);
        let err_k = max_abs_diff(&to_vec(keys), &to_vec(cached_k));
        let err_v = max_abs_diff(&to_vec(values), &to_vec(cached_v));
        assert!(err_k < 1e-5 && err_v < 1e-5, "window {window}, layer {l}: keys {err_k}, values {err_v} after {n} sparse steps");
    }
}

/// Lazily written keys and values (only the heads a step reads, each brought up to date,
/// and any head about to lose an input from the window) give the logits of an every-head
/// write at every step, windows shorter than the gaps between a head's selections included
/// (one head of four per token), and a prompt prefilled after lazy steps (which settles
/// them first) as well.
#[test]
fn lazy_keys_and_values_give_every_head_logits() {
    let (_, model) = load(MODEL);
    let ids: Vec<u32> = Golden::of(MODEL).ids("wiki128.input_ids")[..40].to_vec();
    // The same predictors for every run.
    let (hash, manifest, modules) = setup(1);
    let plan = plan(&manifest, Selection::TopK { k: 64 }, Selection::TopK { k: 1 });
    let run = |window: usize| {
        let options = SparseOptions { lazy_kv_window: window, ..Default::default() };
        let one_head = SparseModel::new(&model, &hash, plan.clone(), modules.clone(), options).unwrap();
        let mut hooks = one_head.hooks();
        let device = Default::default();
        let mut cache = model.new_cache(1, ids.len()).unwrap();
        let mut out = Vec::new();
        // 30 one-token steps, then 6 tokens at once (dense prompt: settles), then 4 steps.
        for t in 0..30 {
            out.extend(to_vec(model.logits(model.forward_with(token_tensor::<B>(&ids[t..t + 1], &device), &mut cache, &mut hooks).unwrap())));
        }
        out.extend(to_vec(model.logits(model.forward_with(token_tensor::<B>(&ids[30..36], &device), &mut cache, &mut hooks).unwrap())));
        for t in 36..40 {
            out.extend(to_vec(model.logits(model.forward_with(token_tensor::<B>(&ids[t..t + 1], &device), &mut cache, &mut hooks).unwrap())));
        }
        out
    };
    let every_head = run(0);
    for window in [1, 3, 16] {
        let err = max_abs_diff(&run(window), &every_head);
        assert!(err < 1e-5, "window {window}: lazy vs every-head logits {err}");
    }
}

#[test]
fn predictors_of_another_model_are_refused() {
    let (config, model) = load(MODEL);
    let (manifest, modules) = predictors(&config, 1, "sha256:not-this-model");
    let hash = content_hash(&fixtures().join(MODEL)).unwrap();
    let plan = SparsityPlan::new(&manifest, &OperatingPoint::Calibrated, &DenseLayers::default()).unwrap();
    let err = SparseModel::new(&model, &hash, plan, modules, SparseOptions::default()).unwrap_err().to_string();
    assert!(err.contains("sha256:not-this-model") && err.contains(&hash), "{err}");

    // A plan for this model on the other fixture: its widths or its hash differ.
    let other = "opt-tiny-postln-proj";
    let (_, other_model) = load(other);
    let other_hash = content_hash(&fixtures().join(other)).unwrap();
    let (manifest, modules) = predictors(&config, 1, &hash);
    let plan = SparsityPlan::new(&manifest, &OperatingPoint::Calibrated, &DenseLayers::default()).unwrap();
    let err = SparseModel::new(&other_model, &other_hash, plan, modules, SparseOptions::default()).unwrap_err();
    assert!(err.to_string().contains("trained for another model"), "{err}");
}


/// A half-precision model whose predictors came out in f16 (as they do when the device's
/// default float dtype is f16): the predictors still run in f32, so the sparse path gives
/// exactly what the same model gives with those predictors handed over in f32, token by
/// token and masked. (Comparing with the f32 model instead is not stable: random
/// predictors' near-ties at the K-th logit flip between f16 and f32 activations.)
#[test]
fn half_precision_model_with_f16_predictors_runs_sparse() {
    use burn::module::Param;
    use burn::tensor::DType;
    let (_, model) = load(MODEL);
    let ids = ids();
    let (hash, manifest, modules) = setup(1);
    let plan = plan(&manifest, Selection::TopK { k: 16 }, Selection::TopK { k: 2 });
    let half = model.cast(DType::F16);
    let with_dtype = |dtype: DType| {
        let mut m = modules.clone();
        for p in m.mlp.iter_mut().chain(m.attention.iter_mut()).flatten() {
            for w in [&mut p.down.weight, &mut p.up.weight] {
                // Through f16 either way: the same values, stored in `dtype`.
                *w = Param::from_tensor(w.val().cast(DType::F16).cast(dtype));
            }
        }
        m
    };
    for options in [SparseOptions::default(), SparseOptions { every_token: true, ..Default::default() }] {
        let run = |dtype: DType| {
            let sparse = SparseModel::new(&half, &hash, plan.clone(), with_dtype(dtype), options).unwrap();
            if options.every_token {
                whole_logits(&half, &mut sparse.hooks(), &ids)
            } else {
                stepped_logits(&half, &mut sparse.hooks(), &ids)
            }
        };
        let err = max_abs_diff(&run(DType::F32), &run(DType::F16));
        assert!(err < 1e-5, "{options:?}: f16 predictors vs the same predictors in f32: {err}");
    }
}

/// Keeps, per token and layer, the `k` heads of largest output norm, chosen on the host:
/// an independent reading of what the attention oracle must do.
struct TopHeadsByNorm {
    k: usize,
}

impl ForwardHooks<B> for TopHeadsByNorm {
    fn attention(
        &mut self,
        _layer: usize,
        attention: &dejavu_model::attention::OptAttention<B>,
        x: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        let heads = attention.head_outputs(x, cache, step);
        let [batch, h, n, hd] = heads.dims();
        let values = to_vec(heads.clone());
        let mut mask = vec![0.0f32; batch * h * n];
        for b in 0..batch {
            for t in 0..n {
                let norm = |head: usize| {
                    let at = ((b * h + head) * n + t) * hd;
                    values[at..at + hd].iter().map(|v| v * v).sum::<f32>()
                };
                let mut order: Vec<usize> = (0..h).collect();
                order.sort_by(|&i, &j| norm(j).total_cmp(&norm(i)));
                for &head in &order[..self.k] {
                    mask[(b * h + head) * n + t] = 1.0;
                }
            }
        }
        let mask = Tensor::<B, 1>::from_floats(mask.as_slice(), &heads.device()).reshape([batch, h, n, 1]);
        attention.project_out(heads * mask)
    }
}

#[test]
fn the_attention_oracle_keeps_the_heads_of_largest_output() {
    let (config, model) = load(MODEL);
    let ids = ids();
    let heads = config.num_attention_heads;
    let dense = dense_logits(&model, &ids);
    let options = SparseOptions { every_token: true, oracle_attention: true, ..Default::default() };
    // Lookahead 0: every layer's attention is sparse; the MLP stays dense.
    let all = sparse(&model, 0, Selection::Dense, Selection::TopK { k: heads }, options);
    let err = max_abs_diff(&dense, &whole_logits(&model, &mut all.hooks(), &ids));
    assert!(err < 1e-5, "the oracle keeping every head vs dense: {err}");

    let k = heads / 2;
    let oracle = sparse(&model, 0, Selection::Dense, Selection::TopK { k }, options);
    let mut hooks = oracle.hooks();
    let got = whole_logits(&model, &mut hooks, &ids);
    let want = whole_logits(&model, &mut TopHeadsByNorm { k }, &ids);
    let err = max_abs_diff(&want, &got);
    assert!(err < 1e-5, "oracle vs the top {k} heads by norm chosen on the host: {err}");
    assert!(max_abs_diff(&dense, &got) > 1e-3, "keeping {k} of {heads} heads changed nothing");
    assert_eq!(hooks.stats().attention[0], Some(k as f64 / heads as f64));
}

/// The LayerNorms written by the launches that finish the residual
/// (`SparseOptions::fused_norms`), the next layer's first factors and head selection
/// riding in the following launches: the same logits as the f32 residual without it, with
/// threshold selection (the rider path) and with the lookahead (the next layers'
/// predictors) or without it (the MLP's own first factor then takes its own launch), and
/// the same selections (kept fractions).
#[test]
fn layer_norms_written_ahead_give_the_same_decode() {
    // Four layers (the fixtures have two), so that the next layers' predictors ride in the
    // launches before them: random weights, random LayerNorm parameters.
    use burn::module::Param;
    use burn::tensor::Distribution;
    let (mut config, _) = load(MODEL);
    config.num_hidden_layers = 4;
    let device = Default::default();
    let mut model = Opt::<B>::new(&config, &device);
    let d = config.hidden_size;
    let random = |mean: f64| Param::from_tensor(Tensor::<B, 1>::random([d], Distribution::Normal(mean, 0.3), &device));
    for layer in model.decoder.layers.iter_mut() {
        for ln in [&mut layer.self_attn_layer_norm, &mut layer.final_layer_norm] {
            ln.gamma = random(1.0);
            ln.beta = Some(random(0.0));
        }
    }
    let ids = ids();
    let threshold = Selection::Threshold { threshold: 0.0 };
    for lookahead in [1, 0] {
        let base = SparseOptions { f32_residual: true, fused_attention: true, ..Default::default() };
        // One set of (random) predictors for both.
        let hash = "four-layers";
        let (manifest, modules) = predictors(&config, lookahead, hash);
        let plan = plan(&manifest, threshold, threshold);
        let plain = SparseModel::new(&model, hash, plan.clone(), modules.clone(), base).unwrap();
        let ahead = SparseModel::new(&model, hash, plan.clone(), modules.clone(), SparseOptions { fused_norms: true, ..base }).unwrap();
        let deferred = SparseModel::new(&model, hash, plan.clone(), modules.clone(), SparseOptions { fused_norms: true, deferred_norms: true, ..base }).unwrap();
        // The same with keys and values written lazily (window 3): the LayerNorm and the
        // next layer's first factor ride in qkv_append_lazy.
        let deferred_lazy = SparseModel::new(&model, hash, plan, modules, SparseOptions { fused_norms: true, deferred_norms: true, lazy_kv_window: 3, ..base }).unwrap();
        let mut plain_hooks = plain.hooks();
        let want = stepped_logits(&model, &mut plain_hooks, &ids);
        let a = plain_hooks.stats();
        let runs = [
            ("written ahead", &ahead, false),
            ("applied by the launches that read them", &deferred, true),
            ("applied by the launches that read them, keys and values written lazily", &deferred_lazy, true),
        ];
        for (name, sparse, deferring) in runs {
            let mut hooks = sparse.hooks();
            let got = stepped_logits(&model, &mut hooks, &ids);
            let err = max_abs_diff(&want, &got);
            assert!(err < 1e-5, "lookahead {lookahead}: LayerNorms {name} vs in their own launches: {err}");
            let b = hooks.stats();
            assert_eq!(a.mlp, b.mlp, "lookahead {lookahead}, LayerNorms {name}: MLP kept");
            assert_eq!(a.attention, b.attention, "lookahead {lookahead}, LayerNorms {name}: heads kept");
            assert!(b.mean_mlp_density() < 0.9 && b.mean_attention_density() < 0.9, "lookahead {lookahead}: nothing skipped: {b:?}");
            // With the lookahead, each decode step's layers 1 and 2 apply their attention
            // LayerNorm in their qkv_append (layer 0 reads the embeddings' residual; layer 3
            // carries no next layer's first factor); without it nothing is deferred.
            if deferring {
                let steps = ids.len() - 1;
                match lookahead {
                    1 => assert!(hooks.norms_in_launch() >= 2 * steps, "lookahead 1: {} LayerNorms applied in launches in {steps} steps", hooks.norms_in_launch()),
                    _ => assert_eq!(hooks.norms_in_launch(), 0, "lookahead 0"),
                }
            } else {
                assert_eq!(hooks.norms_in_launch(), 0, "{name}");
            }
        }
    }
}

/// A decode step's residual stream kept in f32 (attention with `out_proj` and fc2 adding
/// into it, the LayerNorms writing the weights' dtype), every neuron and head selected:
/// in f32 the dense model; in f16, as close to the f32 dense model as the plain f16
/// sparse decode is, or closer (the residual is rounded once per step instead of twice per
/// layer).
#[test]
fn a_residual_stream_kept_in_f32_gives_the_dense_model() {
    use burn::tensor::DType;
    let (config, model) = load(MODEL);
    let ids = ids();
    let dense = dense_logits(&model, &ids);
    let all = (Selection::TopK { k: config.ffn_dim }, Selection::TopK { k: config.num_attention_heads });
    let f32_residual = SparseOptions { f32_residual: true, ..Default::default() };
    let kernels = sparse(&model, 1, all.0, all.1, f32_residual);
    let err = max_abs_diff(&dense, &stepped_logits(&model, &mut kernels.hooks(), &ids));
    assert!(err < 1e-4, "f32 residual, full width, f32 model vs dense: {err}");

    let half = model.cast(DType::F16);
    let (hash, manifest, modules) = setup(1);
    let plan = plan(&manifest, all.0, all.1);
    let run = |options: SparseOptions| {
        let sparse = SparseModel::new(&half, &hash, plan.clone(), modules.clone(), options).unwrap();
        stepped_logits(&half, &mut sparse.hooks(), &ids)
    };
    let err_f32_residual = max_abs_diff(&dense, &run(f32_residual));
    let err_half = max_abs_diff(&dense, &run(SparseOptions::default()));
    eprintln!("f16 model against the f32 dense logits: residual in f32 {err_f32_residual}, in f16 {err_half}");
    assert!(err_f32_residual <= 1.1 * err_half + 1e-3, "f32 residual {err_f32_residual} against f16 residual {err_half}");
}

