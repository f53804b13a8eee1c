//! What the dejavu binaries (`dejavu`, `dejavu-train`, `dejavu-bench`) share on their
//! command lines: picking a Burn backend and dtype at run time, the model folder argument,
//! and clap types for the libraries' enums. Each backend is compiled in behind a cargo
//! feature of this crate (`cpu`, `wgpu`, `cuda`); the generic work is monomorphized in the
//! binary that calls [`dispatch`], once per enabled backend. Kept out of the libraries, which
//! report errors with `thiserror` types and know nothing of clap.

use anyhow::{bail, Context};
use burn::tensor::DType;
pub use dejavu_kernels::SparseKernels;
use dejavu_model::zeroshot::Task;

/// The model folder a command-line `--model` names, or the bundled one
/// ([`dejavu_model::default_model_dir`]); an error when the folder does not exist.
pub fn model_dir(arg: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    let dir = arg.map(std::path::Path::to_path_buf).unwrap_or_else(dejavu_model::default_model_dir);
    if !dir.is_dir() {
        bail!(
            "model folder {} does not exist (expected a Hugging Face OPT folder with config.json)",
            dir.display()
        );
    }
    Ok(dir)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Burn's pure-Rust CPU backend (Flex).
    Cpu,
    /// wgpu (Vulkan, Metal, DX12; Mesa's lavapipe without a GPU).
    Wgpu,
    /// CUDA through CubeCL's `CubeBackend` (kernels compiled at run time by NVRTC).
    Cuda,
    /// CUDA through Burn's kernel-fusion layer over `CubeBackend`. f32 only: in half
    /// precision it computes wrong results (WikiText-2 perplexity of opt-mini 393.9 instead
    /// of 621.5; `bench/results/perplexity-opt-mini-wikitext2.json`).
    CudaFused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// Work to run on whichever backend was chosen. Every backend [`dispatch`] picks has the
/// sparse kernels ([`SparseKernels`]: the CubeCL ones on `CubeBackend`, the tensor-op
/// reference elsewhere), so a task may run the sparse path.
pub trait BackendTask {
    type Output;
    fn run<B: SparseKernels>(self, device: B::Device) -> anyhow::Result<Self::Output>;
}

#[cfg_attr(not(any(feature = "cpu", feature = "wgpu", feature = "cuda")), allow(dead_code))]
/// Sets `device`'s default float dtype (so every tensor the model creates matches its
/// weights) and runs `task` there.
fn run_on<B: SparseKernels, T: BackendTask>(
    task: T,
    device: B::Device,
    precision: Precision,
    name: &str,
) -> anyhow::Result<T::Output> {
    if precision != Precision::F32 {
        burn::tensor::set_default_dtypes::<B>(&device, precision.dtype(), DType::I32)
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .with_context(|| format!("the {name} backend cannot use {precision:?}"))?;
    }
    task.run::<B>(device)
}

#[cfg_attr(
    not(any(feature = "cpu", feature = "wgpu", feature = "cuda")),
    allow(unused_variables)
)]
pub fn dispatch<T: BackendTask>(
    backend: BackendKind,
    precision: Precision,
    task: T,
) -> anyhow::Result<T::Output> {
    match backend {
        #[cfg(feature = "cpu")]
        BackendKind::Cpu => run_on::<burn::backend::Flex, T>(task, Default::default(), precision, "cpu"),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => run_on::<burn::backend::Wgpu, T>(task, Default::default(), precision, "wgpu"),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => run_on::<
            burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>,
            T,
        >(task, Default::default(), precision, "cuda"),
        #[cfg(feature = "cuda")]
        BackendKind::CudaFused => {
            if precision != Precision::F32 {
                bail!(
                    "--backend cuda-fused computes wrong results in {precision:?} (a defect of \
                     Burn's fusion layer in half precision); use --backend cuda, or --dtype f32"
                );
            }
            run_on::<burn::backend::Cuda, T>(task, Default::default(), precision, "cuda-fused")
        }
        #[allow(unreachable_patterns)]
        other => bail!("this build of dejavu has no {other:?} backend; rebuild with its cargo feature (cpu, wgpu or cuda)"),
    }
}

/// A zero-shot task on the command line (`--task copa,piqa,...`), by [`Task::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskArg(pub Task);

impl TaskArg {
    const ALL: [TaskArg; 7] = [
        TaskArg(Task::ALL[0]),
        TaskArg(Task::ALL[1]),
        TaskArg(Task::ALL[2]),
        TaskArg(Task::ALL[3]),
        TaskArg(Task::ALL[4]),
        TaskArg(Task::ALL[5]),
        TaskArg(Task::ALL[6]),
    ];
}

impl clap::ValueEnum for TaskArg {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.0.name()))
    }
}

/// The tasks named, or every task when none is.
pub fn tasks_or_all(tasks: &[TaskArg]) -> Vec<Task> {
    if tasks.is_empty() {
        Task::ALL.to_vec()
    } else {
        tasks.iter().map(|t| t.0).collect()
    }
}
