//! The CubeCL implementation, for `CubeBackend` on any CubeCL runtime (CUDA, wgpu).

mod kernels;
mod launch;

pub use launch::{
    LaunchConfig, LazyArgs, NormArgs, NormInArgs, FirstArgs, argmax_rows, QueryArgs, SelectArgs, attention_out_proj_accumulate, block_cols_gemv, embed_rows, gated_rows_gemv, kv_append, qkv_append, qkv_append_lazy, layer_norm, norm_predict, predict_select, predicted_mlp, predicted_rows_gemv,
    rows_gemv_into, rows_gemv_with, rows_transposed_gemv_accumulate, rows_transposed_gemv_into, rows_transposed_gemv_with,
    supports_atomic_f32_add,
    select_above_threshold, selected_heads_attention,
};
