//! A preallocated key/value cache: one `[batch, heads, capacity, head_dim]` buffer per layer,
//! written in place at the next free positions, never rebuilt.

use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use crate::error::ModelError;
use crate::opt::CacheShape;

/// Keys and values of one layer.
#[derive(Debug, Clone)]
pub struct LayerKvCache<B: Backend> {
    /// `[batch, heads, capacity, head_dim]`; positions `0..len` are valid (but see `lazy`).
    pub key: Tensor<B, 4>,
    /// `[batch, heads, capacity, head_dim]`; positions `0..len` are valid (but see `lazy`).
    pub value: Tensor<B, 4>,
    /// While the sparse path writes this layer's keys and values lazily (only for the
    /// heads it reads), which positions each head still owes and the inputs to recompute
    /// them from. `None` whenever every position below `len` is written for every head:
    /// the sparse path settles the debt before any other use of the layer.
    pub lazy: Option<dejavu_kernels::LazyKv<B>>,
}

impl<B: Backend> LayerKvCache<B> {
    /// Writes keys and values `[batch, heads, n, head_dim]` at positions `start..start + n`
    /// and returns the whole buffers. Attention reads all `capacity` positions under a mask
    /// ([`Step::mask`]) rather than a growing prefix, so every decode step has the same
    /// shapes: GPU kernels are compiled and autotuned once, not once per context length.
    pub fn append(
        &mut self,
        start: usize,
        key: Tensor<B, 4>,
        value: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, heads, n, head_dim] = key.dims();
        let end = start + n;
        let ranges = [0..batch, 0..heads, start..end, 0..head_dim];
        // `slice_assign` on a tensor we hold the only handle to writes in place; the views
        // returned below are dropped before the next step, so the buffer stays unshared.
        self.key = self.key.clone().slice_assign(ranges.clone(), key);
        self.value = self.value.clone().slice_assign(ranges, value);
        (self.key.clone(), self.value.clone())
    }
}

/// The positions one forward call covers, and the attention mask they share.
#[derive(Debug, Clone)]
pub struct Step<B: Backend> {
    /// Position of the first new token (the number already cached).
    pub start: usize,
    n: usize,
    capacity: usize,
    device: B::Device,
    /// Made on first use: the kernels' decode paths never read it, and making it is an
    /// upload to the device every step.
    mask: std::cell::OnceCell<Tensor<B, 4>>,
}

impl<B: Backend> Step<B> {
    /// Additive f32 mask `[1, 1, n, capacity]` for the `n` new tokens: 0 where new token
    /// `i` may attend to cache position `j` (`j <= start + i`), −∞ elsewhere (the future
    /// and unused slots).
    pub fn mask(&self) -> Tensor<B, 4> {
        self.mask
            .get_or_init(|| {
                let (start, n, capacity) = (self.start, self.n, self.capacity);
                let mut mask = vec![0f32; n * capacity];
                for i in 0..n {
                    for j in (start + i + 1)..capacity {
                        mask[i * capacity + j] = f32::NEG_INFINITY;
                    }
                }
                Tensor::from_data(TensorData::new(mask, [1, 1, n, capacity]), (&self.device, DType::F32))
            })
            .clone()
    }
}

/// The cache of every layer plus how many positions are filled.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<LayerKvCache<B>>,
    len: usize,
    capacity: usize,
    batch: usize,
}

impl<B: Backend> KvCache<B> {
    /// Allocates room for `capacity` positions of `batch` sequences, in `dtype`.
    pub fn with_shape(
        shape: CacheShape,
        batch: usize,
        capacity: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        if capacity > shape.max_positions {
            return Err(ModelError::ContextTooLong {
                requested: capacity,
                limit: shape.max_positions,
            });
        }
        if batch == 0 || capacity == 0 {
            return Err(ModelError::InvalidInput(
                "KV cache needs a positive batch and capacity".into(),
            ));
        }
        let dims = [batch, shape.heads, capacity, shape.head_dim];
        let layers = (0..shape.layers)
            .map(|_| LayerKvCache {
                key: Tensor::zeros(dims, (device, dtype)),
                value: Tensor::zeros(dims, (device, dtype)),
                lazy: None,
            })
            .collect();
        Ok(Self {
            layers,
            len: 0,
            capacity,
            batch,
        })
    }

    /// Number of positions already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Forgets every cached position (the buffers are reused).
    pub fn reset(&mut self) {
        self.len = 0;
        for layer in &mut self.layers {
            layer.lazy = None;
        }
    }

    /// Checks that `n` more positions of `batch` sequences fit.
    pub(crate) fn check_room(&self, batch: usize, n: usize) -> Result<(), ModelError> {
        if batch != self.batch {
            return Err(ModelError::InvalidInput(format!(
                "batch of {batch} sequences does not match the KV cache's batch of {}",
                self.batch
            )));
        }
        if self.len + n > self.capacity {
            return Err(ModelError::CacheFull {
                requested: self.len + n,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// The [`Step`] for `n` new tokens after the cached ones.
    pub fn step(&self, n: usize, device: &B::Device) -> Step<B> {
        Step { start: self.len, n, capacity: self.capacity, device: device.clone(), mask: std::cell::OnceCell::new() }
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
