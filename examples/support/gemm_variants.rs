//! Every grouped-GEMM kernel variant of a dtype, named, for the kernel tests (each variant
//! checked against the CPU reference) and the benchmarks that compare them. The library's
//! default selection (`GemmConfig::default`) is one of these.
use candle_core::DType;
use ditmoe::moe::kernels::{F32Kernel, GemmBackend, GemmConfig};

/// bf16: the wgmma variants only when `wgmma` (sm_90).
pub fn gemm_variants(dtype: DType, wgmma: bool) -> Vec<(&'static str, GemmConfig)> {
    let c = |backend, block_n, stages, persistent: bool| GemmConfig {
        backend,
        block_n,
        stages,
        persistent: Some(persistent),
        multicast: Some(false),
        tma_a: None,
        split_n: Some(false),
        f32_kernel: F32Kernel::Auto,
    };
    if dtype == DType::F32 {
        let f = |k| GemmConfig { f32_kernel: k, ..Default::default() };
        return vec![
            ("f32 3xTF32", f(F32Kernel::Tf32x3)),
            ("f32 TF32", f(F32Kernel::Tf32)),
            ("f32 128x128", f(F32Kernel::Simt128)),
            ("f32 64x64", f(F32Kernel::Simt64)),
        ];
    }
    let mut v = Vec::new();
    if wgmma {
        let multicast = |block_n, split_n| GemmConfig { multicast: Some(true), split_n: Some(split_n), ..c(GemmBackend::Wgmma, block_n, 0, true) };
        v.push(("wgmma n256 multicast", multicast(256, false)));
        v.push(("wgmma n192 multicast (gate/up n256)", multicast(192, false)));
        v.push(("wgmma n192 multicast, A shared, N split (gate/up n256)", multicast(192, true)));
        v.push(("wgmma n256 persistent", c(GemmBackend::Wgmma, 256, 0, true)));
        v.push(("wgmma n128 persistent", c(GemmBackend::Wgmma, 128, 0, true)));
        v.push(("wgmma n128 3-stage persistent", c(GemmBackend::Wgmma, 128, 3, true)));
        v.push(("wgmma n256", c(GemmBackend::Wgmma, 256, 0, false)));
        v.push(("wgmma n128", c(GemmBackend::Wgmma, 128, 0, false)));
        v.push(("wgmma n128 3-stage", c(GemmBackend::Wgmma, 128, 3, false)));
    }
    v.push(("mma.sync n256 persistent", c(GemmBackend::MmaSync, 256, 0, true)));
    v.push(("mma.sync n256", c(GemmBackend::MmaSync, 256, 0, false)));
    v.push(("mma.sync n128", c(GemmBackend::MmaSync, 128, 0, false)));
    v
}
