//! The checkpoint loader on arbitrary bytes, as a `.safetensors` or a `.pt` file (the first byte
//! picks): it must return an error, never panic, hang or abort on an allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else { return };
    let ext = if pick % 2 == 0 { "safetensors" } else { "pt" };
    let path = std::env::temp_dir().join(format!("ditmoe-fuzz-checkpoint-{}.{ext}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    if let Ok(sd) = ditmoe::checkpoint::load_state_dict(&path) {
        // what a load goes on to do: validate against a small model
        let cfg = ditmoe::presets::get("DiT-MoE-S/8-16E2A").unwrap().config;
        let _ = sd.validate(&cfg);
    }
});
