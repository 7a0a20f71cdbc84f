//! `ditmoe lm <command>`: the language-model path: one forward for parity checks, training on a
//! token corpus (plain, or distilled from a teacher), streaming generation, validation with the
//! expert load per layer, the training curves of several runs, a model's parameter counts, and
//! a model folder rewritten in another dtype.
use super::launch::{join, leads, parallel_plan, reported};
use super::usage;
use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::{Args, Subcommand};
use ditmoe::checkpoint::write_safetensors_atomic;
use ditmoe::lm::eval::{evaluate, EvalReport};
use ditmoe::dist::World;
use ditmoe::lm::generation::{generate_with, GenerationStop};
use ditmoe::lm::sampling::{SamplingParams, TokenSampler};
use ditmoe::analysis::curves::{loss_chart, Curve};
use ditmoe::lm::train_config::{DistillConfig, LmTrainConfig};
use ditmoe::lm::trainer::{LmTrainer, TOKENIZER_FILE, VALIDATION_SHARD};
use ditmoe::lm::{load_hf, LmModel};
use ditmoe::text::{TokenShard, Tokenizer};
use ditmoe::train::{RunStart, StopReason};
use ditmoe::ExecutionPlan;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct LmArgs {
    #[command(subcommand)]
    command: LmCommand,
}

#[derive(Subcommand)]
enum LmCommand {
    /// One forward of an HF-layout model folder on `input_ids`: writes `logits`,
    /// `router_logits.<l>` per MoE layer, `aux_loss`, and with --generate the greedy continuation.
    Forward(ForwardArgs),
    /// Train a language model on a token corpus (`ditmoe data sotu`), with exact resume.
    Train(TrainArgs),
    /// Train with a frozen teacher (Mixture-of-Students): the loss adds beta · T² · KL(teacher
    /// || student) up to --stop-step, then continues on the plain loss. Exact resume.
    Distill(DistillArgs),
    /// Generate text after a prompt, streamed as it is sampled.
    Generate(GenerateArgs),
    /// Validation perplexity and the expert load of every MoE layer (table and heatmap).
    Eval(EvalArgs),
    /// Which experts each token of a prompt picks, per MoE layer (table and a tokens x layers map).
    Routes(RoutesArgs),
    /// Validation loss against training tokens of several runs, one line each, as a PNG.
    Curves(CurvesArgs),
    /// A model's parameters: in total and active per token.
    Info(InfoArgs),
    /// Rewrite a model folder's weights in another dtype (HF layout, tokenizer copied).
    Export(ExportArgs),
}

/// Where `lm generate` finds a model without --model: the bundled one, relative to the
/// repository root.
const BUNDLED_MODEL: &str = "assets/sotu-lm";

#[derive(Args)]
struct DistillArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// The teacher's model folder (HF layout, the student's vocabulary); replaces the config's
    /// `distill.teacher`. Needed when the config has no `distill` section.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// The weight of the distillation term (default: the config's, else 1).
    #[arg(long)]
    beta: Option<f64>,
    /// The softmax temperature of both distributions (default: the config's, else 1).
    #[arg(long)]
    temperature: Option<f64>,
    /// The last step that distils; later steps train on the plain loss (default: the config's,
    /// else every step).
    #[arg(long)]
    stop_step: Option<u64>,
}

#[derive(Args)]
struct CurvesArgs {
    /// Run folders (each with its `eval.jsonl`), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    runs: Vec<PathBuf>,
    /// A legend label per run, comma-separated, in the order of --runs (default: the folder names).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// The chart (PNG).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "validation loss against training tokens")]
    title: String,
}

#[derive(Args)]
struct InfoArgs {
    /// A model folder (HF layout) or an `LmConfig` JSON file.
    #[arg(long)]
    model: PathBuf,
}

#[derive(Args)]
struct ExportArgs {
    /// The model folder to read (HF layout, with its tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The folder to write (a new one, unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// The stored dtype: f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Replace the model in an existing --out folder.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct RoutesArgs {
    /// Model folder with its tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Where to draw the map (PNG): a column per token, a row per MoE layer, the colour of each
    /// token's first-choice expert.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Args)]
struct ForwardArgs {
    /// Model folder: config.json + model.safetensors (or a sharded index), HF layout.
    #[arg(long)]
    model: PathBuf,
    /// Safetensors with `input_ids` [B, T] (int64 or uint32).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the outputs (safetensors).
    #[arg(long)]
    output: PathBuf,
    /// Also write `generated`: the first row followed by N greedy tokens (KV cache).
    #[arg(long)]
    generate: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Args)]
struct TrainArgs {
    /// The training config (JSON; see docs/lm.md).
    #[arg(long)]
    config: PathBuf,
    /// The corpus folder, in place of the config's `data`.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The run folder, in place of the config's `out`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stop after this many steps (the learning-rate schedule keeps the config's length).
    #[arg(long)]
    steps: Option<u64>,
    /// Continue the run in the config's `out` from its newest valid checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start a new run in an `out` that holds one, moving the old run aside.
    #[arg(long)]
    overwrite: bool,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
    /// Time each phase of every step and print a table at the end (synchronises the device).
    #[arg(long)]
    profile: bool,
    /// Under `ditmoe launch`: split every MoE layer's experts over groups of N consecutive ranks
    /// (Megatron-Core's layout; N divides the world size). 1 replicates the experts (pure data
    /// parallelism); the world size gives each rank 1/N of them.
    #[arg(long, default_value_t = 1)]
    expert_parallel: usize,
}

#[derive(Args)]
struct GenerateArgs {
    /// Model folder with its tokenizer.json (what `ditmoe lm train` writes to `<out>/model`);
    /// default: the bundled model in assets/sotu-lm.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// New tokens at most.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens holding this probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Under `ditmoe launch`: split every MoE layer's experts over groups of N consecutive ranks,
    /// each rank loading only its slice (default: the world size, for models that do not fit one
    /// device; 1 replicates the model on every rank).
    #[arg(long)]
    expert_parallel: Option<usize>,
}

#[derive(Args)]
struct EvalArgs {
    /// Model folder (HF layout).
    #[arg(long)]
    model: PathBuf,
    /// Corpus folder (`validation.safetensors`).
    #[arg(long)]
    data: PathBuf,
    /// Tokens of context per window.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Windows evaluated at most.
    #[arg(long, default_value_t = 256)]
    max_windows: usize,
    /// Where to draw the expert load (layer x expert) as a heatmap PNG.
    #[arg(long)]
    heatmap: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Under `ditmoe launch`: split every MoE layer's experts over groups of N consecutive ranks,
    /// each rank loading only its slice (default: the world size, for models that do not fit one
    /// device; 1 replicates the model on every rank).
    #[arg(long)]
    expert_parallel: Option<usize>,
}

pub fn run(a: LmArgs) -> anyhow::Result<()> {
    match a.command {
        LmCommand::Forward(a) => forward(a),
        LmCommand::Train(a) => train(a, None),
        LmCommand::Distill(a) => distill(a),
        LmCommand::Generate(a) => generate_text(a),
        LmCommand::Eval(a) => eval(a),
        LmCommand::Routes(a) => routes(a),
        LmCommand::Curves(a) => curves(a),
        LmCommand::Info(a) => info(a),
        LmCommand::Export(a) => export(a),
    }
}

fn load_model(dir: &Path, device: &str, dtype: &str) -> anyhow::Result<LmModel> {
    load_planned(dir, &super::inference_plan(device, dtype)?)
}

fn load_planned(dir: &Path, plan: &ExecutionPlan) -> anyhow::Result<LmModel> {
    load_hf(dir, plan).map_err(|e| usage(format!("--model {}: {e}", dir.display())))
}

/// The job an inference command was launched into, and its plan: the model sharded by experts
/// over groups of `--expert-parallel` ranks (default: every rank), each rank holding only its
/// experts' slice. A plain run takes the plain plan.
fn sharded_plan(device: &str, dtype: &str, expert_parallel: Option<usize>) -> anyhow::Result<(Option<World>, ExecutionPlan)> {
    let plan = super::inference_plan(device, dtype)?;
    let world = join(&plan.device)?;
    let plan = reported(world.as_ref(), parallel_plan(world.as_ref(), plan, expert_parallel))?;
    Ok((world, plan))
}

fn forward(a: ForwardArgs) -> anyhow::Result<()> {
    let same_file = a.inputs == a.output || std::fs::canonicalize(&a.inputs).ok().is_some_and(|i| std::fs::canonicalize(&a.output).ok() == Some(i));
    if same_file {
        return Err(usage(format!("--output {}: is the --inputs file; writing there would overwrite the inputs", a.output.display())));
    }
    let model = load_model(&a.model, &a.device, &a.dtype)?;
    let inputs = candle_core::safetensors::load(&a.inputs, model.device()).map_err(|e| usage(format!("--inputs {}: {e}", a.inputs.display())))?;
    let ids = inputs.get("input_ids").ok_or_else(|| usage(format!("--inputs {}: no tensor `input_ids`", a.inputs.display())))?;
    if ids.rank() != 2 || !matches!(ids.dtype(), DType::I64 | DType::U32) {
        return Err(usage(format!("--inputs: `input_ids` must be [batch, tokens] int64 or uint32, got {:?} {:?}", ids.dims(), ids.dtype())));
    }
    let vocab = model.config().vocab_size as i64;
    let values: Vec<i64> = ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    if let Some(bad) = values.iter().find(|&&t| t < 0 || t >= vocab) {
        return Err(usage(format!("--inputs: `input_ids` holds {bad}, outside the vocabulary 0..{vocab}")));
    }
    let ids = ids.to_dtype(DType::U32)?;
    let out = model.forward(&ids, None, false).context("forward pass")?;
    let mut tensors: Vec<(String, Tensor)> = vec![("logits".into(), out.logits.clone())];
    for (l, r) in model.config().moe_layers().iter().zip(&out.router_logits) {
        tensors.push((format!("router_logits.{l}"), r.clone()));
    }
    if let Some(aux) = &out.aux_loss {
        tensors.push(("aux_loss".into(), aux.reshape(1)?));
    }
    if let Some(n) = a.generate {
        let prompt: Vec<u32> = ids.get(0)?.to_vec1()?;
        let generated = model.generate_greedy(&prompt, n)?;
        let len = generated.len();
        tensors.push(("generated".into(), Tensor::from_vec(generated.into_iter().map(i64::from).collect::<Vec<_>>(), (1, len), &candle_core::Device::Cpu)?));
    }
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| usage(format!("--output {}: {e}", parent.display())))?;
    }
    write_safetensors_atomic(&a.output, &tensors).map_err(|e| usage(format!("--output: {e}")))?;
    println!("wrote {} tensors to {}", tensors.len(), a.output.display());
    Ok(())
}

/// `lm train`, and `lm distill` with `distill` set: the config with the flags applied, trained.
fn train(a: TrainArgs, distill: Option<DistillConfig>) -> anyhow::Result<()> {
    let mut cfg = LmTrainConfig::from_file(&a.config).map_err(|e| usage(format!("--config: {e}")))?;
    if let Some(d) = distill {
        cfg.distill = Some(d);
    }
    if let Some(data) = &a.data {
        cfg.data = data.clone();
    }
    if let Some(out) = &a.out {
        cfg.out = out.clone();
    }
    if let Some(s) = a.steps {
        // where to stop, not the schedule's length: a run cut short and resumed decays alike
        cfg.lr_decay_steps.get_or_insert(cfg.steps);
        cfg.steps = s;
    }
    cfg.validate().map_err(|e| usage(e.to_string()))?;
    let device = super::device(&a.device)?;
    let world = join(&device)?;
    let result = train_in(&a, cfg, &device, world.as_ref());
    reported(world.as_ref(), result)
}

/// `lm train` on this process's share of the job: with `world`, data parallelism over every
/// rank and the experts split as `--expert-parallel` says; only rank 0 prints the summary (the
/// trainer draws progress and writes files on rank 0 only).
fn train_in(a: &TrainArgs, cfg: LmTrainConfig, device: &candle_core::Device, world: Option<&World>) -> anyhow::Result<()> {
    let precision = if device.is_cuda() { ditmoe::Precision::Tf32 } else { ditmoe::Precision::F32 };
    let plan = ExecutionPlan::training(device, precision);
    plan.apply_matmul_precision();
    let plan = parallel_plan(world, plan, Some(a.expert_parallel))?;
    let prints = leads(world);
    let start = match (a.resume, a.overwrite) {
        (true, _) => RunStart::Resume,
        (false, true) => RunStart::Overwrite,
        (false, false) => RunStart::New,
    };
    let mut trainer = LmTrainer::new(cfg.clone(), &plan, start)?;
    let params = trainer.model().config().num_parameters();
    let ranks = world.map_or(String::new(), |w| format!(" x {} ranks (experts over {})", w.world_size(), a.expert_parallel));
    if prints {
        eprintln!("training {params} parameters on {}{ranks}: {} steps of {} x {} tokens", a.device, cfg.steps, cfg.batch_size, cfg.seq_len);
    }
    if let (true, Some(d), Some(t)) = (prints, &cfg.distill, trainer.teacher()) {
        let until = d.stop_step.map_or("every step".to_string(), |s| format!("steps 1..={s}"));
        eprintln!("distilling from {} ({} parameters), beta {}, temperature {}, {until}", t.dir().display(), t.model().config().num_parameters(), d.beta, d.temperature);
    }
    if a.profile {
        trainer.enable_profile();
    }
    let summary = trainer.run(!a.quiet)?;
    if !prints {
        return Ok(());
    }
    if let Some(p) = trainer.profile() {
        eprintln!("{}", p.table());
    }
    if let Some(from) = &summary.resumed_from {
        eprintln!("resumed from {}", from.display());
    }
    let why = match summary.stop {
        StopReason::Steps => "step limit",
        StopReason::TimeBudget => "time budget",
    };
    let v = &summary.validation;
    println!("stopped at step {} ({why}); validation loss {:.4}, perplexity {:.2} over {} tokens; model in {}", summary.final_step, v.loss, v.perplexity, v.tokens, summary.model_dir.display());
    Ok(())
}

/// The settings of `lm distill`: the config's `distill` section with the flags applied.
fn distill(a: DistillArgs) -> anyhow::Result<()> {
    let cfg = LmTrainConfig::from_file(&a.train.config).map_err(|e| usage(format!("--config: {e}")))?;
    let mut d = match (cfg.distill, a.teacher) {
        (Some(d), None) => d,
        (Some(d), Some(teacher)) => DistillConfig { teacher, ..d },
        (None, Some(teacher)) => DistillConfig { teacher, beta: 1.0, temperature: 1.0, stop_step: None },
        (None, None) => return Err(usage(format!("--teacher: {} has no `distill` section; name the teacher's model folder", a.train.config.display()))),
    };
    d.beta = a.beta.unwrap_or(d.beta);
    d.temperature = a.temperature.unwrap_or(d.temperature);
    d.stop_step = a.stop_step.or(d.stop_step);
    d.validate().map_err(|e| usage(e.to_string()))?;
    train(a.train, Some(d))
}

fn generate_text(a: GenerateArgs) -> anyhow::Result<()> {
    let params = SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    let sampler = TokenSampler::new(params).map_err(|e| usage(e.to_string()))?;
    let model_dir = match &a.model {
        Some(m) => m.clone(),
        None if Path::new(BUNDLED_MODEL).join("config.json").exists() => PathBuf::from(BUNDLED_MODEL),
        None => return Err(usage(format!("--model: the bundled model {BUNDLED_MODEL} is not here (run from the repository root); pass --model DIR"))),
    };
    let tokenizer_path = model_dir.join(TOKENIZER_FILE);
    let tokenizer = Tokenizer::load(&tokenizer_path).map_err(|e| usage(format!("--model: {e}")))?;
    let (world, plan) = sharded_plan(&a.device, &a.dtype, a.expert_parallel)?;
    let result = generate_in(&a, &model_dir, &tokenizer, sampler, world.as_ref(), &plan);
    reported(world.as_ref(), result)
}

/// `lm generate` on this process's share of the job: with `world`, every rank runs the same
/// forward on its experts' slice, rank 0 samples each token and every rank takes it (one count
/// all-gather), so the ranks keep feeding the same tokens; only rank 0 prints.
fn generate_in(a: &GenerateArgs, model_dir: &Path, tokenizer: &Tokenizer, mut sampler: TokenSampler, world: Option<&World>, plan: &ExecutionPlan) -> anyhow::Result<()> {
    let tokenizer_path = model_dir.join(TOKENIZER_FILE);
    let model = load_planned(model_dir, plan)?;
    if tokenizer.vocab_size() > model.config().vocab_size {
        return Err(usage(format!("{}: {} tokens, more than the model's vocabulary of {}", tokenizer_path.display(), tokenizer.vocab_size(), model.config().vocab_size)));
    }
    let prompt = tokenizer.encode(&a.prompt)?;
    let comm = world.map(World::comm);
    let prints = leads(world);
    let next_token = |logits: &Tensor| match &comm {
        None => sampler.sample(logits),
        Some(c) => {
            let mine = if c.rank() == 0 { sampler.sample(logits)? as usize } else { 0 };
            Ok(c.all_gather_counts(&[mine])?[0][0] as u32)
        }
    };
    let mut stream = tokenizer.stream();
    let mut stdout = std::io::stdout().lock();
    if prints {
        write!(stdout, "{}", a.prompt)?;
    }
    let started = std::time::Instant::now();
    let (new, stop) = generate_with(&model, &prompt, a.max_tokens, next_token, tokenizer.eos_id(), |id| {
        if !prints {
            return Ok(());
        }
        if let Some(text) = stream.next_token(id)? {
            write!(stdout, "{text}").and_then(|_| stdout.flush()).map_err(|e| candle_core::Error::Msg(format!("stdout: {e}")))?;
        }
        Ok(())
    })?;
    if !prints {
        return Ok(());
    }
    if let Some(rest) = stream.finish()? {
        write!(stdout, "{rest}")?;
    }
    writeln!(stdout)?;
    let why = match stop {
        GenerationStop::MaxTokens => "max tokens",
        GenerationStop::EndOfText => "end of text",
        GenerationStop::ContextFull => "context full",
    };
    eprintln!("{} tokens in {:.2} s ({why})", new.len(), started.elapsed().as_secs_f64());
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let (world, plan) = sharded_plan(&a.device, &a.dtype, a.expert_parallel)?;
    let result = eval_in(&a, &plan, leads(world.as_ref()));
    reported(world.as_ref(), result)
}

/// `lm eval` on this process's share of the job: every rank runs the same windows through its
/// experts' slice (the forward is a collective); `prints` on rank 0 only.
fn eval_in(a: &EvalArgs, plan: &ExecutionPlan, prints: bool) -> anyhow::Result<()> {
    let model = load_planned(&a.model, plan)?;
    let shard_path = a.data.join(VALIDATION_SHARD);
    let shard = TokenShard::load(&shard_path).map_err(|e| usage(format!("--data: {e}")))?;
    shard.check_vocab(model.config().vocab_size).map_err(|e| usage(format!("{}: {e}", shard_path.display())))?;
    if a.seq_len + 1 > model.config().max_position_embeddings {
        return Err(usage(format!("--seq-len {}: windows of {} tokens exceed the model's context of {}", a.seq_len, a.seq_len + 1, model.config().max_position_embeddings)));
    }
    let report = evaluate(&model, &shard.tokens, a.seq_len, a.batch_size, a.max_windows)?;
    if !prints {
        return Ok(());
    }
    println!("validation: {} tokens in {} windows, loss {:.4} nats/token, perplexity {:.2}", report.tokens, report.windows, report.loss, report.perplexity);
    print_load(&report);
    if let Some(path) = &a.heatmap {
        let figure = ditmoe::analysis::figures::expert_load_figure(&report.moe_layers, &report.expert_load)?;
        ditmoe::analysis::heatmap::save_png(&figure.render(), path)?;
        println!("expert load heatmap: {}", path.display());
    }
    Ok(())
}

/// The expert load as a markdown table: a row per MoE layer, a column per expert (percent of the
/// layer's routed slots), and the largest share over the uniform one.
fn print_load(r: &EvalReport) {
    // layers may differ in expert count (a pyramid): as many columns as the widest
    let e = r.expert_load.iter().map(Vec::len).max().unwrap_or(0);
    if e == 0 {
        return;
    }
    let header: String = (0..e).map(|i| format!(" e{i} |")).collect();
    println!("| layer |{header} max / uniform |");
    println!("|---|{}---|", "---|".repeat(e));
    for (l, load) in r.moe_layers.iter().zip(&r.expert_load) {
        let cells: String = (0..e).map(|i| load.get(i).map_or(" – |".to_string(), |x| format!(" {:.1} |", 100.0 * x))).collect();
        let max = load.iter().cloned().fold(0.0, f64::max);
        println!("| {l} |{cells} {:.2} |", max * load.len() as f64);
    }
}

fn routes(a: RoutesArgs) -> anyhow::Result<()> {
    prompt_routes(&a.model, &a.prompt, a.out.as_deref(), &a.device, &a.dtype)
}

/// Prints which experts each token of `prompt` takes in every MoE layer and draws the map to
/// `out` (`lm routes`, and `ditmoe routes` given a language model).
pub fn prompt_routes(model_dir: &Path, prompt: &str, out: Option<&Path>, device: &str, dtype: &str) -> anyhow::Result<()> {
    let tokenizer = Tokenizer::load(&model_dir.join(TOKENIZER_FILE)).map_err(|e| usage(format!("--model: {e}")))?;
    let model = load_model(model_dir, device, dtype)?;
    let routes = ditmoe::lm::routes::TokenRoutes::of_prompt(&model, &tokenizer, prompt).map_err(|e| usage(format!("--prompt: {e}")))?;
    print!("{}", routes.table());
    if let Some(path) = out {
        ditmoe::analysis::heatmap::save_png(&routes.figure()?.render(), path)?;
        println!("routing map: {}", path.display());
    }
    Ok(())
}

fn curves(a: CurvesArgs) -> anyhow::Result<()> {
    let labels: Vec<String> = match a.labels.len() {
        0 => a.runs.iter().map(|r| r.file_name().map_or_else(|| r.display().to_string(), |n| n.to_string_lossy().into_owned())).collect(),
        n if n == a.runs.len() => a.labels,
        n => return Err(usage(format!("--labels: {n} labels for {} runs; give one per run", a.runs.len()))),
    };
    let curves = a.runs.iter().zip(&labels).map(|(run, label)| Curve::from_run(run, label).map_err(|e| usage(format!("--runs: {e}")))).collect::<anyhow::Result<Vec<_>>>()?;
    ditmoe::analysis::heatmap::save_png(&loss_chart(&a.title, &curves)?, &a.out).map_err(|e| usage(format!("--out: {e}")))?;
    println!("| run | evaluations | training tokens | last validation loss |");
    println!("|---|---:|---:|---:|");
    for c in &curves {
        let (tokens, loss) = c.points[c.points.len() - 1];
        println!("| {} | {} | {tokens:.0} | {loss:.4} |", c.label, c.points.len());
    }
    println!("curves: {}", a.out.display());
    Ok(())
}

/// `key value` lines (what scripts/lm-compare.sh reads).
fn info(a: InfoArgs) -> anyhow::Result<()> {
    let cfg = if a.model.is_dir() {
        ditmoe::lm::HfCheckpoint::open(&a.model).map_err(|e| usage(format!("--model: {e}")))?.config().clone()
    } else {
        let text = std::fs::read_to_string(&a.model).map_err(|e| usage(format!("--model {}: {e}", a.model.display())))?;
        let cfg: ditmoe::lm::LmConfig = serde_json::from_str(&text).map_err(|e| usage(format!("--model {}: {e}", a.model.display())))?;
        cfg.validate().map_err(|e| usage(format!("--model {}: {e}", a.model.display())))?;
        cfg
    };
    let (total, active) = cfg.parameter_counts();
    let experts: Vec<String> = cfg.layers.iter().map(|l| l.moe().map_or("dense".to_string(), |m| format!("{}e-top{}", m.num_experts, m.top_k))).collect();
    println!("total_parameters {total}");
    println!("active_parameters {active}");
    println!("layers {}", cfg.num_layers);
    println!("layer_plan {}", experts.join(","));
    Ok(())
}

/// Loads the folder with an inference plan of the wanted dtype on the CPU and saves it again:
/// [`LmModel::save_hf`] stores each tensor in the dtype the model holds it in.
fn export(a: ExportArgs) -> anyhow::Result<()> {
    let holds_model = ["config.json", "model.safetensors"].iter().any(|f| a.out.join(f).exists());
    if holds_model && !a.overwrite {
        return Err(usage(format!("--out {}: already holds a model; pass --overwrite to replace it, or choose another folder", a.out.display())));
    }
    let same = std::fs::canonicalize(&a.model).ok().is_some_and(|m| std::fs::canonicalize(&a.out).ok() == Some(m));
    if same {
        return Err(usage(format!("--out {}: is the --model folder; export into another one", a.out.display())));
    }
    let tokenizer = Tokenizer::load(&a.model.join(TOKENIZER_FILE)).map_err(|e| usage(format!("--model: {e}")))?;
    let model = load_model(&a.model, "cpu", &a.dtype)?;
    model.save_hf(&a.out)?;
    tokenizer.save(&a.out.join(TOKENIZER_FILE))?;
    let bytes = std::fs::metadata(a.out.join("model.safetensors")).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({} parameters, {}, {:.1} MB of weights)", a.out.display(), model.config().num_parameters(), a.dtype, bytes as f64 / 1e6);
    Ok(())
}
