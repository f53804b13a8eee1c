//! OPT as backend-generic Burn modules: configuration from Hugging Face `config.json`,
//! weights from safetensors or PyTorch checkpoints, a preallocated KV cache, generation
//! and perplexity, and the [`ForwardHooks`] seam through which recording and the sparse
//! path ([`sparse`]) attach to the one model.

pub mod attention;
pub mod cache;
pub mod config;
pub mod decode;
pub mod error;
pub mod generate;
pub mod hooks;
pub mod layer;
pub mod mlp;
pub mod opt;
pub mod perplexity;
pub mod sparse;
pub mod text;
pub mod tokenizer;
pub mod weights;
pub mod zeroshot;

pub use cache::{KvCache, LayerKvCache, Step};
pub use config::OptConfig;
pub use decode::{use_row_major_weights, DecodeWeights, KernelDecode};
pub use error::ModelError;
pub use generate::{generate, greedy_tokens, GenerateOptions, Generation, Sampler, Sampling};
pub use hooks::{Activation, Dense, ForwardHooks, NormSite, Tapped};
pub use opt::Opt;
pub use sparse::{SparseHooks, SparseModel, SparseOptions, SparsityStats};
pub use perplexity::{perplexity, PerplexityMethod, PerplexityReport};
pub use tokenizer::OptTokenizer;
pub use weights::{content_hash, default_model_dir, default_predictors_dir, shared_assets_dir, load_config, load_model, WeightFiles};
