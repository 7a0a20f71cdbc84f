//! `ditmoe lm train`: next-token training of an [`LmModel`] on a token corpus, with the DiT
//! trainer's guarantees and pieces (`crate::train`): AdamW with its fused update, global-norm
//! clipping, atomic checkpoints every `ckpt_every` steps, exact resume, a stop naming the step
//! on a non-finite loss or gradient, the JSONL log with per-layer expert counts, `--profile`,
//! and a progress bar.
//!
//! Batches: step s, micro-batch 0 draws `batch_size` windows of `seq_len + 1` tokens at
//! uniform random offsets of the train shard from `step_rng(seed, s, 0, TextWindows)`; a window
//! is both the input and (shifted inside the loss) the labels. Nothing random carries state
//! between steps, so the checkpoint needs only the step to resume exactly.
//!
//! Weight decay follows GPT-2/nanoGPT practice: matrices (linear and embedding weights) decay,
//! vectors (norm weights, biases) do not; the two groups are two AdamW instances over one
//! shared state file.
//!
//! With a `distill` section the run is a Mixture-of-Students distillation ([`super::distill`]):
//! a frozen teacher runs on each step's windows and `beta · T² · KL` joins the loss on steps
//! `1..=stop_step`; after that the teacher is dropped and the loss is the plain one. The stage
//! is a function of the step, so the checkpoint's step alone resumes it exactly; the settings
//! that decide it are recorded in `<out>/distill.json`, and a resume under other settings is
//! refused.
//!
//! Data parallelism (`crate::train::parallel` gives the scheme both trainers share: batch
//! slices, gradient reduction, global-norm clipping, checkpoints under global expert names):
//! rank `r` of `P` trains on the `r`-th of `P` equal slices of the same `batch_size` windows
//! (so `P` must divide `batch_size`, and `P = 1` is the single-process run). transformers'
//! model-level load-balancing loss is a product of two batch means, not a mean of per-token
//! terms: each rank adds its share of the global batch's loss, the expert fractions `f_e`
//! all-gathered (they carry no gradient) and its own tokens' router probabilities over the
//! global token count, so the ranks' shares sum to the `P = 1` loss and their gradients to its
//! gradient (Megatron-Core's global-batch balance loss). The MoE layers' own balance losses (a
//! `balance_loss` coefficient, off for the HF families) stay per rank and are averaged, as
//! DeepSpeed-MoE's and Megatron-Core's per-rank auxiliary losses are; a run with them matches
//! `P = 1` only at `P = 1`. The logged losses, gradient norm and expert counts are the global
//! ones.
//!
//! Rank 0 writes everything (the log, evaluations, checkpoints, the exported model); the
//! other ranks write nothing. Validation runs the whole validation set on every rank (under
//! expert parallelism the forward is a collective). The time budget's stop is rank 0's
//! decision, broadcast, so the ranks stop together.
use super::distill::{mos_kl, Teacher};
use super::eval::{evaluate, EvalReport};
use super::init::initialize;
use super::train_config::{DistillConfig, LmTrainConfig};
use super::{HfCheckpoint, LmConfig, LmModel};
use crate::checkpoint::write_atomic;
use crate::data::LoaderState;
use crate::moe::balance_loss::expert_slot_mask;
use crate::moe::Routing;
use crate::plan::ExecutionPlan;
use crate::text::{TokenShard, Tokenizer};
use crate::train::adamw::{AdamW, AdamWParams};
use crate::train::checkpoint::{self, SaveRequest};
use crate::train::kernels::foreach::sum_of_squares;
use crate::train::parallel::Parallel;
use crate::train::log::{JsonlLog, StepLog, LOG_FILE};
use crate::train::profile::StepProfile;
use crate::train::rng::{step_rng, Stream};
use crate::train::run_dir::{self, RunStart};
use crate::train::StopReason;
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The corpus folder's files.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TRAIN_SHARD: &str = "train.safetensors";
pub const VALIDATION_SHARD: &str = "validation.safetensors";
/// The run folder's validation record: one JSON line per evaluation ([`EvalLine`]).
pub const EVAL_FILE: &str = "eval.jsonl";
/// The run folder's record of a distillation's settings (its [`DistillConfig`]).
pub const DISTILL_FILE: &str = "distill.json";

/// One line of `<out>/eval.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalLine {
    /// Optimizer steps done.
    pub step: u64,
    /// Mean validation cross-entropy, nats per token.
    pub loss: f64,
    pub perplexity: f64,
    /// Validation tokens predicted.
    pub tokens: usize,
    /// Training tokens seen: `step · batch_size · seq_len` (the x axis that compares runs of
    /// different batch shapes, `ditmoe lm curves`).
    pub train_tokens: u64,
}

/// One line of `<out>/log.jsonl`: the trainer's [`StepLog`] and, on a distilling step, the
/// distillation term `kl` ([`mos_kl`], before `beta`).
#[derive(Serialize)]
struct LogLine<'a> {
    #[serde(flatten)]
    step: &'a StepLog,
    #[serde(skip_serializing_if = "Option::is_none")]
    kl: Option<f32>,
}

/// What a run did.
#[derive(Debug)]
pub struct LmRunSummary {
    pub steps: Vec<StepLog>,
    /// Per entry of `steps`, the distillation term of that step ([`mos_kl`], before `beta`);
    /// None on a step that did not distil.
    pub kl: Vec<Option<f32>>,
    pub final_step: u64,
    pub stop: StopReason,
    pub resumed_from: Option<PathBuf>,
    /// The validation measured at the end.
    pub validation: EvalReport,
    /// The trained model as an HF-layout folder with its tokenizer (`<out>/model`).
    pub model_dir: PathBuf,
}

pub struct LmTrainer {
    cfg: LmTrainConfig,
    device: Device,
    model: LmModel,
    /// Every variable by name, sorted.
    vars: Vec<(String, Var)>,
    /// AdamW over the matrices (weight decay) and over the vectors (none).
    decayed: AdamW,
    undecayed: AdamW,
    train: TokenShard,
    validation: TokenShard,
    tokenizer: Tokenizer,
    /// The frozen teacher while the run distils (dropped after `distill.stop_step`).
    teacher: Option<Teacher>,
    step: u64,
    resumed_from: Option<PathBuf>,
    profile: Option<StepProfile>,
    /// How this rank trains with the others (None: alone).
    parallel: Option<Parallel>,
}

/// The model config of `cfg.model`: an `LmConfig` JSON file, or an HF folder's `config.json`.
fn model_config(path: &Path) -> Result<(LmConfig, Option<HfCheckpoint>)> {
    if path.is_dir() {
        let hf = HfCheckpoint::open(path)?;
        return Ok((hf.config().clone(), Some(hf)));
    }
    let text = std::fs::read_to_string(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    let cfg: LmConfig = serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    cfg.validate().map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    Ok((cfg, None))
}

impl LmTrainer {
    /// Builds the model (random init from `seed`, or an HF folder's weights), reads the corpus
    /// and checks it against the model; with [`RunStart::Resume`] continues from the newest
    /// valid checkpoint. `plan`: a training plan with f32 master weights.
    pub fn new(cfg: LmTrainConfig, plan: &ExecutionPlan, start: RunStart) -> Result<Self> {
        if !plan.trainable() || plan.weight_dtype() != DType::F32 {
            bail!("the trainer needs a training plan with f32 master weights")
        }
        cfg.validate()?;
        let device = plan.device.clone();
        let mut parallel = Parallel::of_plan(plan)?;
        if let Some(p) = &parallel {
            p.check_divides(cfg.batch_size, "lm train: `batch_size`")?;
        }
        let writer = parallel.as_ref().is_none_or(Parallel::writes);
        let (model_cfg, hf) = model_config(&cfg.model)?;
        if cfg.seq_len + 1 > model_cfg.max_position_embeddings {
            bail!("lm train: windows of seq_len + 1 = {} tokens exceed the model's max_position_embeddings {}", cfg.seq_len + 1, model_cfg.max_position_embeddings)
        }
        let tokenizer = Tokenizer::load(&cfg.data.join(TOKENIZER_FILE))?;
        if tokenizer.vocab_size() > model_cfg.vocab_size {
            bail!(
                "{}: the tokenizer has {} tokens, the model's vocabulary {} (vocab_size in {})",
                cfg.data.join(TOKENIZER_FILE).display(),
                tokenizer.vocab_size(),
                model_cfg.vocab_size,
                cfg.model.display()
            )
        }
        let train = TokenShard::load(&cfg.data.join(TRAIN_SHARD))?;
        let validation = TokenShard::load(&cfg.data.join(VALIDATION_SHARD))?;
        for (name, shard) in [(TRAIN_SHARD, &train), (VALIDATION_SHARD, &validation)] {
            shard.check_vocab(model_cfg.vocab_size).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", cfg.data.join(name).display())))?;
            if shard.tokens.len() < cfg.seq_len + 2 {
                bail!("{}: {} tokens, fewer than one window of seq_len + 1 = {}", cfg.data.join(name).display(), shard.tokens.len(), cfg.seq_len + 1)
            }
        }
        // f32 weights, their gradients and AdamW's two moments: 16 bytes a parameter, of which a
        // rank holds 1/EP of the routed experts under expert parallelism
        let ep = plan.expert_parallel_size();
        let rank_params = model_cfg.num_parameters() - model_cfg.routed_experts_params() * (ep - 1) / ep;
        plan.check_fits("training the language model (weights, gradients, optimizer state)", 16 * rank_params as u64)?;
        // the teacher is checked against the student before anything is written
        let mut teacher = match &cfg.distill {
            Some(d) => Some(Teacher::load(&d.teacher, &plan.frozen(), &model_cfg, cfg.seq_len + 1)?),
            None => None,
        };
        if writer {
            if let Some(aside) = run_dir::prepare(&cfg.out, start)? {
                eprintln!("moved the earlier run in {} aside to {}", cfg.out.display(), aside.display());
            }
            std::fs::create_dir_all(&cfg.out).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", cfg.out.display())))?;
        }

        let varmap = VarMap::new();
        let model = LmModel::new(&model_cfg, plan, VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
        let mut vars: Vec<(String, Var)> = varmap.data().lock().expect("varmap lock").iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(p) = &mut parallel {
            for (prefix, local) in model.split_experts() {
                p.add_split_layer(prefix, local);
            }
        }
        match &parallel {
            Some(p) if p.splits_experts() => {
                // the P = 1 stream, the experts held elsewhere drawn into placeholders
                let mut all = vars.clone();
                all.extend(p.absent_experts(&vars)?);
                all.sort_by(|a, b| a.0.cmp(&b.0));
                initialize(&all, cfg.seed)?;
            }
            _ => initialize(&vars, cfg.seed)?,
        }
        if let Some(hf) = &hf {
            // continue from the folder's weights, read by name as f32
            let weights = hf.var_builder(&ExecutionPlan::inference(&device, crate::plan::Precision::F32));
            for (name, var) in &vars {
                var.set(&weights.get(var.dims(), name)?)?;
            }
        }
        let params = |weight_decay| AdamWParams { weight_decay, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.adam_eps };
        let (matrices, vectors): (Vec<_>, Vec<_>) = vars.iter().cloned().partition(|(_, v)| v.rank() >= 2);
        let mut decayed = AdamW::new(matrices, params(cfg.weight_decay))?;
        let mut undecayed = AdamW::new(vectors, params(0.0))?;
        if let Some(p) = &mut parallel {
            // both groups' gradients go through one reduction, decayed first
            p.set_gradient_order(decayed.vars().iter().chain(undecayed.vars()).map(|(n, _)| n.as_str()));
        }

        let (mut step, mut resumed_from) = (0, None);
        if start == RunStart::Resume {
            let root = checkpoint::checkpoints_dir(&cfg.out);
            let (ckpt, warnings) = checkpoint::load_latest(&root, &device)?;
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            match ckpt {
                None => eprintln!("warning: {}: no valid checkpoint to resume from, starting at step 0", root.display()),
                Some(ckpt) => {
                    if ckpt.state.seed != cfg.seed {
                        bail!("{}: checkpoint was trained with seed {}, the config says {}", ckpt.dir.display(), ckpt.state.seed, cfg.seed);
                    }
                    for (name, var) in &vars {
                        let t = ckpt.model.get(name).ok_or_else(|| candle_core::Error::Msg(format!("{}: model lacks `{name}`", ckpt.dir.display())))?;
                        if t.dims() != var.dims() {
                            bail!("{}: `{name}` has shape {:?}, the model {:?}", ckpt.dir.display(), t.dims(), var.dims());
                        }
                        var.set(t)?;
                    }
                    decayed.load_state(&ckpt.optim, ckpt.state.step)?;
                    undecayed.load_state(&ckpt.optim, ckpt.state.step)?;
                    step = ckpt.state.step;
                    resumed_from = Some(ckpt.dir);
                }
            }
        }
        match step {
            0 if writer => record_distill(&cfg.out, cfg.distill.as_ref())?,
            0 => {}
            _ => check_distill(&cfg.out, cfg.distill.as_ref())?,
        }
        if cfg.distill.as_ref().is_some_and(|d| !d.distils_at(step + 1)) {
            teacher = None;
        }
        Ok(Self { cfg, device, model, vars, decayed, undecayed, train, validation, tokenizer, teacher, step, resumed_from, profile: None, parallel })
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn model(&self) -> &LmModel {
        &self.model
    }

    /// The teacher, while the run distils.
    pub fn teacher(&self) -> Option<&Teacher> {
        self.teacher.as_ref()
    }

    /// Times every phase of each step from now on (the device is synchronised between phases).
    pub fn enable_profile(&mut self) {
        self.profile = Some(StepProfile::new(&self.device));
    }

    pub fn profile(&self) -> Option<&StepProfile> {
        self.profile.as_ref()
    }

    fn mark(&mut self, phase: &'static str) -> Result<()> {
        match &mut self.profile {
            Some(p) => p.mark(phase),
            None => Ok(()),
        }
    }

    /// Step `step`'s windows, `[batch_size, seq_len + 1]` u32.
    fn batch(&self, step: u64) -> Result<Tensor> {
        let window = self.cfg.seq_len + 1;
        let last_start = self.train.tokens.len() - window;
        let mut rng = step_rng(self.cfg.seed, step, 0, Stream::TextWindows);
        let mut ids = Vec::with_capacity(self.cfg.batch_size * window);
        for _ in 0..self.cfg.batch_size {
            let at = rng.random_range(0..=last_start);
            ids.extend_from_slice(&self.train.tokens[at..at + window]);
        }
        Tensor::from_vec(ids, (self.cfg.batch_size, window), &self.device)
    }

    /// One optimizer step: forward, loss (cross-entropy + the balance losses, + `beta` times
    /// the distillation term while distilling), backward, finite checks, clipping, AdamW. The
    /// record and the step's distillation term. Under data parallelism this rank's slice of
    /// the batch, its gradients summed with the other ranks' (see the module docs).
    fn train_step(&mut self) -> Result<(StepLog, Option<f32>)> {
        let step = self.step + 1;
        if let Some(p) = &mut self.profile {
            p.start_step()?;
        }
        let ids = self.batch(step)?;
        let ids = match &self.parallel {
            Some(p) => p.slice(&ids)?,
            None => ids,
        };
        self.mark("data")?;
        let out = self.model.forward(&ids, None, true)?;
        let ce = super::cross_entropy(&out.logits, &ids)?;
        let (share, mut total) = match &self.parallel {
            Some(p) => (p.share(), local_loss(p, &self.model, &out, &ce)?),
            None => (1.0, self.model.loss_from_output(&out, &ids)?),
        };
        let kl = match (&self.teacher, &self.cfg.distill) {
            (Some(teacher), Some(d)) if d.distils_at(step) => Some((mos_kl(&out.logits, &teacher.logits(&ids)?, d.temperature)?, d.beta)),
            _ => None,
        };
        // the host values, the global means under data parallelism
        let mut host = vec![(&ce * share)?, total.clone()];
        host.extend(kl.as_ref().map(|(kl, _)| kl * share).transpose()?);
        let host = match &self.parallel {
            Some(p) => p.sum_scalars(&host)?,
            None => host.iter().map(|t| t.to_scalar::<f32>()).collect::<Result<_>>()?,
        };
        let (loss, total_host, kl_host) = (host[0], host[1], host.get(2).copied());
        if !loss.is_finite() || !total_host.is_finite() {
            bail!("non-finite loss at step {step} (cross-entropy {loss}, with balance losses {total_host})");
        }
        if let (Some((kl, beta)), Some(host)) = (kl, kl_host) {
            if !host.is_finite() {
                bail!("non-finite distillation term at step {step} ({host})");
            }
            total = (total + (kl * (beta * share))?)?;
        }
        let mut counts = out.expert_counts.iter().map(|c| Ok(c.to_dtype(DType::U32)?.to_vec1::<u32>()?.into_iter().map(|x| x as usize).collect())).collect::<Result<Vec<Vec<usize>>>>()?;
        if let Some(p) = &self.parallel {
            counts = p.sum_counts(&counts)?;
        }
        self.mark("forward + losses")?;
        let store = total.backward()?;
        self.mark("backward")?;
        // A parameter no token reached (an idle expert) has no gradient: zero. Contiguous: the
        // fused optimizer kernels take flat tensors.
        let grads_of = |opt: &AdamW| -> Result<Vec<Tensor>> {
            opt.vars()
                .iter()
                .map(|(_, v)| match store.get(v.as_tensor()) {
                    Some(g) => g.detach().contiguous(),
                    None => v.zeros_like(),
                })
                .collect()
        };
        let (g_decayed, g_undecayed) = (grads_of(&self.decayed)?, grads_of(&self.undecayed)?);
        drop(store);
        self.mark("gradients collected")?;
        let (g_decayed, g_undecayed, grad_norm) = match &self.parallel {
            Some(p) => {
                // both groups in one reduction (one flat all-reduce), split again after
                let split = g_decayed.len();
                let mut grads = p.reduce_gradients([g_decayed, g_undecayed].concat())?;
                let norm = p.global_norm_sq(&grads)?.sqrt();
                let g_undecayed = grads.split_off(split);
                self.mark("gradients reduced")?;
                (grads, g_undecayed, norm)
            }
            None => {
                let norm = (sum_of_squares(&g_decayed)? + sum_of_squares(&g_undecayed)?).sqrt();
                (g_decayed, g_undecayed, norm)
            }
        };
        if !grad_norm.is_finite() {
            bail!("non-finite gradient norm at step {step}");
        }
        let grad_scale = self.cfg.max_grad_norm.map(|max| max / (grad_norm as f64 + 1e-6)).filter(|&c| c < 1.0);
        let lr = self.cfg.lr_at(step - 1);
        self.decayed.step(g_decayed, lr, grad_scale)?;
        self.undecayed.step(g_undecayed, lr, grad_scale)?;
        self.mark("AdamW")?;
        if let Some(p) = &mut self.profile {
            p.end_step()?;
        }
        self.step = step;
        if self.cfg.distill.as_ref().is_some_and(|d| !d.distils_at(step + 1)) {
            // the distillation stage is over: the teacher's memory goes back
            self.teacher = None;
        }
        Ok((StepLog { step, loss, aux: total_host - loss, contrastive: 0.0, grad_norm, lr, steps_per_sec: 0.0, expert_counts: counts }, kl_host))
    }

    /// Whether this rank writes the run's files (rank 0, or the only rank).
    fn writes(&self) -> bool {
        self.parallel.as_ref().is_none_or(Parallel::writes)
    }

    /// The weights and optimizer state, every expert under its global name (gathered under
    /// expert parallelism): on the writing rank, and on every rank without expert parallelism.
    fn full_state(&self) -> Result<Option<(Named, Named)>> {
        let model: Vec<(String, Tensor)> = self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let mut optim = self.decayed.state_tensors();
        optim.extend(self.undecayed.state_tensors());
        match &self.parallel {
            Some(p) => Ok(p.gather_experts(model)?.zip(p.gather_experts(optim)?)),
            None => Ok(Some((model, optim))),
        }
    }

    /// Writes a checkpoint (rank 0); under expert parallelism a collective.
    fn save_checkpoint(&self) -> Result<()> {
        let Some((model, optim)) = self.full_state()? else { return Ok(()) };
        if !self.writes() {
            return Ok(());
        }
        // the windows are a function of the step: the loader position is the step itself
        let loader = LoaderState { epoch: 0, position: self.step };
        let req = SaveRequest { step: self.step, loader, seed: self.cfg.seed, model: &model, ema: &[], optim: &optim };
        checkpoint::save(&checkpoint::checkpoints_dir(&self.cfg.out), &req, self.cfg.keep_last)?;
        Ok(())
    }

    /// The validation shard's loss, perplexity and expert load now.
    pub fn validate(&self) -> Result<EvalReport> {
        evaluate(&self.model, &self.validation.tokens, self.cfg.seq_len, self.cfg.batch_size, self.cfg.eval_batches * self.cfg.batch_size)
    }

    /// Writes the model as an HF-layout folder with the corpus' tokenizer (what `ditmoe lm
    /// generate --model` reads). Under data parallelism rank 0 writes it; under expert
    /// parallelism a collective (every rank calls it), the experts gathered under their global
    /// names into the single-process layout.
    pub fn export(&self, dir: &Path) -> Result<()> {
        if self.parallel.as_ref().is_some_and(Parallel::splits_experts) {
            let Some((model, _)) = self.full_state()? else { return Ok(()) };
            if !self.writes() {
                return Ok(());
            }
            let weights = model.into_iter().map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?))).collect::<Result<HashMap<_, _>>>()?;
            let plan = ExecutionPlan::inference(&Device::Cpu, crate::plan::Precision::F32);
            LmModel::new(self.model.config(), &plan, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu))?.save_hf(dir)?;
        } else if self.writes() {
            self.model.save_hf(dir)?;
        } else {
            return Ok(());
        }
        self.tokenizer.save(&dir.join(TOKENIZER_FILE))
    }

    /// Trains until `steps` or the time budget; a checkpoint every `ckpt_every` steps and at the
    /// end, the validation loss every `eval_every` steps (into `<out>/eval.jsonl`) and at the
    /// end, then the model folder `<out>/model`. A non-finite loss or gradient stops with an
    /// error naming the step; the checkpoints already written are untouched. A resumed run
    /// first drops the log and evaluation lines past its checkpoint (it writes those steps
    /// again).
    pub fn run(&mut self, progress: bool) -> Result<LmRunSummary> {
        let start = Instant::now();
        let budget = self.cfg.max_minutes.map(|m| m * 60.0);
        // JsonlLog keeps the lines through the checkpoint's step; the lines are appended here,
        // with the distillation term beside the step record
        // (rank 0 only: the other ranks of a data-parallel run write nothing)
        let log_path = self.cfg.out.join(LOG_FILE);
        let mut log = match self.writes() {
            true => {
                drop(JsonlLog::open(&self.cfg.out, self.step)?);
                self.keep_evals_through(self.step)?;
                Some(std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", log_path.display())))?)
            }
            false => None,
        };
        let bar = if progress && self.writes() { crate::progress::bar(self.cfg.steps) } else { ProgressBar::hidden() };
        bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("template"));
        bar.set_position(self.step);
        let (mut records, mut kls, mut stop, mut saved_step, mut evaluated) = (Vec::new(), Vec::new(), StopReason::Steps, None, None);
        let (mut last_log_time, mut last_log_step) = (Instant::now(), self.step);
        let (mut last_step, mut steps_run) = (0f64, 0u64);
        while self.step < self.cfg.steps {
            let out_of_time = budget.is_some_and(|b| crate::train::trainer::budget_runs_out(start.elapsed().as_secs_f64(), b, last_step, steps_run));
            let out_of_time = match (&self.parallel, budget) {
                (Some(p), Some(_)) => p.rank0_decides(out_of_time, &self.device)?,
                _ => out_of_time,
            };
            if out_of_time {
                stop = StopReason::TimeBudget;
                break;
            }
            steps_run += 1;
            let t0 = Instant::now();
            let (mut rec, kl) = self.train_step()?;
            last_step = t0.elapsed().as_secs_f64();
            if rec.step.is_multiple_of(self.cfg.log_every) {
                rec.steps_per_sec = (rec.step - last_log_step) as f64 / last_log_time.elapsed().as_secs_f64();
                (last_log_time, last_log_step) = (Instant::now(), rec.step);
                let line = serde_json::to_string(&LogLine { step: &rec, kl }).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                if let Some(log) = &mut log {
                    writeln!(log, "{line}").and_then(|_| log.flush()).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", log_path.display())))?;
                }
                let tokens_per_sec = rec.steps_per_sec * (self.cfg.batch_size * self.cfg.seq_len) as f64;
                let kl = kl.map(|k| format!(" kl {k:.3}")).unwrap_or_default();
                bar.set_message(format!("loss {:.3} aux {:.4}{kl} |g| {:.2} {:.0} tok/s", rec.loss, rec.aux, rec.grad_norm, tokens_per_sec));
            }
            bar.set_position(self.step);
            if self.cfg.eval_every > 0 && self.step.is_multiple_of(self.cfg.eval_every) {
                let v = self.validate()?;
                self.write_eval(&v)?;
                bar.println(format!("step {}: validation loss {:.4}, perplexity {:.2}", self.step, v.loss, v.perplexity));
                evaluated = Some((self.step, v));
            }
            if self.step.is_multiple_of(self.cfg.ckpt_every) {
                self.save_checkpoint()?;
                saved_step = Some(self.step);
            }
            records.push(rec);
            kls.push(kl);
        }
        if saved_step != Some(self.step) {
            self.save_checkpoint()?;
        }
        // the last step's evaluation, unless the schedule has just made it
        let validation = match evaluated {
            Some((s, v)) if s == self.step => v,
            _ => {
                let v = self.validate()?;
                self.write_eval(&v)?;
                v
            }
        };
        let model_dir = self.cfg.out.join("model");
        self.export(&model_dir)?;
        bar.finish();
        Ok(LmRunSummary { steps: records, kl: kls, final_step: self.step, stop, resumed_from: self.resumed_from.clone(), validation, model_dir })
    }

    /// Appends one line to `<out>/eval.jsonl`, rewriting the file (it is small) atomically
    /// (rank 0).
    fn write_eval(&self, v: &EvalReport) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let path = self.cfg.out.join(EVAL_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        let train_tokens = self.step * (self.cfg.batch_size * self.cfg.seq_len) as u64;
        let line = EvalLine { step: self.step, loss: v.loss, perplexity: v.perplexity, tokens: v.tokens, train_tokens };
        text.push_str(&serde_json::to_string(&line).map_err(|e| candle_core::Error::Msg(e.to_string()))?);
        text.push('\n');
        write_atomic(&path, text.as_bytes())
    }

    /// Drops the lines of `<out>/eval.jsonl` past `step`.
    fn keep_evals_through(&self, step: u64) -> Result<()> {
        let path = self.cfg.out.join(EVAL_FILE);
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
        let kept: String = text.lines().filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step)).map(|l| format!("{l}\n")).collect();
        write_atomic(&path, kept.as_bytes())
    }
}

/// Writes (or, for a plain run, removes) `<out>/distill.json`: the settings a resumed run must
/// share.
fn record_distill(out: &Path, distill: Option<&DistillConfig>) -> Result<()> {
    let path = out.join(DISTILL_FILE);
    match distill {
        Some(d) => write_atomic(&path, serde_json::to_string_pretty(d).map_err(|e| candle_core::Error::Msg(e.to_string()))?.as_bytes()),
        None if path.exists() => std::fs::remove_file(&path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display()))),
        None => Ok(()),
    }
}

/// Refuses to resume a run under distillation settings other than those it started with (the
/// stage of each step, and the loss within it, would differ from the uninterrupted run's),
/// naming the field. The teacher's folder may have moved; the settings may not change.
fn check_distill(out: &Path, distill: Option<&DistillConfig>) -> Result<()> {
    let path = out.join(DISTILL_FILE);
    let recorded: Option<DistillConfig> = match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?),
        Err(_) => None,
    };
    match (&recorded, distill) {
        (None, None) => Ok(()),
        (None, Some(_)) => bail!("{}: the run there was not a distillation (no {DISTILL_FILE}); resume it without `distill`", out.display()),
        (Some(_), None) => bail!("{}: the run in {} distils; resume it with the same `distill` section", path.display(), out.display()),
        (Some(r), Some(d)) => {
            let show = |s: Option<u64>| s.map_or("null".to_string(), |s| s.to_string());
            let fields = [("beta", r.beta.to_string(), d.beta.to_string()), ("temperature", r.temperature.to_string(), d.temperature.to_string()), ("stop_step", show(r.stop_step), show(d.stop_step))];
            match fields.iter().find(|(_, was, now)| was != now) {
                Some((name, was, now)) => bail!("{}: the run started with `distill.{name}` = {was}, the config says {now}; resume with the run's settings", path.display()),
                None => Ok(()),
            }
        }
    }
}

/// Tensors by name, as a checkpoint file holds them.
type Named = Vec<(String, Tensor)>;

/// Records, under expert parallelism, which MoE layers hold a block of the experts (all).
/// This rank's part of the global batch's loss ([`LmModel::loss_from_output`] on the
/// whole batch): its mean cross-entropy and layer balance losses times its share, and its
/// share of transformers' load-balancing loss over the global batch.
fn local_loss(p: &Parallel, model: &LmModel, out: &super::LmOutput, ce: &Tensor) -> Result<Tensor> {
    let mut loss = (ce * p.share())?;
    if out.aux_loss.is_some() {
        loss = (loss + (load_balancing_share(p, model, &out.router_logits)? * model.config().router_aux_loss_coef)?)?;
    }
    if let Some(l) = &out.layer_aux_loss {
        loss = (loss + (l * p.share())?)?;
    }
    Ok(loss)
}

/// This rank's share of `LmModel`'s load-balancing loss over the global batch: per group
/// of MoE layers with equal (E, k), as the model groups them, `E · sum_e f_e · P_e` with
/// the fraction `f_e` of the global batch's rows whose top-k holds `e` (all-gathered;
/// constants, as in transformers) and, in place of the global mean probability `P_e`, the
/// sum of this rank's probabilities over the global row count. The shares of the ranks
/// sum to the global loss.
fn load_balancing_share(p: &Parallel, model: &LmModel, router_logits: &[Tensor]) -> Result<Tensor> {
    let groups = super::model::router_groups(model.config(), router_logits);
    // per group: the probabilities, and the rows' top-k counts per expert then the row count
    let mut probs = Vec::with_capacity(groups.len());
    let mut counts = Vec::new();
    for ((_, top_k), g) in &groups {
        let logits = Tensor::cat(g, 0)?;
        let scores = crate::nn::softmax_last_dim(&logits)?;
        let experts = scores.arg_sort_last_dim(false)?.narrow(1, 0, *top_k)?.contiguous()?;
        let mask = expert_slot_mask(&Routing { experts, weights: scores.clone(), scores: scores.clone(), logits })?;
        counts.extend(mask.sum(0)?.to_vec1::<f32>()?.into_iter().map(|c| c as usize));
        counts.push(scores.dim(0)?);
        probs.push(scores);
    }
    let global = p.sum_over_ranks(&counts)?;
    let (total, dev) = (router_logits.len() as f64, model.device());
    let mut loss: Option<Tensor> = None;
    let mut at = 0;
    for (((e, _), g), scores) in groups.iter().zip(&probs) {
        let n = global[at + e] as f64;
        let f = Tensor::from_vec(global[at..at + e].iter().map(|&c| (c as f64 / n) as f32).collect::<Vec<_>>(), *e, dev)?;
        at += e + 1;
        let l = (((scores.sum(0)? / n)? * f)?.sum_all()? * *e as f64)?;
        let l = if groups.len() == 1 { l } else { (l * (g.len() as f64 / total))? };
        loss = Some(match loss {
            None => l,
            Some(acc) => (acc + l)?,
        });
    }
    loss.map_or_else(|| Tensor::zeros((), DType::F32, dev), Ok)
}
