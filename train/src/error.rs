//! Errors of recording and training; each names the file and the problem.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bad calibration text or command-line input.
    #[error("{path}: {what}")]
    Input { path: PathBuf, what: String },
    /// A recording folder that is incomplete, corrupt, or made with other settings.
    #[error("{path}: {what}")]
    Recording { path: PathBuf, what: String },
    #[error(transparent)]
    Model(#[from] dejavu_model::ModelError),
    #[error(transparent)]
    Artifact(#[from] dejavu_predictor::ArtifactError),
    #[error("{0}")]
    Other(String),
}

impl TrainError {
    pub fn recording(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        TrainError::Recording { path: path.into(), what: what.into() }
    }
}
