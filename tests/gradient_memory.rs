//! What a backward leaves alive: the gradients, and nothing of the forward. A variable's
//! gradient is built from the forward's tensors; unless it is detached (the vendored
//! candle-core's backward, `vendor/README.md`) it keeps the whole forward graph alive through
//! the op that made it, for as long as the gradient lives (the optimizer step). Under
//! activation recomputation that kept every block's recomputed activations and expert weight
//! stacks, so `--recompute` saved nothing and DiT-MoE-XL/2 ran out of memory at any batch.
//!
//! The bytes are counted by this binary's global allocator, so the file holds one test: tests
//! run on parallel threads and would count each other's tensors.
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ditmoe::model::{ForwardMode, Trace};
use ditmoe::{DitConfig, DitMoe, ExecutionPlan, Precision};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The system allocator, counting the bytes allocated and not yet freed.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Relaxed);
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn config() -> DitConfig {
    serde_json::from_value(serde_json::json!({
        "input_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 4,
        "num_heads": 4, "mlp_ratio": 2, "class_dropout_prob": 0.1, "num_classes": 10,
        "num_experts": 8, "num_experts_per_tok": 2, "pretraining_tp": 1, "learn_sigma": true,
        "use_flash_attn": false, "n_shared_experts": 1, "aux_loss_alpha": 0.01, "seq_aux": false,
        "norm_topk_prob": false
    }))
    .expect("config")
}

/// The bytes the store's gradients take (its entries' own elements).
fn store_bytes(store: &GradStore) -> usize {
    store.get_ids().filter_map(|id| store.get_id(*id)).map(|g| g.elem_count() * g.dtype().size_in_bytes()).sum()
}

#[test]
fn a_backward_leaves_the_gradients_alone_alive() {
    let cfg = config();
    let dev = Device::Cpu;
    let (n, s) = (4, cfg.input_size);
    let x = Tensor::randn(0f32, 1.0, (n, cfg.in_channels, s, s), &dev).unwrap();
    let t = Tensor::new(&[10f32, 300.0, 600.0, 990.0], &dev).unwrap();
    let y = Tensor::new(&[0u32, 3, 7, cfg.null_class() as u32], &dev).unwrap();
    // Both MoE paths: the reference dispatch and the kernel pipeline the GPU trains on (its
    // routed experts stack the expert weights into the graph each call).
    for kernels in [false, true] {
        let plan = ExecutionPlan::training(&dev, Precision::F32).with_moe_kernels(kernels);
        let varmap = VarMap::new();
        let model = DitMoe::new(&cfg, &plan, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        for recompute in [false, true] {
            let case = format!("moe kernels {kernels}, recompute {recompute}");
            let backward = || -> GradStore {
                if recompute {
                    let (out, tape) = model.forward_recomputed(&x, &t, &y).unwrap();
                    let mut store = out.out.sqr().unwrap().mean_all().unwrap().backward().unwrap();
                    tape.backward(&model, &mut store, 1.0).unwrap();
                    store
                } else {
                    let out = model.forward_full(&x, &t, &y, ForwardMode::Train, &mut Trace::default()).unwrap();
                    out.out.sqr().unwrap().mean_all().unwrap().backward().unwrap()
                }
            };
            // a first pass fills what the model keeps between calls (lazily built tables)
            drop(backward());
            let before = LIVE.load(Relaxed);
            let store = backward();
            // the forward's outputs and the loss are gone: only the store remains
            let held = LIVE.load(Relaxed) - before;
            let grads = store_bytes(&store);
            let params: usize = varmap.all_vars().iter().map(|v| v.elem_count() * 4).sum();
            assert!(grads >= params / 2, "{case}: the store holds {grads} bytes of gradients for {params} bytes of parameters");
            // The slack covers the store's map and the tensors' headers, not a block's
            // activations or expert stacks (hundreds of KiB each here).
            assert!(held <= grads + (64 << 10), "{case}: {held} bytes stay alive after the backward for {grads} bytes of gradients");
            drop(store);
        }
    }
}
