//! The decoder's static KV cache (one captured step per token on a GPU) decodes what the
//! dynamic cache decodes, and transformers' greedy continuation, for a batch of two prompts of
//! each HF fixture family, on the reference dispatch and on the MoE kernel pipeline.
use crate::common;

use candle_core::{DType, Device, IndexOp, Tensor, D};
use common::{fixture_path, load_fixture};
use ditmoe::lm::{load_hf, Decoder};
use ditmoe::{ExecutionPlan, Precision};

const NEW_TOKENS: usize = 8;

#[test]
fn static_cache_decoding_matches_transformers_and_the_dynamic_cache() {
    for case in ["hf-mixtral", "hf-qwen2-moe", "hf-olmoe"] {
        let io = load_fixture(&format!("lm/{case}/io.safetensors"));
        let prompts = io["input_ids"].to_dtype(DType::U32).unwrap();
        let want: Vec<i64> = io["generated"].to_dtype(DType::I64).unwrap().i(0).unwrap().to_vec1().unwrap();
        for kernels in [false, true] {
            let plan = ExecutionPlan::inference(&Device::Cpu, Precision::F32).with_moe_kernels(kernels);
            let model = load_hf(&fixture_path(&format!("lm/{case}")), &plan).unwrap();
            let (b, t) = prompts.dims2().unwrap();
            let mut decoder = Decoder::new(&model, b, t + NEW_TOKENS).unwrap();
            let mut logits = decoder.prefill(&prompts).unwrap();
            let mut rows: Vec<Vec<u32>> = (0..b).map(|r| prompts.i(r).unwrap().to_vec1().unwrap()).collect();
            for step in 0..NEW_TOKENS {
                let next: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
                rows.iter_mut().zip(&next).for_each(|(r, &n)| r.push(n));
                if step + 1 < NEW_TOKENS {
                    logits = decoder.step(&Tensor::new(next.as_slice(), &Device::Cpu).unwrap().unsqueeze(1).unwrap()).unwrap();
                }
            }
            let tag = format!("{case} (kernels: {kernels})");
            assert_eq!(rows[0].iter().map(|&x| x as i64).collect::<Vec<_>>(), want, "{tag}: transformers' greedy continuation");
            assert_eq!(rows[1], model.generate_greedy(&rows[1][..t], NEW_TOKENS).unwrap(), "{tag}: the dynamic cache's continuation of row 1");
            assert_eq!(decoder.len(), t + NEW_TOKENS - 1);
        }
    }
}

#[test]
fn the_decoder_refuses_a_full_context() {
    let model = load_hf(&fixture_path("lm/hf-mixtral"), &ExecutionPlan::inference(&Device::Cpu, Precision::F32)).unwrap();
    let mut decoder = Decoder::new(&model, 1, 3).unwrap();
    let err = decoder.prefill(&Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(err.contains("capacity"), "{err}");
    decoder.prefill(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap()).unwrap();
    let err = decoder.step(&Tensor::new(&[[5u32]], &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(err.contains("full"), "{err}");
}
