//! The model on the GPU code path that a machine without a GPU can run: Burn's wgpu
//! backend (what `--backend wgpu` uses) on Mesa's lavapipe, a software Vulkan device (CI
//! installs it). One prompt of the pre-LN fixture, f32: every position's logits within
//! 1e-3 of Hugging Face's (lavapipe's f32 arithmetic, other summation orders) and the
//! same argmax. Set `DEJAVU_SKIP_WGPU_TESTS=1` on a machine that cannot have Vulkan.

mod common;

use burn::tensor::DType;
use common::{fixtures, max_abs_diff, Golden};
use dejavu_model::generate::token_tensor;
use dejavu_model::{load_model, Dense};

type W = burn::backend::Wgpu;

#[test]
fn wgpu_forward_matches_hugging_face() {
    if std::env::var_os("DEJAVU_SKIP_WGPU_TESTS").is_some() {
        eprintln!("skipped: DEJAVU_SKIP_WGPU_TESTS is set");
        return;
    }
    let name = "opt-tiny-preln";
    let device = Default::default();
    let (config, model) = load_model::<W>(&fixtures().join(name), DType::F32, &device).unwrap();
    let golden = Golden::of(name);
    let ids = golden.ids("short.input_ids");
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    let hidden = model.forward_with(token_tensor::<W>(&ids, &device), &mut cache, &mut Dense).unwrap();
    let logits: Vec<f32> = model.logits(hidden).into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let (_, want) = golden.f32("short.logits");
    let err = max_abs_diff(&logits, &want);
    assert!(err < 1e-3, "wgpu logits: max abs err {err}");
    let argmax = |v: &[f32]| -> Vec<usize> {
        v.chunks_exact(config.vocab_size)
            .map(|row| (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }))
            .collect()
    };
    assert_eq!(argmax(&logits), argmax(&want), "greedy tokens differ");
}

/// Dense decode through the CubeCL kernels (`KernelDecode` on `CubeBackend`, which runs
/// them; the fused `Wgpu` backend would run the tensor-op reference): every position of the
/// short prompt as a one-token step, within 1e-3 of Hugging Face's logits, same argmax.
#[test]
fn wgpu_kernel_decode_matches_hugging_face() {
    if std::env::var_os("DEJAVU_SKIP_WGPU_TESTS").is_some() {
        eprintln!("skipped: DEJAVU_SKIP_WGPU_TESTS is set");
        return;
    }
    type C = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
    let name = "opt-tiny-preln";
    let device = Default::default();
    let (config, mut model) = load_model::<C>(&fixtures().join(name), DType::F32, &device).unwrap();
    dejavu_model::use_row_major_weights(&mut model);
    let weights = dejavu_model::DecodeWeights::new(&model);
    let golden = Golden::of(name);
    let ids = golden.ids("short.input_ids");
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    let mut logits = Vec::new();
    for t in 0..ids.len() {
        let mut hooks = dejavu_model::KernelDecode::new(&weights);
        let hidden = model.forward_with(token_tensor::<C>(&ids[t..t + 1], &device), &mut cache, &mut hooks).unwrap();
        logits.extend(model.logits(hidden).into_data().convert::<f32>().into_vec::<f32>().unwrap());
    }
    let (_, want) = golden.f32("short.logits");
    let err = max_abs_diff(&logits, &want);
    assert!(err < 1e-3, "wgpu kernel decode logits: max abs err {err}");
    let argmax = |v: &[f32]| -> Vec<usize> {
        v.chunks_exact(config.vocab_size)
            .map(|row| (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }))
            .collect()
    };
    assert_eq!(argmax(&logits), argmax(&want), "greedy tokens differ");
}
