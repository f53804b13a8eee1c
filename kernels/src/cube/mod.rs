//! The CubeCL implementation, for `CubeBackend` on any CubeCL runtime (CUDA, wgpu).

mod kernels;
mod launch;

pub use launch::{
    rows_gemv, rows_gemv_into, rows_transposed_gemv, rows_transposed_gemv_into,
    select_above_threshold,
};
