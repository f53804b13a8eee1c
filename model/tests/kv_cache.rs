//! Decoding one token at a time through the KV cache gives the logits of one full
//! forward pass (within 1e-5), for both layouts, including a prefill followed by steps.

mod common;

use common::*;
use dejavu_model::generate::token_tensor;

#[test]
fn incremental_decode_matches_full_forward() {
    for name in MODELS {
        let (config, model) = load(name);
        let ids = &Golden::of(name).ids("wiki128.input_ids")[..40];
        let device = Default::default();
        let vocab = config.vocab_size;

        let mut cache = model.new_cache(1, ids.len()).unwrap();
        let full = to_vec(model.forward(token_tensor::<B>(ids, &device), &mut cache).unwrap());

        // A 9-token prefill, then the rest one token at a time.
        let prefill = 9;
        let mut cache = model.new_cache(1, ids.len()).unwrap();
        let mut stepped = to_vec(
            model
                .forward(token_tensor::<B>(&ids[..prefill], &device), &mut cache)
                .unwrap(),
        );
        for t in prefill..ids.len() {
            let logits = model
                .forward(token_tensor::<B>(&ids[t..t + 1], &device), &mut cache)
                .unwrap();
            assert_eq!(logits.dims(), [1, 1, vocab]);
            stepped.extend(to_vec(logits));
        }
        assert_eq!(cache.len(), ids.len());
        let err = max_abs_diff(&full, &stepped);
        assert!(err < 1e-5, "{name}: incremental vs full max abs err {err}");
    }
}

#[test]
fn full_cache_is_an_error_not_a_panic() {
    let (_, model) = load(MODELS[0]);
    let mut cache = model.new_cache(1, 4).unwrap();
    let device = Default::default();
    model.forward(token_tensor::<B>(&[2, 3, 4], &device), &mut cache).unwrap();
    let err = model
        .forward(token_tensor::<B>(&[5, 6], &device), &mut cache)
        .unwrap_err();
    assert!(err.to_string().contains("KV cache holds 4"), "{err}");
}
