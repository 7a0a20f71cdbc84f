//! `ditmoe forward` on every fixture folder reproduces the official outputs it stores.
use crate::common;

use candle_core::{DType, Device};
use common::{assert_close, fixture_path, load_fixture, scratch_dir};
use std::process::Command;

fn ditmoe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ditmoe")).args(args).output().unwrap()
}

#[test]
fn forward_reproduces_every_fixture() {
    let dir = scratch_dir("forward-cli");
    for case in ["pixel", "tiny", "tiny-flash", "tiny-noshared"] {
        let model = fixture_path(&format!("models/{case}"));
        let inputs = model.join("io.safetensors");
        let io = load_fixture(&format!("models/{case}/io.safetensors"));
        let scale = io["cfg_scale"].to_vec1::<f32>().unwrap()[0].to_string();
        let output = dir.join(format!("{case}.safetensors"));
        let o = ditmoe(&["forward", "--model", model.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--output", output.to_str().unwrap(), "--cfg-scale", &scale]);
        assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
        let got = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
        for name in ["out", "out_cfg", "aux_loss"] {
            assert_close(&format!("{case} {name}"), &got[name], &io[name], 1e-4);
        }
        let depth = got.keys().filter(|k| k.ends_with(".experts")).count();
        assert_eq!(depth, 2);
        for l in 0..depth {
            let e = format!("routing.{l}.experts");
            assert_eq!(got[&e].dtype(), DType::I64);
            assert_eq!(got[&e].to_vec2::<i64>().unwrap(), io[&e].to_vec2::<i64>().unwrap(), "{case} {e}");
            let w = format!("routing.{l}.weights");
            assert_close(&format!("{case} {w}"), &got[&w], &io[&w], 1e-4);
        }
    }
}

#[test]
fn forward_bad_input_is_a_one_line_error() {
    let dir = scratch_dir("forward-bad");
    let tiny = fixture_path("models/tiny");
    let inputs = tiny.join("io.safetensors");
    let out = dir.join("o.safetensors");

    // Unknown config key: named, exit code 2.
    let bad_model = dir.join("bad-model");
    std::fs::create_dir_all(&bad_model).unwrap();
    std::fs::copy(tiny.join("model.safetensors"), bad_model.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(tiny.join("config.json")).unwrap().replacen('{', "{\n  \"hiden_size\": 3,", 1);
    std::fs::write(bad_model.join("config.json"), cfg).unwrap();
    let o = ditmoe(&["forward", "--model", bad_model.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("hiden_size") && err.contains("config.json") && err.lines().count() == 1, "{err}");

    // Inputs of the wrong model (pixel inputs into tiny): shape named.
    let pixel_inputs = fixture_path("models/pixel/io.safetensors");
    let o = ditmoe(&["forward", "--model", tiny.to_str().unwrap(), "--inputs", pixel_inputs.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("(N, 4, 8, 8)"), "{err}");
    assert!(!out.exists(), "nothing written on failure");
}
