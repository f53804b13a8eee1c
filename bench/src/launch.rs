//! `dejavu-bench launch`: what one CubeCL launch costs the host, by what the launch
//! carries. A batch-1 decode step is a chain of small launches, so this cost, not the
//! bytes read, sets its time.
//!
//! Each variant is 2,000 back-to-back launches of a kernel that does almost nothing (one
//! thread writes one value), median over rounds after a warm-up round:
//! - `enqueue_us`: host time per launch of the loop alone (the calls return before the
//!   device thread has launched them);
//! - `total_us`: the same loop synced at its end, per launch: what a chain of launches
//!   costs when nothing else limits it.
//!
//! The variants separate what CubeCL does per launch: tensor arguments carry shapes and
//! strides as dynamic metadata, which CubeCL's CUDA runtime uploads through a staging
//! buffer and a host-to-device copy each launch; array arguments carry only lengths,
//! passed as kernel parameters. Allocating the output is one more message to the device
//! thread.

use std::time::Instant;

use anyhow::bail;
use burn::tensor::{DType, Shape};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use serde::Serialize;

use crate::kernels::CubeKind;
use crate::report::{commit, device_name, median, write_benchmark};

#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    #[arg(long, value_enum, default_value = "cuda")]
    backend: CubeKind,
    /// Launches per timed round
    #[arg(long, default_value_t = 2000)]
    launches: usize,
    /// Timed rounds per variant (after one warm-up round)
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// JSON output (default bench/results/launch-<device>-<commit>.json)
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[cube(launch_unchecked)]
fn probe_tensor_kernel(a: &Tensor<f32>, b: &Tensor<f32>, c: &Tensor<f32>, d: &Tensor<f32>, out: &mut Tensor<f32>) {
    if UNIT_POS == 0 {
        out[0] = a[0] + b[0] + c[0] + d[0] + f32::cast_from(out.shape(0));
    }
}

#[cube(launch_unchecked)]
fn probe_array_kernel(a: &Array<f32>, b: &Array<f32>, c: &Array<f32>, d: &Array<f32>, out: &mut Array<f32>, n: u32) {
    if UNIT_POS == 0 {
        out[0] = a[0] + b[0] + c[0] + d[0] + f32::cast_from(n) + f32::cast_from(out.len());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    TensorArgs,
    ArrayArgs,
    TensorArgsAlloc,
    ArrayArgsAlloc,
    AllocOnly,
}

impl Variant {
    const ALL: [Variant; 5] = [Self::TensorArgs, Self::ArrayArgs, Self::TensorArgsAlloc, Self::ArrayArgsAlloc, Self::AllocOnly];

    fn name(self) -> &'static str {
        match self {
            Self::TensorArgs => "5 tensor args",
            Self::ArrayArgs => "5 array args + 1 scalar",
            Self::TensorArgsAlloc => "5 tensor args, output allocated",
            Self::ArrayArgsAlloc => "5 array args, output allocated",
            Self::AllocOnly => "allocation only (no launch)",
        }
    }
}

#[derive(Debug, Serialize)]
struct Row {
    variant: &'static str,
    enqueue_us: f64,
    total_us: f64,
}

fn alloc<R: CubeRuntime>(like: &CubeTensor<R>, n: usize) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), Shape::from(vec![n]), DType::F32)
}

fn launch_once<R: CubeRuntime>(variant: Variant, inputs: &[CubeTensor<R>; 4], out: &CubeTensor<R>) {
    let client = &out.client;
    let (count, dim) = (CubeCount::Static(1, 1, 1), CubeDim::new_1d(32));
    let out = match variant {
        Variant::TensorArgsAlloc | Variant::ArrayArgsAlloc | Variant::AllocOnly => alloc(out, 64),
        _ => out.clone(),
    };
    let [a, b, c, d] = inputs.clone();
    // SAFETY: one thread reads element 0 of 64-element inputs and writes element 0 of a
    // 64-element output.
    unsafe {
        match variant {
            Variant::TensorArgs | Variant::TensorArgsAlloc => probe_tensor_kernel::launch_unchecked::<R>(
                client,
                count,
                dim,
                a.into_tensor_arg(),
                b.into_tensor_arg(),
                c.into_tensor_arg(),
                d.into_tensor_arg(),
                out.into_tensor_arg(),
            ),
            Variant::ArrayArgs | Variant::ArrayArgsAlloc => probe_array_kernel::launch_unchecked::<R>(
                client,
                count,
                dim,
                a.into_array_arg(),
                b.into_array_arg(),
                c.into_array_arg(),
                d.into_array_arg(),
                out.into_array_arg(),
                64,
            ),
            Variant::AllocOnly => {}
        }
    }
}

fn sync<R: CubeRuntime>(t: &CubeTensor<R>) -> anyhow::Result<()> {
    cubecl::future::block_on(t.client.sync()).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))
}

fn measure<R: CubeRuntime>(args: &LaunchArgs, variant: Variant, inputs: &[CubeTensor<R>; 4], out: &CubeTensor<R>) -> anyhow::Result<Row> {
    let (mut enqueue, mut total) = (Vec::new(), Vec::new());
    for round in 0..=args.rounds {
        sync(out)?;
        let t = Instant::now();
        for _ in 0..args.launches {
            launch_once(variant, inputs, out);
        }
        let host = t.elapsed().as_secs_f64();
        sync(out)?;
        let all = t.elapsed().as_secs_f64();
        if round > 0 {
            enqueue.push(host * 1e6 / args.launches as f64);
            total.push(all * 1e6 / args.launches as f64);
        }
    }
    Ok(Row { variant: variant.name(), enqueue_us: median(&mut enqueue), total_us: median(&mut total) })
}

fn run_on<R: CubeRuntime>(args: LaunchArgs, device: R::Device) -> anyhow::Result<()> {
    let client = R::client(&device);
    let make = || {
        let handle = client.create_from_slice(f32::as_bytes(&[1.0f32; 64]));
        CubeTensor::new_contiguous(client.clone(), device.clone(), Shape::from(vec![64]), handle, DType::F32)
    };
    let inputs = [make(), make(), make(), make()];
    let out = make();
    let mut rows = Vec::new();
    for variant in Variant::ALL {
        rows.push(measure(&args, variant, &inputs, &out)?);
    }
    let device_label = device_name(&format!("{:?}", args.backend));
    let commit = commit();
    let path = write_benchmark(
        "launch",
        &device_label,
        &commit,
        serde_json::json!({ "launches_per_round": args.launches, "rounds": args.rounds, "rows": rows }),
        args.out.as_deref(),
        &format!("launch-{}", format!("{:?}", args.backend).to_lowercase()),
    )?;
    println!("\nHost cost per launch, {device_label} ({} launches × {} rounds, medians)", args.launches, args.rounds);
    println!("| variant | enqueue µs | total µs |\n|---|---|---|");
    for r in &rows {
        println!("| {} | {:.2} | {:.2} |", r.variant, r.enqueue_us, r.total_us);
    }
    println!("wrote {}", path.display());
    Ok(())
}

pub fn run(args: LaunchArgs) -> anyhow::Result<()> {
    match args.backend {
        #[cfg(feature = "cuda")]
        CubeKind::Cuda => run_on::<cubecl::cuda::CudaRuntime>(args, Default::default()),
        #[cfg(feature = "wgpu")]
        CubeKind::Wgpu => run_on::<cubecl::wgpu::WgpuRuntime>(args, Default::default()),
        #[allow(unreachable_patterns)]
        other => bail!("this dejavu-bench was built without the {other:?} backend"),
    }
}
