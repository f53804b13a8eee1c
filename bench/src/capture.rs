//! Nsight Compute's capture window. Under `ncu --profile-from-start off`, only the kernels
//! enqueued between `cuProfilerStart` and `cuProfilerStop` are profiled, so one decode
//! step's kernels can be timed one by one without profiling the thousands of launches
//! (prefill, autotune, warm-up) around it.

/// Runs `f` (work that syncs the device before it returns) inside the capture window when
/// `DEJAVU_NCU_CAPTURE` is set (a build without CUDA then fails); otherwise does nothing,
/// so a benchmark pays for the captured work only when it is profiled.
pub fn ncu_window<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<Option<T>> {
    if std::env::var_os("DEJAVU_NCU_CAPTURE").is_none() {
        return Ok(None);
    }
    imp::start()?;
    let out = f();
    imp::stop()?;
    out.map(Some)
}

#[cfg(feature = "cuda")]
mod imp {
    use cudarc::driver::{result, sys};

    /// The profiler acts on the calling thread's current context; CubeCL launches from its
    /// own thread into the device's primary context, so make that one current here.
    pub fn start() -> anyhow::Result<()> {
        // SAFETY: plain driver calls; the primary context is retained, so it stays valid.
        unsafe {
            result::init()?;
            let ctx = result::primary_ctx::retain(result::device::get(0)?)?;
            result::ctx::set_current(ctx)?;
            sys::cuProfilerStart().result()?;
        }
        Ok(())
    }

    pub fn stop() -> anyhow::Result<()> {
        // SAFETY: as in `start`.
        unsafe { sys::cuProfilerStop().result()? };
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    pub fn start() -> anyhow::Result<()> {
        anyhow::bail!("DEJAVU_NCU_CAPTURE needs a build with the cuda feature")
    }

    pub fn stop() -> anyhow::Result<()> {
        Ok(())
    }
}
