//! Zero-shot evaluation by log-likelihood, in the manner of lm-evaluation-harness: each
//! example is a context with several candidate continuations; the model picks the one it
//! gives the highest log-probability. How each task builds its prompt and choices:
//!
//! | task | context | continuations | metric |
//! |---|---|---|---|
//! | COPA | `query` (premise + " because"/" therefore") | `" " + choice` | acc |
//! | PIQA | `query + "Answer:"` (`"Question: {goal}\nAnswer:"`) | `" " + choice` | acc, acc_norm |
//! | OpenBookQA | `query` (the question stem) | `" " + choice` | acc, acc_norm |
//! | WinoGrande | each of `context_options` (the sentence up to the blank, filled) | `" " + continuation`, the same for both (partial scoring) | acc |
//! | LAMBADA | `context` | `" " + continuation` (the last word) | acc = every continuation token is the greedy one; perplexity of the last word |
//! | CB | `"{premise}\nQuestion: {hypothesis}. True, False, or Neither?\nAnswer:"` | `" True"`, `" False"`, `" Neither"` (entailment, contradiction, neutral) | acc |
//! | RTE | `"{premise}\nQuestion: {hypothesis} True or False?\nAnswer:"` | `" True"`, `" False"` (entailment, not_entailment) | acc |
//!
//! Tokens: as the harness does, whitespace at the end of a context moves to the start of
//! the continuation, and the continuation's tokens are those of `context + continuation`
//! after the context's own tokens. OPT's `</s>` is prepended (the model was trained with
//! it). A sequence longer than the model's 2048 positions keeps its last 2048 tokens.
//! `acc_norm` divides each choice's log-probability by its length in characters.

use std::path::Path;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::generate::token_tensor;
use crate::hooks::ForwardHooks;
use crate::opt::Opt;
use crate::perplexity::target_log_probs;
use crate::tokenizer::OptTokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Copa,
    Piqa,
    Openbookqa,
    Winogrande,
    Lambada,
    Cb,
    Rte,
}

impl Task {
    pub const ALL: [Task; 7] =
        [Task::Copa, Task::Piqa, Task::Openbookqa, Task::Winogrande, Task::Lambada, Task::Cb, Task::Rte];

    /// The file of this task under `../shared/tasks`.
    pub fn file_name(self) -> &'static str {
        match self {
            Task::Copa => "copa.jsonl",
            Task::Piqa => "piqa.jsonl",
            Task::Openbookqa => "openbookqa.jsonl",
            Task::Winogrande => "winogrande.jsonl",
            Task::Lambada => "lambada_openai.jsonl",
            Task::Cb => "cb_val.jsonl",
            Task::Rte => "rte_val.jsonl",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Task::Copa => "copa",
            Task::Piqa => "piqa",
            Task::Openbookqa => "openbookqa",
            Task::Winogrande => "winogrande",
            Task::Lambada => "lambada",
            Task::Cb => "cb",
            Task::Rte => "rte",
        }
    }

    /// Reads the task's examples from a JSON-lines file; a line that does not parse, or an
    /// answer outside its choices, is an error naming the file and line.
    pub fn load(self, path: &Path) -> Result<Vec<Example>, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        let mut examples = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad = |what: String| {
                ModelError::InvalidInput(format!("{} line {}: {what}", path.display(), i + 1))
            };
            let example = self.parse(line).map_err(|e| bad(e.to_string()))?;
            if example.gold >= example.choices.len() || example.choices.is_empty() {
                return Err(bad(format!(
                    "answer {} is not one of its {} choices",
                    example.gold,
                    example.choices.len()
                )));
            }
            examples.push(example);
        }
        if examples.is_empty() {
            return Err(ModelError::InvalidInput(format!("{} holds no examples", path.display())));
        }
        Ok(examples)
    }

    fn parse(self, line: &str) -> Result<Example, serde_json::Error> {
        #[derive(Deserialize)]
        struct Query {
            query: String,
            choices: Vec<String>,
            gold: usize,
        }
        #[derive(Deserialize)]
        struct Wino {
            context_options: Vec<String>,
            continuation: String,
            gold: usize,
        }
        #[derive(Deserialize)]
        struct Lambada {
            context: String,
            continuation: String,
        }
        #[derive(Deserialize)]
        struct Pair {
            premise: String,
            hypothesis: String,
            label: String,
        }
        let spaced = |s: &str| format!(" {s}");
        let label = |label: &str, names: &[&str]| {
            names.iter().position(|n| *n == label).ok_or_else(|| {
                serde::de::Error::custom(format!("unknown label {label:?} (expected one of {names:?})"))
            })
        };
        Ok(match self {
            Task::Copa | Task::Openbookqa | Task::Piqa => {
                let q: Query = serde_json::from_str(line)?;
                let context = if self == Task::Piqa { format!("{}Answer:", q.query) } else { q.query };
                Example {
                    choices: q.choices.iter().map(|c| Choice { context: context.clone(), continuation: spaced(c) }).collect(),
                    gold: q.gold,
                }
            }
            Task::Winogrande => {
                let w: Wino = serde_json::from_str(line)?;
                Example {
                    choices: w
                        .context_options
                        .into_iter()
                        .map(|context| Choice { context, continuation: spaced(&w.continuation) })
                        .collect(),
                    gold: w.gold,
                }
            }
            Task::Lambada => {
                let l: Lambada = serde_json::from_str(line)?;
                Example { choices: vec![Choice { context: l.context, continuation: spaced(&l.continuation) }], gold: 0 }
            }
            Task::Cb => {
                let p: Pair = serde_json::from_str(line)?;
                let context = format!("{}\nQuestion: {}. True, False, or Neither?\nAnswer:", p.premise, p.hypothesis);
                Example {
                    choices: ["True", "False", "Neither"]
                        .iter()
                        .map(|c| Choice { context: context.clone(), continuation: spaced(c) })
                        .collect(),
                    gold: label(&p.label, &["entailment", "contradiction", "neutral"])?,
                }
            }
            Task::Rte => {
                let p: Pair = serde_json::from_str(line)?;
                let context = format!("{}\nQuestion: {} True or False?\nAnswer:", p.premise, p.hypothesis);
                Example {
                    choices: ["True", "False"]
                        .iter()
                        .map(|c| Choice { context: context.clone(), continuation: spaced(c) })
                        .collect(),
                    gold: label(&p.label, &["entailment", "not_entailment"])?,
                }
            }
        })
    }
}

/// One candidate: the text before it and the text scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub context: String,
    pub continuation: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub choices: Vec<Choice>,
    pub gold: usize,
}

/// What the model says of one continuation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChoiceScore {
    /// Sum of the continuation tokens' log-probabilities.
    pub log_prob: f64,
    /// Every continuation token was the model's most likely next token.
    pub greedy: bool,
    pub tokens: usize,
}

/// Context and continuation tokens, split as the harness splits them.
pub fn choice_tokens(tokenizer: &OptTokenizer, choice: &Choice) -> Result<(Vec<u32>, usize), ModelError> {
    let trimmed = choice.context.trim_end();
    let moved = &choice.context[trimmed.len()..];
    let continuation = format!("{moved}{}", choice.continuation);
    let context = tokenizer.encode(trimmed)?;
    let whole = tokenizer.encode(&format!("{trimmed}{continuation}"))?;
    let split = context.len().min(whole.len() - 1);
    Ok((whole, split))
}

/// Scores one choice: one forward over context and continuation.
pub fn score_choice<B: Backend, H: ForwardHooks<B> + ?Sized>(
    model: &Opt<B>,
    hooks: &mut H,
    tokenizer: &OptTokenizer,
    choice: &Choice,
) -> Result<ChoiceScore, ModelError> {
    let (mut ids, mut split) = choice_tokens(tokenizer, choice)?;
    if ids.len() > model.max_positions {
        let cut = ids.len() - model.max_positions;
        ids.drain(..cut);
        split = split.saturating_sub(cut).max(1);
    }
    let n = ids.len();
    let device = model.device();
    let mut cache = model.new_cache(1, n)?;
    let hidden = model.forward_with(token_tensor::<B>(&ids, &device), &mut cache, hooks)?;
    let logits = model.logits(hidden);
    let vocab = logits.dims()[2];
    // Positions split-1 .. n-1 predict the continuation tokens split .. n.
    let logits = logits.slice([0..1, split - 1..n, 0..vocab]);
    let log_probs = target_log_probs(logits.clone(), &ids[split - 1..]);
    let best: Vec<i64> = logits
        .slice([0..1, 0..n - split, 0..vocab])
        .argmax(2)
        .into_data()
        .convert::<i64>()
        .into_vec()
        .expect("int data");
    Ok(ChoiceScore {
        log_prob: log_probs.iter().map(|&p| p as f64).sum(),
        greedy: best.iter().zip(&ids[split..]).all(|(&b, &t)| b == t as i64),
        tokens: log_probs.len(),
    })
}

/// A task's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskReport {
    pub task: Task,
    pub examples: usize,
    /// Fraction answered right (LAMBADA: last word greedy).
    pub accuracy: f64,
    /// Standard error of `accuracy`, `sqrt(acc·(1−acc)/(n−1))` as the harness reports it:
    /// the noise against which dense and sparse are compared.
    pub accuracy_stderr: f64,
    /// Accuracy with log-probabilities divided by the choice's length in characters
    /// (multiple-choice tasks).
    pub accuracy_norm: Option<f64>,
    /// LAMBADA: perplexity of the last word's tokens.
    pub perplexity: Option<f64>,
}

/// Evaluates `examples` (of `task`), calling `progress(done)` after each.
pub fn evaluate<B: Backend, H: ForwardHooks<B> + ?Sized>(
    model: &Opt<B>,
    hooks: &mut H,
    tokenizer: &OptTokenizer,
    task: Task,
    examples: &[Example],
    mut progress: impl FnMut(usize),
) -> Result<TaskReport, ModelError> {
    let (mut right, mut right_norm) = (0usize, 0usize);
    let (mut nll, mut tokens) = (0.0f64, 0usize);
    for (i, example) in examples.iter().enumerate() {
        let scores = example
            .choices
            .iter()
            .map(|c| score_choice(model, hooks, tokenizer, c))
            .collect::<Result<Vec<_>, _>>()?;
        if task == Task::Lambada {
            right += scores[0].greedy as usize;
            nll -= scores[0].log_prob;
            tokens += scores[0].tokens;
        } else {
            let argmax = |f: &dyn Fn(usize) -> f64| {
                (0..scores.len()).fold(0, |best, j| if f(j) > f(best) { j } else { best })
            };
            right += (argmax(&|j| scores[j].log_prob) == example.gold) as usize;
            let len = |j: usize| example.choices[j].continuation.chars().count().max(1) as f64;
            right_norm += (argmax(&|j| scores[j].log_prob / len(j)) == example.gold) as usize;
        }
        progress(i + 1);
    }
    let n = examples.len();
    let accuracy = right as f64 / n as f64;
    Ok(TaskReport {
        task,
        examples: n,
        accuracy,
        accuracy_stderr: (accuracy * (1.0 - accuracy) / (n.max(2) - 1) as f64).sqrt(),
        accuracy_norm: (task != Task::Lambada).then(|| right_norm as f64 / n as f64),
        perplexity: (task == Task::Lambada).then(|| (nll / tokens.max(1) as f64).exp()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lines: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), lines).unwrap();
        f
    }

    #[test]
    fn prompts_are_built_as_documented() {
        let f = write(r#"{"premise": "It rained.", "hypothesis": "The street is wet", "label": "entailment", "idx": 0}"#);
        let ex = Task::Rte.load(f.path()).unwrap();
        assert_eq!(ex[0].gold, 0);
        assert_eq!(ex[0].choices[1].context, "It rained.\nQuestion: The street is wet True or False?\nAnswer:");
        assert_eq!(ex[0].choices[1].continuation, " False");
        let f = write(r#"{"choices": ["a", "b"], "gold": 1, "query": "Question: How?\n"}"#);
        let ex = Task::Piqa.load(f.path()).unwrap();
        assert_eq!(ex[0].choices[0].context, "Question: How?\nAnswer:");
        let f = write(r#"{"context_options": ["x A", "x B"], "continuation": "went.", "gold": 1}"#);
        let ex = Task::Winogrande.load(f.path()).unwrap();
        assert_eq!(ex[0].choices[1], Choice { context: "x B".into(), continuation: " went.".into() });
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let f = write("{\"query\": \"q\", \"choices\": [\"a\"], \"gold\": 0}\n{\"query\": \"q\", \"choices\": [\"a\"], \"gold\": 3}\n");
        let err = Task::Copa.load(f.path()).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("answer 3"), "{err}");
        let f = write(r#"{"premise": "p", "hypothesis": "h", "label": "maybe"}"#);
        let err = Task::Cb.load(f.path()).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("maybe"), "{err}");
        let f = write("not json\n");
        assert!(Task::Lambada.load(f.path()).unwrap_err().to_string().contains("line 1"));
    }
}
