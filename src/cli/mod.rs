//! Subcommands of the `ditmoe` binary; each file owns one.
pub mod convert;
pub mod data;
pub mod encode;
pub mod eval;
pub mod forward;
pub mod generate;
pub mod presets;
pub mod routes;
pub mod train;

use candle_core::Device;

/// Bad input (a flag, a file) is a usage error: one line naming what is wrong, exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// Prints the error chain on one line; exit code 2 for usage errors and bad files, 1 otherwise.
pub fn exit_with(e: anyhow::Error) -> ! {
    let msg = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ");
    eprintln!("error: {msg}");
    let code = if e.downcast_ref::<UsageError>().is_some() || e.downcast_ref::<candle_core::Error>().is_some() { 2 } else { 1 };
    std::process::exit(code)
}

/// `--device cpu|cuda`.
pub fn device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| usage(format!("--device cuda: {e}"))),
        other => Err(usage(format!("--device: unknown device `{other}` (cpu or cuda)"))),
    }
}

/// `--dtype f32|bf16|f16`.
pub fn dtype(name: &str) -> anyhow::Result<candle_core::DType> {
    use candle_core::DType;
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(usage(format!("--dtype: unknown dtype `{other}` (f32, bf16 or f16)"))),
    }
}
