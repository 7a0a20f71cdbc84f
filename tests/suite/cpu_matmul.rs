//! The vendored fix of candle's CPU batched matmul (vendor/README.md): a batch-invariant rhs
//! with a transposed lhs view gives, batch by batch, the product of that batch alone.
use candle_core::{Device, Tensor};

#[test]
fn cpu_batched_matmul_with_a_transposed_lhs() {
    let (b, m, k, n) = (3, 5, 4, 6);
    // lhs (b, m, k) as the transpose of a contiguous (b, k, m): rows 1 apart, columns m apart
    let stored = Tensor::arange(0f32, (b * k * m) as f32, &Device::Cpu).unwrap().reshape((b, k, m)).unwrap();
    let lhs = stored.transpose(1, 2).unwrap();
    // one rhs for every batch (a Linear's weight, broadcast)
    let w = (Tensor::arange(0f32, (k * n) as f32, &Device::Cpu).unwrap().reshape((k, n)).unwrap() * 0.1).unwrap();
    let product = lhs.broadcast_matmul(&w).unwrap();
    for i in 0..b {
        let alone = lhs.get(i).unwrap().contiguous().unwrap().matmul(&w).unwrap();
        let got = product.get(i).unwrap();
        let diff = (got - &alone).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "batch {i}");
    }
}
