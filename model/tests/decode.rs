//! Dense decode through the kernels (`KernelDecode`, reference kernels on the CPU) against
//! Hugging Face: both fixture models (pre-LN; post-LN with project_in/out), token by token
//! and after a prefill, with the weights re-laid row-major. Tolerance 1e-4 max abs on the
//! logits, as the parity tests.

mod common;

use common::*;
use dejavu_model::generate::token_tensor;
use dejavu_model::{use_row_major_weights, DecodeWeights, KernelDecode};

const TOL: f32 = 1e-4;

#[test]
fn kernel_decode_matches_hugging_face() {
    for name in MODELS {
        let (config, mut model) = load(name);
        let golden = Golden::of(name);
        let vocab = config.vocab_size;

        // Re-laying the weights changes nothing the dense path computes.
        let short = golden.ids("short.input_ids");
        let (_, want_short) = golden.f32("short.logits");
        use_row_major_weights(&mut model);
        let mut cache = model.new_cache(1, short.len()).unwrap();
        let dense = to_vec(model.forward(token_tensor::<B>(&short, &Default::default()), &mut cache).unwrap());
        let err = max_abs_diff(&dense, &want_short);
        assert!(err < TOL, "{name}: dense forward after re-laying the weights: {err}");

        let weights = DecodeWeights::new(&model);
        // Every position a one-token step.
        let mut cache = model.new_cache(1, short.len()).unwrap();
        let mut stepped = Vec::new();
        for t in 0..short.len() {
            let hidden = model
                .forward_with(token_tensor::<B>(&short[t..t + 1], &Default::default()), &mut cache, &mut KernelDecode::new(&weights))
                .unwrap();
            stepped.extend(to_vec(model.logits(hidden)));
        }
        let err = max_abs_diff(&stepped, &want_short);
        assert!(err < TOL, "{name}: kernel decode, token by token: {err}");

        // A 127-token prefill (tensor ops, LayerNorm kernel), then one decode step.
        let wiki = golden.ids("wiki128.input_ids");
        let (_, want_last) = golden.f32("wiki128.last_logits");
        let n = wiki.len();
        let mut cache = model.new_cache(1, n).unwrap();
        let mut hooks = KernelDecode::new(&weights);
        model.forward_with(token_tensor::<B>(&wiki[..n - 1], &Default::default()), &mut cache, &mut hooks).unwrap();
        let hidden = model.forward_with(token_tensor::<B>(&wiki[n - 1..], &Default::default()), &mut cache, &mut hooks).unwrap();
        let last = to_vec(model.logits(hidden));
        assert_eq!(last.len(), vocab);
        let err = max_abs_diff(&last, &want_last);
        assert!(err < TOL, "{name}: prefill then a kernel decode step: {err}");
    }
}
