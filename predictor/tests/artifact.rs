//! The predictor folder: save/load round trip, and clear errors for bad folders.

use burn::backend::Flex;
use burn::prelude::*;
use dejavu_predictor::{ArtifactError, LayerEntry, Manifest, OutputEntry, PredictorSet, MANIFEST_FILE, WEIGHTS_FILE};

type B = Flex;

fn entry(rank: usize) -> Option<OutputEntry> {
    Some(OutputEntry { rank, k: Some(3), threshold: Some(-0.5), recall: Some(0.99), density: Some(0.2), threshold_recall: Some(0.991), threshold_density: Some(0.15), true_density: Some(0.1) })
}

fn manifest() -> Manifest {
    Manifest {
        format: 1,
        model_hash: "sha256:test".into(),
        hidden_size: 8,
        ffn_dim: 32,
        num_heads: 4,
        num_layers: 2,
        lookahead: 1,
        layers: vec![
            LayerEntry { layer: 0, mlp: None, attention: entry(3) },
            LayerEntry { layer: 1, mlp: entry(4), attention: None },
        ],
    }
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

#[test]
fn save_then_load_gives_the_same_predictors() {
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let set = PredictorSet::<B>::init(manifest(), &device).unwrap();
    set.save(dir.path()).unwrap();
    assert!(!dir.path().join(format!("{WEIGHTS_FILE}.tmp")).exists());
    let loaded = PredictorSet::<B>::load(dir.path(), &device).unwrap();
    assert_eq!(loaded.manifest, set.manifest);
    let x = Tensor::<B, 2>::random([5, 8], burn::tensor::Distribution::Default, &device);
    let mlp = |s: &PredictorSet<B>| values(s.modules.mlp[1].as_ref().unwrap().forward(x.clone()));
    let att = |s: &PredictorSet<B>| values(s.modules.attention[0].as_ref().unwrap().forward(x.clone()));
    assert_eq!(mlp(&loaded), mlp(&set));
    assert_eq!(att(&loaded), att(&set));
    assert_eq!(loaded.modules.mlp[1].as_ref().unwrap().dims(), (8, 4, 32));
    assert_eq!(loaded.modules.attention[0].as_ref().unwrap().dims(), (8, 3, 4));
    assert!(loaded.modules.mlp[0].is_none() && loaded.modules.attention[1].is_none());
}

#[test]
fn bad_folders_are_clear_errors() {
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();

    // No manifest.
    let err = PredictorSet::<B>::load(dir.path(), &device).unwrap_err();
    assert!(matches!(err, ArtifactError::Io { .. }) && err.to_string().contains(MANIFEST_FILE), "{err}");

    // Malformed JSON.
    std::fs::write(dir.path().join(MANIFEST_FILE), "{ not json").unwrap();
    let err = PredictorSet::<B>::load(dir.path(), &device).unwrap_err();
    assert!(matches!(err, ArtifactError::Json { .. }), "{err}");

    // A manifest that contradicts itself.
    let mut m = manifest();
    m.num_layers = 3;
    std::fs::write(dir.path().join(MANIFEST_FILE), serde_json::to_string(&m).unwrap()).unwrap();
    let err = PredictorSet::<B>::load(dir.path(), &device).unwrap_err();
    assert!(err.to_string().contains("2 layer entries for num_layers 3"), "{err}");

    // Manifest fine, weights missing.
    PredictorSet::<B>::init(manifest(), &device).unwrap().save(dir.path()).unwrap();
    std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).unwrap();
    let err = PredictorSet::<B>::load(dir.path(), &device).unwrap_err();
    assert!(err.to_string().contains(WEIGHTS_FILE), "{err}");

    // Weights of another shape than the manifest says.
    PredictorSet::<B>::init(manifest(), &device).unwrap().save(dir.path()).unwrap();
    let mut m = manifest();
    m.layers[1].mlp.as_mut().unwrap().rank = 5;
    std::fs::write(dir.path().join(MANIFEST_FILE), serde_json::to_string(&m).unwrap()).unwrap();
    let err = PredictorSet::<B>::load(dir.path(), &device).unwrap_err();
    assert!(matches!(err, ArtifactError::Weights { .. }), "{err}");

    // A predictor where the manifest has none (dense layer) must not load silently as
    // random weights either: the manifest wins, and the weights file's extra tensors are
    // simply unused; what the manifest asks for must be present.
    let mut m = manifest();
    m.layers[0].mlp = entry(2);
    std::fs::write(dir.path().join(MANIFEST_FILE), serde_json::to_string(&m).unwrap()).unwrap();
    let err = PredictorSet::<B>::load(dir.path(), &device).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}
