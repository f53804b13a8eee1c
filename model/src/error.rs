//! Errors of the model crate: each names the file and the problem.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid model config{}: {message}", path_suffix(path))]
    Config {
        path: Option<PathBuf>,
        message: String,
    },

    #[error("no weights in {dir}: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")]
    NoWeights { dir: PathBuf },

    #[error("cannot read weights from {path}: {message}")]
    WeightFile { path: PathBuf, message: String },

    #[error("tensor {tensor} is missing{}", files_suffix(files))]
    MissingTensor { tensor: String, files: Vec<PathBuf> },

    #[error("tensor {tensor} in {path} has shape {found:?}, expected {expected:?}")]
    WrongShape {
        tensor: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor {tensor} in {path} has dtype {found}; supported: F32, F16, BF16")]
    WrongDtype {
        tensor: String,
        path: PathBuf,
        found: String,
    },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error(
        "sequence of {requested} positions exceeds the model's limit of {limit} \
         (max_position_embeddings)"
    )]
    ContextTooLong { requested: usize, limit: usize },

    #[error("KV cache holds {capacity} positions; {requested} requested")]
    CacheFull { requested: usize, capacity: usize },

    #[error("{0}")]
    InvalidInput(String),

    #[error("predictors {dir}: {message}")]
    Predictors { dir: PathBuf, message: String },

    #[error("dtype {dtype} is not supported by the {backend} backend")]
    UnsupportedDtype { dtype: String, backend: String },
}

impl ModelError {
    /// Attaches a file to a configuration error that was raised without one.
    pub fn in_file(self, file: &Path) -> Self {
        match self {
            ModelError::Config { path: None, message } => ModelError::Config {
                path: Some(file.to_path_buf()),
                message,
            },
            other => other,
        }
    }
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

fn files_suffix(files: &[PathBuf]) -> String {
    if files.is_empty() {
        return String::new();
    }
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    format!(" from {}", names.join(", "))
}
