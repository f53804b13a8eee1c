//! Recording per-layer activations from calibration text and training the Deja Vu
//! sparsity predictors on them (the `dejavu-train` binary's library).
//!
//! - [`record`]: the dense model over calibration text → a recording folder
//!   ([`recording`] describes its layout).
//! - [`fit`]: a recording → trained, calibrated predictors (a `dejavu_predictor`
//!   predictor folder) and a report ([`report`]).

pub mod bits;
pub mod corpus;
pub mod dataset;
pub mod error;
pub mod fit;
pub mod metrics;
pub mod progress;
pub mod record;
pub mod recording;
pub mod report;

pub use error::TrainError;
pub use fit::{fit, FitOptions, FitReport};
pub use record::{record, RecordOptions, RecordOutcome};
pub use recording::RecordingManifest;
