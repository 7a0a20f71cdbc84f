//! `ParamRecorder`: a VarBuilder backend over another VarBuilder that hands every request
//! through and keeps the name and tensor it got, so a model knows its own parameters by their
//! checkpoint names (for [`super::LmModel::save_hf`], the optimizer's variables and the
//! loader's check for unused checkpoint tensors) without each module listing them.
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::sync::{Arc, Mutex};

/// Named parameters in the order the model asked for them.
pub type NamedParams = Vec<(String, Tensor)>;

pub struct ParamRecorder<'a> {
    inner: VarBuilder<'a>,
    seen: Arc<Mutex<NamedParams>>,
}

impl<'a> ParamRecorder<'a> {
    /// A VarBuilder rooted where `vb` is, and the list it fills as modules are built.
    pub fn wrap(vb: VarBuilder<'a>) -> (VarBuilder<'a>, Arc<Mutex<NamedParams>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let rec = ParamRecorder { inner: vb, seen: seen.clone() };
        (VarBuilder::from_backend(Box::new(rec), dtype, device), seen)
    }

    fn keep(&self, name: &str, t: &Tensor) {
        if let Ok(mut seen) = self.seen.lock() {
            if !seen.iter().any(|(n, _)| n == name) {
                seen.push((name.to_string(), t.clone()));
            }
        }
    }
}

impl SimpleBackend for ParamRecorder<'_> {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        self.keep(name, &t);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let t = self.inner.get_unchecked_dtype(name, dtype)?;
        self.keep(name, &t);
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}
