//! Zero-shot scoring on the bundled opt-mini: the continuation's tokens are split off as
//! documented, and a choice's score is the sum of its tokens' log-probabilities from a
//! plain forward pass.

mod common;

use common::*;
use dejavu_model::generate::token_tensor;
use dejavu_model::perplexity::target_log_probs;
use dejavu_model::zeroshot::{choice_tokens, score_choice, Choice, Task};
use dejavu_model::{default_model_dir, load_model, Dense, OptTokenizer};

fn shared_tasks() -> std::path::PathBuf {
    dejavu_model::shared_assets_dir().join("tasks")
}

#[test]
fn continuation_tokens_and_scores() {
    let dir = default_model_dir();
    let tokenizer = OptTokenizer::from_dir(&dir).unwrap();
    let (_, model) = load_model::<B>(&dir, burn::tensor::DType::F32, &Default::default()).unwrap();
    // Trailing whitespace of the context moves into the continuation.
    let choice = Choice { context: "The capital of France is ".into(), continuation: "Paris.".into() };
    let (ids, split) = choice_tokens(&tokenizer, &choice).unwrap();
    assert_eq!(ids[0], 2, "</s> first");
    assert_eq!(tokenizer.decode(&ids[split..]).unwrap(), " Paris.");
    assert_eq!(tokenizer.decode(&ids[1..split]).unwrap(), "The capital of France is");

    let score = score_choice(&model, &mut Dense, &tokenizer, &choice).unwrap();
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    let logits = model.forward(token_tensor::<B>(&ids, &Default::default()), &mut cache).unwrap();
    let lps = target_log_probs(logits, &ids);
    let expected: f64 = lps[split - 1..].iter().map(|&x| x as f64).sum();
    assert_eq!(score.tokens, ids.len() - split);
    assert!((score.log_prob - expected).abs() < 1e-4, "{} vs {expected}", score.log_prob);
}

/// Needs the shared assets (`DEJAVU_ASSETS`, default `../shared` beside the checkout);
/// says so and passes without them, as a checkout elsewhere has none.
#[test]
fn every_shared_task_file_loads() {
    if !shared_tasks().is_dir() {
        eprintln!("skipped: no shared task files at {} (set DEJAVU_ASSETS)", shared_tasks().display());
        return;
    }
    for task in Task::ALL {
        let path = shared_tasks().join(task.file_name());
        let examples = task.load(&path).unwrap_or_else(|e| panic!("{e}"));
        let choices = match task {
            Task::Lambada => 1,
            Task::Cb => 3,
            Task::Openbookqa => 4,
            _ => 2,
        };
        assert!(examples.iter().all(|e| e.choices.len() == choices), "{task:?}");
    }
}
