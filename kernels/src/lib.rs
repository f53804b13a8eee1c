//! CubeCL kernels for sparse decode (gathered fc1/fc2 rows, selected-head attention,
//! fused selection). Empty so far: filled by the kernel issue. Depends on nothing of
//! `model`, `train` or `bench`.
