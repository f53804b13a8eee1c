//! Sparsity predictors (low-rank MLP-neuron and attention-head classifiers), selection and
//! the per-layer sparsity plan. Empty so far: filled by the predictor-training and
//! sparse-inference issues. Depends on nothing of `model`, `train` or `bench`.
