//! A long GPU job to enqueue ahead of timed work. CubeCL's CUDA runtime has no device
//! timers (it profiles by synchronising), so GPU time without launch gaps is measured as a
//! difference: the host enqueues the primer, then the work, which queues up behind it and
//! runs back to back; `t(primer + work) − t(primer)`. The primer must outlast the host's
//! enqueueing of the work.

use std::time::Instant;

use burn::prelude::*;

pub struct Primer<B: Backend> {
    pub device: B::Device,
    tensor: Tensor<B, 1>,
}

impl<B: Backend> Primer<B> {
    /// Passes over `tensor` (f32) are the primer's work.
    pub fn new(tensor: Tensor<B, 1>) -> Self {
        Self { device: tensor.device(), tensor }
    }

    pub fn sync(&self) -> anyhow::Result<()> {
        B::sync(&self.device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))
    }

    /// Enqueues `n` passes over the primer (read and written once each).
    pub fn prime(&self, n: usize) {
        for _ in 0..n {
            let _ = self.tensor.clone().mul_scalar(1.000_001);
        }
    }

    /// Wall seconds of `n` passes, synced before and after.
    pub fn seconds(&self, n: usize) -> anyhow::Result<f64> {
        self.sync()?;
        let t = Instant::now();
        self.prime(n);
        self.sync()?;
        Ok(t.elapsed().as_secs_f64())
    }
}
