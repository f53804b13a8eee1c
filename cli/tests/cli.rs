//! The `dejavu` binary end to end on the bundled opt-mini (CPU backend): the README's
//! main command, perplexity with its JSON, and clear errors for bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn dejavu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dejavu"))
        .args(args)
        .env_remove("DEJAVU_MODEL")
        .output()
        .expect("run dejavu")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/opt-mini")
}

#[test]
fn generate_with_the_bundled_model() {
    let out = dejavu(&["generate", "The capital of France is", "--max-new-tokens", "4"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("The capital of France is"), "{stdout}");
    assert!(stdout.trim_end().len() > "The capital of France is".len(), "{stdout}");
    assert!(stderr.contains("tokens/s") && stderr.contains("6 prompt tokens"), "{stderr}");
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let args = [
        "generate", "Once upon a time", "--max-new-tokens", "5", "--sample", "--temperature",
        "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "7", "--ignore-eos",
    ];
    let (a, b) = (dejavu(&args), dejavu(&args));
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert_eq!(text(&a.stdout), text(&b.stdout));
}

#[test]
fn perplexity_of_a_small_text_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("text.txt");
    std::fs::write(
        &file,
        "The tower is 324 metres tall, about the same height as an 81-storey building. \
         Its base is square, measuring 125 metres on each side.",
    )
    .unwrap();
    let json = dir.path().join("ppl.json");
    let out = dejavu(&[
        "perplexity", file.to_str().unwrap(), "--window", "16", "--stride", "8", "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("perplexity"), "{}", text(&out.stdout));
    let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let ppl = value["report"]["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{value}");
    let tokens = value["report"]["text_tokens"].as_u64().unwrap();
    assert_eq!(value["report"]["tokens_scored"].as_u64().unwrap(), tokens - 1);
}

#[test]
fn empty_text_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("empty.txt");
    std::fs::write(&file, "\n  \n").unwrap();
    let out = dejavu(&["perplexity", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("empty.txt is empty"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn prompt_longer_than_the_model_is_a_clear_error() {
    let prompt = "word ".repeat(2100);
    let out = dejavu(&["generate", &prompt, "--max-new-tokens", "1"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("exceeds the model's limit of 2048"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn missing_model_folder_is_a_clear_error() {
    let out = dejavu(&["generate", "hi", "--model", "/nonexistent/opt"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("/nonexistent/opt does not exist"), "{stderr}");
}

#[test]
fn help_explains_the_perplexity_conventions() {
    let out = dejavu(&["perplexity", "--help"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Hugging Face perplexity guide") && stdout.contains("--non-overlapping"), "{stdout}");
    assert!(assets().join("config.json").is_file());
}

#[test]
fn fused_cuda_refuses_half_precision() {
    // Refused before any device is touched, so this runs without a GPU.
    let out = dejavu(&["generate", "hi", "--backend", "cuda-fused", "--dtype", "f16"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cuda-fused computes wrong results") && stderr.contains("--backend cuda"), "{stderr}");
}

fn bundled_predictors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/opt-mini-predictors")
}

#[test]
fn sparse_generation_with_the_bundled_predictors() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("gen.json");
    let out = dejavu(&[
        "generate", "The capital of France is", "--max-new-tokens", "4", "--predictors", "--json",
        json.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("The capital of France is"), "{stdout}");
    assert!(stderr.contains("sparse: calibrated") && stderr.contains("kept per token"), "{stderr}");
    let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(value["new_tokens"].as_array().unwrap().len(), 4, "{value}");
    // Layer 0 has no predictor (lookahead 1) and stays dense; the others keep their K.
    let kept = &value["sparse"]["kept"]["mlp"];
    assert!(kept[0].is_null() && kept[1].as_f64().unwrap() < 1.0, "{value}");
}

#[test]
fn sparse_zero_shot_eval_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("eval.json");
    // Task files of our own (the shared ones are read by model/tests/zeroshot.rs).
    std::fs::write(
        dir.path().join("copa.jsonl"),
        "{\"query\": \"The man turned on the faucet, therefore\", \"gold\": 1, \"choices\": [\"the toilet filled with water.\", \"water flowed from the spout.\"]}\n\
         {\"query\": \"The woman retired, therefore\", \"gold\": 0, \"choices\": [\"she received her pension.\", \"she paid off her mortgage.\"]}\n\
         {\"query\": \"The hamburger meat browned, because\", \"gold\": 1, \"choices\": [\"the cook froze it.\", \"the cook grilled it.\"]}\n\
         {\"query\": \"I wanted to conserve energy, therefore\", \"gold\": 1, \"choices\": [\"i swept the floor.\", \"i shut off the light.\"]}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("winogrande.jsonl"),
        "{\"context_options\": [\"Sarah was a better surgeon than Maria so Sarah\", \"Sarah was a better surgeon than Maria so Maria\"], \"continuation\": \"got the harder cases.\", \"gold\": 0}\n",
    )
    .unwrap();
    let out = dejavu(&[
        "eval", "--task", "copa,winogrande", "--limit", "3", "--predictors", "--operating-point",
        "mlp=0.1,attention=0.5", "--tasks-dir", dir.path().to_str().unwrap(), "--json", json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let tasks = value["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[0]["examples"], 3, "--limit 3 of 4");
    assert_eq!(tasks[1]["examples"], 1);
    // Every token sparse: 10% of the neurons in every layer with a predictor.
    let kept = value["sparse"]["kept"]["mlp"][1].as_f64().unwrap();
    assert!((kept - 103.0 / 1024.0).abs() < 1e-9, "{value}");
}

#[test]
fn predictors_of_another_model_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["predictors.json", "predictors.safetensors"] {
        std::fs::copy(bundled_predictors().join(f), dir.path().join(f)).unwrap();
    }
    let manifest = dir.path().join("predictors.json");
    let text_ = std::fs::read_to_string(&manifest).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text_).unwrap();
    value["model_hash"] = "sha256:0000".into();
    std::fs::write(&manifest, value.to_string()).unwrap();
    let out = dejavu(&["generate", "hi", "--max-new-tokens", "1", "--predictors", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("trained for another model") && stderr.contains("sha256:0000"), "{stderr}");

    let out = dejavu(&["generate", "hi", "--predictors", "--operating-point", "fastest"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("expected calibrated, threshold"), "{}", text(&out.stderr));
}
