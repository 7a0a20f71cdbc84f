//! Subcommands of the `ditmoe` binary; each file owns one.
pub mod convert;
pub mod data;
pub mod encode;
pub mod eval;
pub mod forward;
pub mod generate;
pub mod launch;
pub mod lm;
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

/// `msg` up to the backtrace candle's `Error::bt` appends (its first frame is a line `   0: ...`).
fn without_backtrace(msg: &str) -> String {
    let lines: Vec<&str> = msg.lines().take_while(|l| !l.trim_start().starts_with("0: ")).collect();
    lines.join("\n")
}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// The guidance interval a sampling command runs with: `--guidance-interval LO,HI` (`flag`), else
/// the model's own (`default`, read only when the flag is absent). `[0, 1]` holds every level,
/// the same run as no interval, and comes back as None, so outputs name no interval for it.
pub fn guidance_interval(
    flag: Option<&str>,
    default: impl FnOnce() -> anyhow::Result<Option<ditmoe::sampling::GuidanceInterval>>,
) -> anyhow::Result<Option<ditmoe::sampling::GuidanceInterval>> {
    let interval = match flag {
        Some(s) => Some(s.parse::<ditmoe::sampling::GuidanceInterval>().map_err(|e| usage(format!("--guidance-interval: {e}")))?),
        None => default()?,
    };
    Ok(interval.filter(|i| !i.is_everywhere()))
}

/// Prints the error chain on one line; exit code 2 for usage errors and bad files, 1 otherwise.
/// A backtrace that candle attaches to its errors under `RUST_BACKTRACE` is left out: the
/// message names the fault, the frames are for debugging the program, not the input.
pub fn exit_with(e: anyhow::Error) -> ! {
    let msg = e.chain().map(|c| without_backtrace(&c.to_string())).collect::<Vec<_>>().join(": ");
    eprintln!("error: {msg}");
    let code = if e.downcast_ref::<UsageError>().is_some() || e.downcast_ref::<candle_core::Error>().is_some() { 2 } else { 1 };
    std::process::exit(code)
}

/// `--device cpu|cuda`.
pub fn device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            let gpu = ditmoe::dist::local_gpu();
            ditmoe::runtime::graph::cuda_device(gpu).map_err(|e| usage(format!("--device cuda (GPU {gpu}): {e}")))
        }
        other => Err(usage(format!("--device: unknown device `{other}` (cpu or cuda)"))),
    }
}

/// The execution plan of an inference command: `--device` and `--dtype` (f32, bf16, f16),
/// its matmul precision applied.
pub fn inference_plan(device: &str, dtype: &str) -> anyhow::Result<ditmoe::ExecutionPlan> {
    let plan = ditmoe::ExecutionPlan::inference(&self::device(device)?, ditmoe::Precision::of_dtype(self::dtype(dtype)?));
    plan.apply_matmul_precision();
    Ok(plan)
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

/// `--class`: ids, names (case-insensitive, with class_names.json) or `all`; no repeats.
pub fn parse_classes(spec: &str, num_classes: usize, names: Option<&[String]>) -> anyhow::Result<Vec<usize>> {
    if spec.trim().eq_ignore_ascii_case("all") {
        return Ok((0..num_classes).collect());
    }
    let mut classes = Vec::new();
    for item in spec.split(',').map(str::trim) {
        let id = if item.is_empty() {
            return Err(usage(format!("--class: empty entry in `{spec}`")));
        } else if let Ok(id) = item.parse::<i64>() {
            if id < 0 || id as usize >= num_classes {
                return Err(usage(format!(
                    "--class: class {id} is out of range (the model has {num_classes} classes, 0..{})",
                    num_classes - 1
                )));
            }
            id as usize
        } else {
            let Some(names) = names else {
                return Err(usage(format!(
                    "--class: `{item}` is not a class id, and the model has no class_names.json to look names up in"
                )));
            };
            let Some(id) = names.iter().position(|n| n.eq_ignore_ascii_case(item)) else {
                let known = if names.len() <= 20 { format!(" (known: {})", names.join(", ")) } else { String::new() };
                return Err(usage(format!("--class: unknown class name `{item}`{known}")));
            };
            id
        };
        if classes.contains(&id) {
            return Err(usage(format!("--class: class {id} is listed twice")));
        }
        classes.push(id);
    }
    Ok(classes)
}
