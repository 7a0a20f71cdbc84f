//! `Decoder`: autoregressive decoding of a batch of sequences with a [`StaticKvCache`]: the
//! prompt runs as one ordinary forward (prefill), then every new token is one
//! [`LmModel::decode_step`] at a device-held position. On a GPU the step is captured once as a
//! CUDA graph and replayed for every later token (`runtime::graph::GraphedForward`: the first
//! step runs eagerly, the second captures): a decoding step is a few hundred small kernels, and
//! launching them one by one from the host costs more than running them. On the CPU the same
//! step runs eagerly.
use super::{KvCache, LmModel, StaticKvCache};
use crate::runtime::graph::GraphedForward;
use candle_core::{bail, DType, IndexOp, Result, Tensor};
use std::sync::Arc;

type Step<'a> = Box<dyn FnMut(&[&Tensor]) -> Result<Tensor> + 'a>;

pub struct Decoder<'a> {
    model: &'a LmModel,
    cache: Arc<StaticKvCache>,
    step: GraphedForward<Step<'a>>,
    /// Positions filled.
    len: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder for `batch` sequences of up to `capacity` positions (prompt included).
    pub fn new(model: &'a LmModel, batch: usize, capacity: usize) -> Result<Self> {
        let cache = Arc::new(StaticKvCache::new(model.config(), batch, capacity, model.device())?);
        let step_cache = cache.clone();
        let step: Step<'a> = Box::new(move |inputs: &[&Tensor]| model.decode_step(inputs[0], inputs[1], &step_cache));
        // Expert parallelism's all-to-all takes its splits from counts gathered to the host
        // (the dropless dispatch, Megatron-Core's), which a CUDA graph cannot capture: a model
        // whose experts are split over ranks decodes eagerly.
        let step = match model.split_experts().is_empty() {
            true => GraphedForward::new(step),
            false => GraphedForward::eager(step, "the experts are split over ranks: the all-to-all's splits are counted on the host"),
        };
        Ok(Self { model, cache, step, len: 0 })
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Steps served by a CUDA-graph replay.
    pub fn replays(&self) -> usize {
        self.step.replays()
    }

    /// Runs the prompt `[B, T]` u32 and returns the logits of its last position `[B, V]` f32.
    pub fn prefill(&mut self, prompt: &Tensor) -> Result<Tensor> {
        let (_, t) = prompt.dims2()?;
        if t == 0 || t > self.capacity() {
            bail!("decoder: a prompt of {t} tokens does not fit the capacity of {} positions", self.capacity())
        }
        let mut dynamic = KvCache::new(self.model.config().num_layers, t);
        let out = self.model.forward(prompt, Some(&mut dynamic), false)?;
        self.cache.fill(&dynamic)?;
        self.len = t;
        out.logits.i((.., t - 1))
    }

    /// Feeds the next tokens `[B, 1]` u32 and returns their logits `[B, V]` f32.
    pub fn step(&mut self, ids: &Tensor) -> Result<Tensor> {
        if self.len >= self.capacity() {
            bail!("decoder: the context is full ({} positions)", self.capacity())
        }
        let pos = Tensor::new(&[self.len as u32], self.model.device())?;
        let logits = self.step.call(&[&ids.to_dtype(DType::U32)?, &pos])?;
        self.len += 1;
        Ok(logits)
    }
}
