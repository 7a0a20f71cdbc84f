//! Shared helpers for the tests: fixture loading, error measures, scratch folders.

pub mod lm;
pub mod train;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// All tensors of a fixture safetensors file, on the CPU.
pub fn load_fixture(rel: &str) -> HashMap<String, Tensor> {
    let path = fixture_path(rel);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// max |a - b| / max |b| (max-norm relative error), computed in f64; NaN gives infinity.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let (a, b) = (f64s(a), f64s(b));
    let diff = abs_diffs(&a, &b).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-30);
    diff / scale
}

/// ||a - b||_2 / ||b||_2, computed in f64.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let (a, b) = (f64s(a), f64s(b));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// max |a - b| (any dtype, any device), computed in f64; NaN gives infinity.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    abs_diffs(&f64s(a), &f64s(b)).fold(0.0, f64::max)
}

/// |x - y| elementwise, a NaN on either side counting as an infinite difference (`f64::max`
/// would otherwise skip it, and a NaN output would pass).
fn abs_diffs<'a>(a: &'a [f64], b: &'a [f64]) -> impl Iterator<Item = f64> + 'a {
    a.iter().zip(b).map(|(x, y)| if x.is_nan() || y.is_nan() { f64::INFINITY } else { (x - y).abs() })
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Asserts `rel_err(a, b) <= tol` and returns the error, naming the tensor on failure.
pub fn assert_close(name: &str, a: &Tensor, b: &Tensor, tol: f64) -> f64 {
    let e = rel_err(a, b);
    assert!(e <= tol, "{name}: relative error {e:.3e} > {tol:.0e}");
    e
}

/// A scratch folder of its own for each call, emptied first and removed when the test ends
/// (kept when it fails, for a look at what it wrote). The tag names it for that look; the
/// process id and a per-process count keep it apart from every other test's, since all the
/// suite's modules share one process and may reuse a tag.
pub fn scratch_dir(tag: &str) -> Scratch {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ditmoe-test-{}-{call}-{tag}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// See [`scratch_dir`]; derefs to the folder's path.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }
}
