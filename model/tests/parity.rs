//! Parity with the Hugging Face reference: both fixture models (pre-LN; post-LN with
//! project_in/out and no final LayerNorm), both prompts, f32 on the CPU backend.
//! Tolerance: 1e-4 max abs on logits, every hidden state, fc1 pre-activations and
//! next-token log-probabilities; greedy tokens identical.

mod common;

use common::*;
use dejavu_model::generate::token_tensor;
use dejavu_model::perplexity::target_log_probs;
use dejavu_model::{generate, GenerateOptions, Sampling};

const TOL: f32 = 1e-4;

#[test]
fn forward_matches_hugging_face() {
    for name in MODELS {
        let (config, model) = load(name);
        let golden = Golden::of(name);
        for prompt in PROMPTS {
            let ids = golden.ids(&format!("{prompt}.input_ids"));
            let n = ids.len();
            let mut cache = model.new_cache(1, n).unwrap();
            let mut recorder = Recorder::default();
            let hidden = model
                .forward_with(token_tensor::<B>(&ids, &Default::default()), &mut cache, &mut recorder)
                .unwrap();
            let logits = model.logits(hidden);
            let what = |k: &str| format!("{name} {prompt} {k}");

            for i in 0..=config.num_hidden_layers {
                let key = format!("{prompt}.hidden_states.{i}");
                let (_, want) = golden.f32(&key);
                let err = max_abs_diff(&recorder.hidden[&i], &want);
                assert!(err < TOL, "{}: max abs err {err}", what(&key));
            }
            for l in 0..config.num_hidden_layers {
                let key = format!("{prompt}.fc1_preact.{l}");
                let (_, want) = golden.f32(&key);
                let err = max_abs_diff(&recorder.fc1[&l], &want);
                assert!(err < TOL, "{}: max abs err {err}", what(&key));
            }

            let all = to_vec(logits.clone());
            let vocab = config.vocab_size;
            if golden.has(&format!("{prompt}.logits")) {
                let (_, want) = golden.f32(&format!("{prompt}.logits"));
                let err = max_abs_diff(&all, &want);
                assert!(err < TOL, "{}: max abs err {err}", what("logits"));
            }
            let (_, want) = golden.f32(&format!("{prompt}.last_logits"));
            let err = max_abs_diff(&all[(n - 1) * vocab..], &want);
            assert!(err < TOL, "{}: max abs err {err}", what("last_logits"));

            let argmax: Vec<u32> = all
                .chunks_exact(vocab)
                .map(|row| {
                    let mut best = 0;
                    for (i, v) in row.iter().enumerate() {
                        if *v > row[best] {
                            best = i;
                        }
                    }
                    best as u32
                })
                .collect();
            assert_eq!(argmax, golden.ids(&format!("{prompt}.argmax")), "{}", what("argmax"));

            let (_, want) = golden.f32(&format!("{prompt}.next_token_logprob"));
            let got = target_log_probs(logits, &ids);
            let err = max_abs_diff(&got, &want);
            assert!(err < TOL, "{}: max abs err {err}", what("next_token_logprob"));
        }
    }
}

#[test]
fn greedy_generation_matches_hugging_face() {
    for name in MODELS {
        let (_, model) = load(name);
        let golden = Golden::of(name);
        for prompt in PROMPTS {
            let ids = golden.ids(&format!("{prompt}.input_ids"));
            let want = golden.ids(&format!("{prompt}.greedy16"));
            let options = GenerateOptions {
                max_new_tokens: want.len(),
                sampling: Sampling::Greedy,
                eos_token: None,
            };
            let mut streamed = Vec::new();
            let out = generate(&model, &mut dejavu_model::Dense, &ids, &options, |t| {
                streamed.push(t);
                true
            })
            .unwrap();
            assert_eq!(out.tokens, want, "{name} {prompt} greedy16");
            assert_eq!(streamed, want, "{name} {prompt}: streamed tokens");
        }
    }
}

/// Half precision on the CPU: the next-token log-probabilities of the pre-LN fixture in
/// f16 and bf16 stay close to Hugging Face's f32 values (weights and activations rounded to
/// 11 or 8 significant bits; LayerNorm, softmax and logits in f32).
#[test]
fn half_precision_stays_close_to_hugging_face() {
    use burn::tensor::DType;
    let name = MODELS[0];
    let golden = Golden::of(name);
    let ids = golden.ids("wiki128.input_ids");
    let (_, want) = golden.f32("wiki128.next_token_logprob");
    for (dtype, tol) in [(DType::F16, 0.01), (DType::BF16, 0.1)] {
        let device = Default::default();
        let (_, model) = dejavu_model::load_model::<B>(&fixtures().join(name), dtype, &device).unwrap();
        assert_eq!(model.dtype(), dtype);
        let mut cache = model.new_cache(1, ids.len()).unwrap();
        let logits = model.forward(token_tensor::<B>(&ids, &device), &mut cache).unwrap();
        let got = target_log_probs(logits, &ids);
        let err = max_abs_diff(&got, &want);
        assert!(err < tol, "{dtype:?}: next-token log-prob max abs err {err}");
        eprintln!("{dtype:?}: next-token log-prob max abs err {err}");
    }
}
