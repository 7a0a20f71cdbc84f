//! `config.json` parsing on arbitrary text: an error naming the field, never a panic; a config
//! that parses must give its parameter count, weight bytes and MoE config without overflow.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = ditmoe::DitConfig::from_json_str(text, "fuzz") {
        let _ = cfg.param_counts();
        let _ = cfg.weight_bytes(candle_core::DType::F32);
        let _ = cfg.moe_config().validate();
    }
    let _ = serde_json::from_str::<ditmoe::moe::MoeConfig>(text).map(|c| c.validate());
});
