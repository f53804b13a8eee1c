//! record → fit → predictor folder on a tiny random OPT (the fixture `opt-tiny-preln`,
//! 2 layers, hidden 64, ffn 256, 4 heads) over generated text, on the CPU backend; and
//! what must fail clearly: a truncated shard, a recording of another model, other
//! settings in an existing folder.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::tensor::DType;
use dejavu_predictor::PredictorSet;
use dejavu_train::recording::{RecordingManifest, Split};
use dejavu_train::{fit, record, FitOptions, RecordOptions, RecordOutcome};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures")
}

/// A model folder: a fixture's config and weights plus the OPT BPE files.
fn model_dir(root: &Path, fixture: &str) -> PathBuf {
    let dir = root.join(fixture);
    std::fs::create_dir_all(&dir).unwrap();
    for (from, to) in [
        (fixtures().join(fixture).join("config.json"), "config.json"),
        (fixtures().join(fixture).join("model.safetensors"), "model.safetensors"),
        (fixtures().join("tokenizer/vocab.json"), "vocab.json"),
        (fixtures().join("tokenizer/merges.txt"), "merges.txt"),
    ] {
        std::fs::copy(&from, dir.join(to)).unwrap();
    }
    dir
}

/// `documents` documents of 20–80 pseudo-random words, separated by two blank lines.
fn corpus(root: &Path, documents: usize) -> PathBuf {
    const WORDS: [&str; 24] = [
        "the", "model", "reads", "a", "token", "and", "every", "layer", "keeps", "only", "few", "neurons", "river", "north",
        "city", "was", "built", "in", "1842", "by", "workers", "who", "sang", ".",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut text = String::new();
    for _ in 0..documents {
        let n = 20 + next() as usize % 60;
        let words: Vec<&str> = (0..n).map(|_| WORDS[next() as usize % WORDS.len()]).collect();
        text.push_str(&words.join(" "));
        text.push_str("\n\n\n");
    }
    let path = root.join("corpus.txt");
    std::fs::write(&path, text).unwrap();
    path
}

fn options(model: &Path, text: &Path, out: &Path) -> RecordOptions {
    RecordOptions {
        model: model.to_path_buf(),
        text: text.to_path_buf(),
        out: out.to_path_buf(),
        train_rows: 900,
        valid_rows: 300,
        max_document_tokens: 64,
        length_bucket: 16,
        // ~100 rows per shard for this model: several shards per split, cut mid-document.
        shard_bytes: 100 * 600,
        lookahead: 1,
        dtype: DType::F32,
        progress: false,
        stop_after_shards: None,
    }
}

fn complete(outcome: RecordOutcome) -> RecordingManifest {
    match outcome {
        RecordOutcome::Complete(m) => m,
        RecordOutcome::Stopped { .. } => panic!("recording stopped"),
    }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn record_then_fit_writes_calibrated_predictors() {
    let root = tempfile::tempdir().unwrap();
    let model = model_dir(root.path(), "opt-tiny-preln");
    let text = corpus(root.path(), 60);
    let rec = root.path().join("rec");
    let device = Default::default();
    let manifest = complete(record::<Flex>(&options(&model, &text, &rec), &device).unwrap());
    assert_eq!((manifest.train_rows, manifest.valid_rows), (900, 300));
    assert!(manifest.shards.len() >= 10, "{} shards", manifest.shards.len());
    assert!(manifest.valid_documents > 0 && manifest.train_documents > 0);
    // Pairs follow the lookahead: layer 1 reads layer 0's residuals; layer 0 has none.
    assert_eq!(manifest.pairs.len(), 2);
    assert!(manifest.pairs.iter().all(|p| p.layer == 1 && p.input.starts_with("layer.0.")));
    // Validation documents are never training documents.
    let docs = |split| {
        let mut set = std::collections::BTreeSet::new();
        for shard in manifest.open_shards(&rec, split).unwrap() {
            for c in shard.bytes("document").unwrap().chunks(4) {
                set.insert(u32::from_le_bytes(c.try_into().unwrap()));
            }
        }
        set
    };
    assert!(docs(Split::Valid).is_disjoint(&docs(Split::Train)));

    let out = root.path().join("predictors");
    let fit_options = FitOptions {
        recording: rec.clone(),
        model: model.clone(),
        out: out.clone(),
        mlp_ranks: vec![4, 16],
        attention_ranks: vec![8],
        epochs: 3,
        patience: 2,
        batch_size: 128,
        mlp_learning_rate: 1e-2,
        attention_learning_rate: 1e-2,
        weight_decay: 0.01,
        head_fraction: 0.5,
        mlp_target_recall: 0.9,
        attention_target_recall: 0.9,
        layers: None,
        kinds: vec![],
        seed: 1,
        workers: 1,
        resume: false,
        progress: false,
    };
    let report = fit::<Autodiff<Flex>>(&fit_options, &device).unwrap();
    assert_eq!(report.trained.len(), 3);
    for t in &report.trained {
        let c = &t.calibration;
        assert!(c.recall_at_threshold >= 0.9 && c.recall_at_k >= 0.9, "{t:?}");
        assert!(c.density_at_threshold <= 1.0 && c.true_density > 0.0 && c.true_density < 1.0);
        assert!(!t.epochs.is_empty() && t.epochs.iter().all(|e| e.recall.is_some() && e.valid_loss.is_some()));
        if t.kind == dejavu_train::dataset::PredictorKind::Attention {
            // Half of 4 heads are labelled per token.
            assert!((c.true_density - 0.5).abs() < 1e-9);
        }
    }

    let set = PredictorSet::<Flex>::load(&out, &device).unwrap();
    assert_eq!(set.manifest.lookahead, 1);
    assert_eq!(set.manifest.model_hash, manifest.plan.model_hash);
    assert!(set.manifest.layers[0].mlp.is_none() && set.manifest.layers[0].attention.is_none());
    let mlp = set.manifest.layers[1].mlp.as_ref().unwrap();
    assert!(mlp.rank == 4 || mlp.rank == 16);
    assert!(mlp.k.unwrap() <= 256 && mlp.threshold.is_some() && mlp.recall.unwrap() >= 0.9);
    assert_eq!(set.modules.mlp[1].as_ref().unwrap().dims(), (64, mlp.rank, 256));
    assert_eq!(set.manifest.layers[1].attention.as_ref().unwrap().rank, 8);

    // A resumed fit keeps what is finished and writes the same folder.
    let before = std::fs::read_to_string(out.join("predictors.json")).unwrap();
    let again = fit::<Autodiff<Flex>>(&FitOptions { resume: true, ..fit_options.clone() }, &device).unwrap();
    assert_eq!(again.chosen, report.chosen);
    assert_eq!(std::fs::read_to_string(out.join("predictors.json")).unwrap(), before);

    // A truncated shard is named in the error.
    let victim = rec.join(&manifest.shards[manifest.shards.len() - 1].file);
    let len = std::fs::metadata(&victim).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&victim).unwrap().set_len(len / 2).unwrap();
    let err = fit::<Autodiff<Flex>>(&FitOptions { out: root.path().join("p2"), ..fit_options.clone() }, &device).unwrap_err().to_string();
    assert!(err.contains(victim.file_name().unwrap().to_str().unwrap()) && err.contains("truncated or corrupt"), "{err}");

    // A recording of another model is refused.
    let other = model_dir(root.path(), "opt-tiny-postln-proj");
    let err = fit::<Autodiff<Flex>>(&FitOptions { model: other, out: root.path().join("p3"), ..fit_options }, &device).unwrap_err().to_string();
    assert!(err.contains("recording.json") && err.contains("was made from the model"), "{err}");
}

#[test]
fn interrupted_recording_resumes_to_identical_files() {
    let root = tempfile::tempdir().unwrap();
    let model = model_dir(root.path(), "opt-tiny-preln");
    let text = corpus(root.path(), 60);
    let device = Default::default();

    let whole = root.path().join("whole");
    complete(record::<Flex>(&options(&model, &text, &whole), &device).unwrap());

    let resumed = root.path().join("resumed");
    // Stop inside the validation split, then inside the training split; leave a
    // half-written shard behind as a kill during a write would.
    for stop in [2, 5] {
        let outcome = record::<Flex>(&RecordOptions { stop_after_shards: Some(stop), ..options(&model, &text, &resumed) }, &device).unwrap();
        assert!(matches!(outcome, RecordOutcome::Stopped { .. }));
        std::fs::write(resumed.join("train-00009.safetensors.tmp"), b"partial").unwrap();
        assert!(!resumed.join("recording.json").exists());
    }
    complete(record::<Flex>(&options(&model, &text, &resumed), &device).unwrap());
    let (a, b) = (files(&whole), files(&resumed));
    assert_eq!(a.iter().map(|f| &f.0).collect::<Vec<_>>(), b.iter().map(|f| &f.0).collect::<Vec<_>>());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs after resuming");
    }

    // Rerunning a complete recording changes nothing; other settings are refused.
    complete(record::<Flex>(&options(&model, &text, &resumed), &device).unwrap());
    assert_eq!(files(&resumed), b);
    let err = record::<Flex>(&RecordOptions { train_rows: 1000, ..options(&model, &text, &resumed) }, &device).unwrap_err().to_string();
    assert!(err.contains("plan.json") && err.contains("train_rows: 900 there, 1000 now"), "{err}");
}

/// The binary, killed with SIGKILL in the middle of recording, resumes to the same files.
#[cfg(unix)]
#[test]
fn killed_recording_resumes_to_identical_files() {
    let root = tempfile::tempdir().unwrap();
    let model = model_dir(root.path(), "opt-tiny-preln");
    let text = corpus(root.path(), 200);
    let run = |out: &Path| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dejavu-train"));
        cmd.args(["record", "--backend", "cpu", "--rows", "4000", "--valid-rows", "200", "--max-document-tokens", "64", "--shard-mb", "1"])
            .arg("--model")
            .arg(&model)
            .arg("--text")
            .arg(&text)
            .arg("--out")
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd
    };
    let whole = root.path().join("whole");
    assert!(run(&whole).status().unwrap().success());
    let killed = root.path().join("killed");
    let mut child = run(&killed).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !killed.join("train-00000.safetensors").exists() {
        assert!(std::time::Instant::now() < deadline, "no shard written");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!killed.join("recording.json").exists(), "finished before it could be killed");
    assert!(run(&killed).status().unwrap().success());
    let (a, b) = (files(&whole), files(&killed));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs after kill -9 and resume");
    }
}
