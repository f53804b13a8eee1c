//! The OPT configuration, read from a Hugging Face `config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::error::ModelError;

/// The fields of a Hugging Face OPT `config.json` that decide the network's shape.
///
/// Every released OPT layout is covered: pre-LN (125m, 1.3b … 66b), post-LN with
/// `project_in`/`project_out` (350m), `_remove_final_layer_norm`, `enable_bias` and
/// `layer_norm_elementwise_affine`. Fields Hugging Face adds for training or generation
/// (dropout, `init_std`, …) are ignored; values the model cannot honour are rejected by
/// [`OptConfig::validate`] instead of being silently replaced.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OptConfig {
    /// Must be `"opt"` when present.
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub ffn_dim: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// Pre-LN (`true`, every OPT but 350m) or post-LN (`false`).
    #[serde(default = "default_true")]
    pub do_layer_norm_before: bool,
    /// Width of the token embeddings; differs from `hidden_size` only in OPT-350m, where
    /// `project_in`/`project_out` map between the two.
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_true")]
    pub enable_bias: bool,
    #[serde(default = "default_true")]
    pub layer_norm_elementwise_affine: bool,
    /// Only for checkpoints fine-tuned before transformers 4.20.1: drops the final LayerNorm.
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_pad")]
    pub pad_token_id: u32,
    #[serde(default = "default_eos")]
    pub bos_token_id: u32,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_true() -> bool {
    true
}
fn default_activation() -> String {
    "relu".into()
}
fn default_pad() -> u32 {
    1
}
fn default_eos() -> u32 {
    2
}

/// OPT's learned position embedding table has two extra rows: position p reads row p + 2
/// (a leftover of fairseq's padding convention).
pub const POSITION_OFFSET: usize = 2;

impl OptConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates a configuration from JSON text.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        // serde_path_to_error names the offending field, which serde_json alone does not
        // for type errors.
        let deserializer = &mut serde_json::Deserializer::from_str(text);
        let config: Self =
            serde_path_to_error::deserialize(deserializer).map_err(|e| ModelError::Config {
                path: None,
                message: format!("field {}: {}", e.path(), e.inner()),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects values this implementation cannot run exactly as Hugging Face does.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |message: String| {
            Err(ModelError::Config {
                path: None,
                message,
            })
        };
        if let Some(kind) = &self.model_type {
            if kind != "opt" {
                return bad(format!("model_type is {kind:?}; only \"opt\" is supported"));
            }
        }
        if self.activation_function != "relu" {
            return bad(format!(
                "activation_function is {:?}; only \"relu\" is supported (contextual sparsity \
                 rests on ReLU's exact zeros)",
                self.activation_function
            ));
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("ffn_dim", self.ffn_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return bad(format!("{name} must be positive, found 0"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.word_embed_proj_dim == Some(0) {
            return bad("word_embed_proj_dim must be positive, found 0".into());
        }
        if !self.tie_word_embeddings {
            return bad(
                "tie_word_embeddings is false; OPT ties lm_head to embed_tokens and an untied \
                 head is not supported"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Width of the token embeddings (and of the tied LM head).
    pub fn embed_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }

    /// Whether `project_in`/`project_out` exist (OPT-350m).
    pub fn has_projections(&self) -> bool {
        self.embed_dim() != self.hidden_size
    }

    /// Whether the decoder ends with a LayerNorm (pre-LN models that did not remove it).
    pub fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }

    /// Number of parameters, counting the tied LM head once.
    pub fn num_parameters(&self) -> usize {
        let d = self.hidden_size;
        let ln = if self.layer_norm_elementwise_affine { 2 * d } else { 0 };
        let bias = usize::from(self.enable_bias);
        let attention = 4 * d * d + 4 * d * bias;
        let mlp = 2 * d * self.ffn_dim + (self.ffn_dim + d) * bias;
        let layer = attention + mlp + 2 * ln;
        let mut total = self.num_hidden_layers * layer
            + self.vocab_size * self.embed_dim()
            + (self.max_position_embeddings + POSITION_OFFSET) * d;
        if self.has_projections() {
            total += 2 * d * self.embed_dim();
        }
        if self.has_final_layer_norm() {
            total += ln;
        }
        total
    }

    /// An OPT configuration with the shapes of a released model, for benchmarks that need
    /// the shape but not the weights (`opt-125m`, `opt-350m`, `opt-1.3b` … `opt-66b`).
    pub fn named(name: &str) -> Option<Self> {
        let (d, layers, heads) = match name {
            "opt-125m" => (768, 12, 12),
            "opt-350m" => (1024, 24, 16),
            "opt-1.3b" => (2048, 24, 32),
            "opt-2.7b" => (2560, 32, 32),
            "opt-6.7b" => (4096, 32, 32),
            "opt-13b" => (5120, 40, 40),
            "opt-30b" => (7168, 48, 56),
            "opt-66b" => (9216, 64, 72),
            _ => return None,
        };
        let post_ln = name == "opt-350m";
        Some(Self {
            model_type: Some("opt".into()),
            vocab_size: 50272,
            hidden_size: d,
            num_hidden_layers: layers,
            ffn_dim: 4 * d,
            num_attention_heads: heads,
            max_position_embeddings: 2048,
            do_layer_norm_before: !post_ln,
            word_embed_proj_dim: Some(if post_ln { 512 } else { d }),
            activation_function: "relu".into(),
            enable_bias: true,
            layer_norm_elementwise_affine: true,
            remove_final_layer_norm: false,
            tie_word_embeddings: true,
            pad_token_id: 1,
            bos_token_id: 2,
            eos_token_id: 2,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r#"{"model_type":"opt","vocab_size":50272,"hidden_size":256,
        "num_hidden_layers":12,"ffn_dim":1024,"num_attention_heads":8,
        "max_position_embeddings":2048,"do_layer_norm_before":true,"dropout":0.1}"#;

    #[test]
    fn parses_and_ignores_training_fields() {
        let c = OptConfig::from_json(MINI).unwrap();
        assert_eq!(c.head_dim(), 32);
        assert!(c.has_final_layer_norm());
        assert!(!c.has_projections());
        assert_eq!(c.activation_function, "relu");
    }

    #[test]
    fn rejects_unsupported_activation() {
        let text = MINI.replace("\"dropout\":0.1", "\"activation_function\":\"gelu\"");
        let err = OptConfig::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("activation_function") && err.contains("gelu"), "{err}");
    }

    #[test]
    fn rejects_indivisible_heads() {
        let text = MINI.replace("\"num_attention_heads\":8", "\"num_attention_heads\":7");
        let err = OptConfig::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("not divisible"), "{err}");
    }

    #[test]
    fn named_shapes_match_published_parameter_counts() {
        // Published sizes: 1.3B = 1.32e9, 6.7B = 6.66e9, 13B = 12.85e9 (Hugging Face cards).
        let p = |n: &str| OptConfig::named(n).unwrap().num_parameters() as f64 / 1e9;
        assert!((p("opt-1.3b") - 1.316).abs() < 0.01, "{}", p("opt-1.3b"));
        assert!((p("opt-6.7b") - 6.658).abs() < 0.01, "{}", p("opt-6.7b"));
        assert!((p("opt-13b") - 12.853).abs() < 0.01, "{}", p("opt-13b"));
    }
}
