//! The training loop (official `train.py` / `train_rf.py` main loop): label dropout, the
//! diffusion or rectified-flow loss plus the expert balance loss, gradient accumulation,
//! global-norm clipping, AdamW, EMA, logging, checkpoints and exact resume.
//!
//! Data and expert parallelism follow the scheme both trainers share ([`super::parallel`]):
//! every rank's loader yields the single-device stream of micro-batches (`micro_batch` images
//! each), the label dropout, noise and timesteps are drawn for the whole micro-batch from the
//! single-device generators, and rank `r` keeps the `r`-th of `P` equal slices of them, so `P`
//! must divide `micro_batch` (and `global_batch`). The official `train.py` gives each of its
//! DDP ranks `global_batch_size // world_size` images of its own sampler's; here the ranks'
//! slices together are exactly the `P = 1` batch, which is what makes a run's layout
//! irrelevant to its numbers. Every rank reads the whole micro-batch (the loader's position
//! stays the single-device one, bad files skipped alike), a cost that pre-encoded latent
//! shards keep small.
//!
//! The expert balance loss is the official one per rank: each rank's MoE layers compute
//! `MoEGate`'s loss over that rank's tokens, and the ranks' losses are averaged, as under the
//! official DDP training (each GPU's gate sees its own batch) and DeepSpeed-MoE's per-rank
//! `l_aux`. Its per-image form (`seq_aux`) is a mean over images, so its average over the ranks
//! is the `P = 1` loss; the batch form (the released configs) is a product of two batch means,
//! and a run with it matches `P = 1` only at `P = 1` (the diffusion loss and everything else
//! still split exactly). The logged losses are the means over the ranks, the expert counts the
//! global batch's.
//!
//! Each rank keeps the EMA of the weights it holds. Rank 0 writes the log, the checkpoints,
//! the exported EMA model and the sample grids; under expert parallelism saving, exporting
//! and sampling are collectives (the experts are gathered, the sampler's forward exchanges
//! tokens), and every rank reads its slice of a checkpoint back by global name.
use crate::plan::ExecutionPlan;
use super::adamw::{AdamW, AdamWParams};
use super::checkpoint::{self, SaveRequest};
use super::data::open_dataset;
use super::ema::Ema;
use super::init::{initialize, is_frozen};
use super::log::{JsonlLog, StepLog};
use super::mixed_precision::TrainingWeights;
use super::memory_stages::MemoryStages;
use super::profile::StepProfile;
use super::rng::{drop_labels, randn, step_rng, Stream};
use super::parallel::Parallel;
use super::samples::sample_grid;
use super::run_dir::{self, RunStart};
use super::{Objective, TrainConfig};
use crate::sampling::SamplerKind;
use crate::checkpoint::{write_atomic, write_safetensors_atomic};
use crate::config::DitConfig;
use crate::data::{DataLoader, LoaderConfig, LoaderState};
use crate::train::kernels::foreach::sum_of_squares;
use crate::diffusion::{GaussianDiffusion, RectifiedFlow};
use crate::model::{BlockTape, DitMoe, ForwardMode, Trace};
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Why [`Trainer::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `steps` optimizer steps are done.
    Steps,
    /// The wall-clock budget (`max_minutes`) would have run out during the next step.
    TimeBudget,
}

/// What [`Trainer::micro_step`] returns: (loss + balance loss + contrastive loss scaled by
/// 1/accum, diffusion loss, balance loss, contrastive loss, expert counts, the blocks' tape of a
/// recomputed forward).
type MicroStep = (Tensor, f32, f32, f32, Vec<Vec<usize>>, Option<BlockTape>);

#[derive(Debug, Clone)]
pub struct RunSummary {
    /// One record per optimizer step taken by this call (the log file keeps every `log_every`-th).
    pub steps: Vec<StepLog>,
    pub final_step: u64,
    pub stop: StopReason,
    /// The checkpoint this run resumed from.
    pub resumed_from: Option<PathBuf>,
    /// Damaged checkpoints skipped while resuming, or a resume that found no checkpoint.
    pub warnings: Vec<String>,
    /// The exported EMA model folder (`config.json`, `model.safetensors`, `class_names.json`).
    pub ema_dir: PathBuf,
}

enum Loss {
    Ddpm(Box<GaussianDiffusion>),
    Rf(RectifiedFlow),
}

pub struct Trainer {
    cfg: TrainConfig,
    model_cfg: DitConfig,
    plan: ExecutionPlan,
    device: Device,
    model: DitMoe,
    /// The f32 master weights (what checkpoints, the EMA and AdamW hold) and, in a bf16 plan,
    /// the model's bf16 copies of them.
    weights: TrainingWeights,
    opt: AdamW,
    ema: Ema,
    loader: DataLoader,
    loss: Loss,
    class_names: Vec<String>,
    step: u64,
    resumed_from: Option<PathBuf>,
    warnings: Vec<String>,
    /// Per-phase step timings (`ditmoe train --profile`).
    profile: Option<StepProfile>,
    /// The device memory of each stage of [`Trainer::new`], for out-of-memory errors.
    memory: MemoryStages,
    /// The step phase last finished, which an out-of-memory error names.
    last_phase: &'static str,
    /// How this rank trains with the others (None: alone).
    parallel: Option<Parallel>,
}

/// Whether a step's gradients are sums (over micro-batches or ranks), which are taken in f32
/// ([`TrainingWeights`]); one micro-batch on one rank keeps the compute dtype.
fn sums_gradients(cfg: &TrainConfig, parallel: &Option<Parallel>) -> bool {
    cfg.accumulation() > 1 || parallel.is_some()
}

/// Whether the wall-clock budget (seconds) would run out before the next step and the final
/// save: the elapsed time plus room for a few steps like the latest one and 5 s. After the
/// run's first step only one step is reserved: that step also paid for kernel compilation and
/// loader start-up (about 88 s for a 0.45 s step on a fresh GPU machine, most of it the
/// one-time kernel compilation), and
/// reserving four of it stopped any budget under about 7.5 minutes (the bundled model's is 6)
/// after one step.
pub(crate) fn budget_runs_out(elapsed: f64, budget: f64, last_step: f64, steps_run: u64) -> bool {
    let reserve = if steps_run <= 1 { 1.0 } else { 4.0 };
    elapsed + reserve * last_step + 5.0 > budget
}

impl Trainer {
    /// Builds the model (official init from `seed`) and data stream; with `resume`, continues
    /// from the newest valid checkpoint in `<out>/checkpoints` (a fresh start if there is none,
    /// said in the warnings). A new run refuses a run folder that holds a run, unless `start`
    /// moves it aside ([`run_dir::prepare`]). `plan`: a training plan (trainable weights); its
    /// precision is the forward's and backward's, the master weights are f32 in every plan
    /// ([`TrainingWeights`]).
    pub fn new(cfg: TrainConfig, plan: &ExecutionPlan, start: RunStart) -> Result<Self> {
        let resume = start == RunStart::Resume;
        if !plan.trainable() {
            candle_core::bail!("the trainer needs a training plan (trainable weights)")
        }
        let device = &plan.device;
        cfg.validate()?;
        let mut parallel = Parallel::of_plan(plan)?;
        if let Some(p) = &parallel {
            p.check_divides(cfg.global_batch, "train config field `global_batch`:")?;
            p.check_divides(cfg.micro_batch(), "train config field `micro_batch`:")?;
        }
        let writer = parallel.as_ref().is_none_or(Parallel::writes);
        let model_cfg = cfg.model_config()?;
        // AdamW's two f32 moments, the EMA copy (unless it is on the host), and the weights with
        // their gradients: the f32 weights and gradients of an f32 plan, or in a bf16 plan the
        // f32 masters, the bf16 copies and the bf16 gradients that AdamW reads as they are (f32
        // gradients when summed over micro-batches or ranks). 16 bytes a parameter before any
        // activation in either precision, 20 with the EMA on the GPU.
        let ema_bytes = if cfg.ema_on_host { 0 } else { 4 };
        let per_param = 8 + ema_bytes + TrainingWeights::bytes_per_param(plan.weight_dtype(), sums_gradients(&cfg, &parallel));
        // Under expert parallelism a rank holds 1/EP of the routed experts.
        let ep = plan.expert_parallel_size();
        plan.check_fits("training the model (weights, gradients, optimizer state, EMA)", model_cfg.params_per_rank(ep) as u64 * per_param)?;
        let dataset = open_dataset(&cfg, &model_cfg)?;
        let class_names = dataset.class_names().to_vec();
        if writer {
            if let Some(aside) = run_dir::prepare(&cfg.out, start)? {
                eprintln!("moved the earlier run in {} aside to {}", cfg.out.display(), aside.display());
            }
            std::fs::create_dir_all(&cfg.out).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", cfg.out.display())))?;
        }

        // The model's weights in the plan's dtype; the f32 masters are initialised and loaded,
        // then copied to the model (see docs/quality.md for why the masters are not bf16).
        let mut memory = MemoryStages::new(device)?;
        let varmap = VarMap::new();
        let model = memory.stage("the model's weights", || DitMoe::new(&model_cfg, plan, VarBuilder::from_varmap(&varmap, plan.weight_dtype(), device)))?;
        let weights = memory.stage("the f32 master weights", || TrainingWeights::new(&varmap))?;
        let all_vars = weights.masters();
        memory.stage("the initialisation", || match &mut parallel {
            Some(p) if p.splits_experts() => {
                for (prefix, local) in model.blocks().iter().filter_map(|b| b.moe()?.split_experts()) {
                    p.add_split_layer(prefix, local);
                }
                // the P = 1 stream, the experts held elsewhere drawn into placeholders
                let mut all = all_vars.to_vec();
                all.extend(p.absent_experts(all_vars)?);
                all.sort_by(|a, b| a.0.cmp(&b.0));
                initialize(&all, &model_cfg, cfg.seed)
            }
            _ => initialize(all_vars, &model_cfg, cfg.seed),
        })?;
        if let Some(path) = &cfg.init_from {
            let sd = crate::checkpoint::load_state_dict(path)?;
            sd.validate(&model_cfg)?;
            for (name, var) in all_vars {
                var.set(&sd.tensors[name].to_dtype(DType::F32)?.to_device(device)?)?;
            }
        }
        let trainable: Vec<(String, Var)> = all_vars.iter().filter(|(n, _)| !is_frozen(n)).cloned().collect();
        let params = AdamWParams { weight_decay: cfg.weight_decay, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.adam_eps };
        let names: Vec<String> = trainable.iter().map(|(n, _)| n.clone()).collect();
        let mut opt = memory.stage("the optimizer's moments", || AdamW::new(trainable, params))?;
        if let Some(p) = &mut parallel {
            p.set_gradient_order(opt.vars().iter().map(|(n, _)| n.as_str()));
        }
        if let Some(copies) = weights.model_copies(&names)? {
            opt = opt.with_model_copies(copies)?;
        }
        let mut ema = memory.stage("the EMA", || Ema::new(all_vars, cfg.ema_on_host, cfg.ema_every))?;

        let (mut step, mut loader_state, mut resumed_from, mut warnings) = (0, LoaderState::default(), None, Vec::new());
        if resume {
            let (ckpt, warns) = checkpoint::load_latest(&checkpoint::checkpoints_dir(&cfg.out), device)?;
            for w in &warns {
                eprintln!("warning: {w}");
            }
            warnings = warns;
            if ckpt.is_none() {
                let w = format!("{}: no valid checkpoint to resume from, starting at step 0", checkpoint::checkpoints_dir(&cfg.out).display());
                eprintln!("warning: {w}");
                warnings.push(w);
            }
            if let Some(ckpt) = ckpt {
                if ckpt.state.seed != cfg.seed {
                    bail!("{}: checkpoint was trained with seed {}, the config says {}", ckpt.dir.display(), ckpt.state.seed, cfg.seed);
                }
                for (name, var) in all_vars {
                    let t = ckpt.model.get(name).ok_or_else(|| candle_core::Error::Msg(format!("{}: model lacks `{name}`", ckpt.dir.display())))?;
                    if t.dims() != var.dims() {
                        bail!("{}: `{name}` has shape {:?}, the model {:?}", ckpt.dir.display(), t.dims(), var.dims());
                    }
                    var.set(t)?;
                }
                ema.load(&ckpt.ema)?;
                opt.load_state(&ckpt.optim, ckpt.state.step)?;
                step = ckpt.state.step;
                loader_state = ckpt.state.loader;
                resumed_from = Some(ckpt.dir);
            }
        }
        weights.sync()?;

        let mut lcfg = LoaderConfig::new(cfg.micro_batch(), cfg.seed);
        if let Some(w) = cfg.num_workers {
            lcfg.num_workers = w;
        }
        let loader = memory.stage("the data loader", || DataLoader::new(dataset, lcfg, loader_state, device))?;
        let loss = match cfg.objective {
            Objective::Ddpm => Loss::Ddpm(Box::new(GaussianDiffusion::create("", model_cfg.learn_sigma)?)),
            Objective::Rf => Loss::Rf(RectifiedFlow::flow_matching(model_cfg.learn_sigma, 1.0, model_cfg.flow_time_scale())?),
        };
        Ok(Self { cfg, model_cfg, plan: plan.clone(), device: device.clone(), model, weights, opt, ema, loader, loss, class_names, step, resumed_from, warnings, profile: None, parallel, memory, last_phase: "start" })
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Times every phase of each step from now on (the device is synchronised between phases).
    pub fn enable_profile(&mut self) {
        self.profile = Some(StepProfile::new(&self.device));
    }

    /// The per-phase timings, when [`Trainer::enable_profile`] was called.
    pub fn profile(&self) -> Option<&StepProfile> {
        self.profile.as_ref()
    }

    /// Where device memory went before the first step (`--profile` prints it).
    pub fn memory_stages(&self) -> &MemoryStages {
        &self.memory
    }

    fn mark(&mut self, phase: &'static str) -> Result<()> {
        self.last_phase = phase;
        match &mut self.profile {
            Some(p) => p.mark(phase),
            None => Ok(()),
        }
    }

    pub fn model_config(&self) -> &DitConfig {
        &self.model_cfg
    }

    /// One micro-batch: returns (loss + balance loss + contrastive loss scaled by 1/accum,
    /// diffusion loss, balance loss, contrastive loss, expert counts, and with `recompute` the
    /// blocks' tape that the backward continues through).
    fn micro_step(&mut self, step: u64, micro: usize) -> Result<MicroStep> {
        let batch = self.loader.next_batch()?;
        self.mark("data")?;
        let seed = self.cfg.seed;
        // Every draw is the whole micro-batch's, as on one device; a rank keeps its rows.
        let slice = |t: Tensor| match &self.parallel {
            Some(p) => p.slice(&t),
            None => Ok(t),
        };
        let (x, n) = (batch.x, batch.y.dim(0)?);
        let labels = batch.y.to_vec1::<u32>()?;
        let labels = drop_labels(&mut step_rng(seed, step, micro, Stream::LabelDrop), &labels, self.model_cfg.class_dropout_prob, self.model_cfg.null_class() as u32);
        let y = slice(Tensor::from_vec(labels, n, &self.device)?)?;
        let noise = slice(randn(&mut step_rng(seed, step, micro, Stream::Noise), x.dims(), &self.device)?)?;
        let x = slice(x)?;
        let mut trng = step_rng(seed, step, micro, Stream::Time);
        let times = match &self.loss {
            Loss::Rf(_) => slice(randn(&mut trng, &[n], &self.device)?)?,
            // Official: `t = torch.randint(0, diffusion.num_timesteps, (N,))`.
            Loss::Ddpm(d) => slice(Tensor::from_vec((0..n).map(|_| trng.random_range(0..d.num_timesteps()) as u32).collect::<Vec<_>>(), n, &self.device)?)?,
        };
        let n = y.dim(0)?;
        let mut routed = None;
        let mut tape = None;
        let mut call = |xt: &Tensor, t: &Tensor| -> Result<Tensor> {
            let o = match self.cfg.recompute {
                true => {
                    let (o, blocks) = self.model.forward_recomputed(xt, t, &y)?;
                    tape = Some(blocks);
                    o
                }
                false => self.model.forward_full(xt, t, &y, ForwardMode::Train, &mut Trace::default())?,
            };
            routed = Some((o.aux_losses.clone(), o.contrastive_losses.clone(), o.expert_counts_host()?));
            Ok(o.out)
        };
        let loss = match &self.loss {
            Loss::Rf(rf) => rf.training_losses(&x, &times, &noise, &mut call)?.loss,
            Loss::Ddpm(d) => {
                let t: Vec<usize> = times.to_vec1::<u32>()?.into_iter().map(|t| t as usize).collect();
                d.training_losses(&x, &t, &noise, |xt, mt| {
                    let tt = Tensor::from_vec(mt.iter().map(|&v| v as f32).collect::<Vec<_>>(), n, &self.device)?;
                    call(xt, &tt)
                })?
                .loss
                .mean_all()?
            }
        };
        let (aux_losses, contrastive_losses, counts) = routed.expect("the loss calls the model");
        let sum = |losses: &[Tensor]| -> Result<Tensor> {
            match losses.len() {
                0 => Tensor::zeros((), DType::F32, &self.device),
                _ => Tensor::stack(&losses.iter().map(|a| a.to_dtype(DType::F32)?.reshape(())).collect::<Result<Vec<_>>>()?, 0)?.sum_all(),
            }
        };
        let aux = sum(&aux_losses)?;
        // ProMoE's routing contrastive loss (lambda already applied), beside the balance loss.
        let contrastive = sum(&contrastive_losses)?;
        let total = (((&loss + &aux)? + &contrastive)? * self.loss_scale())?;
        let step = (total, loss.to_scalar::<f32>()?, aux.to_scalar::<f32>()?, contrastive.to_scalar::<f32>()?, counts, tape);
        self.mark("forward + losses")?;
        Ok(step)
    }

    /// The factor on a micro-batch's losses: `1 / accumulation`, and a rank's share `1 / P`.
    fn loss_scale(&self) -> f64 {
        self.parallel.as_ref().map_or(1.0, Parallel::share) / self.cfg.accumulation() as f64
    }

    /// One optimizer step: accumulate gradients over the micro-batches, check the loss and
    /// gradient norm are finite, clip, update, EMA. [`Self::run`] calls it between its logs and
    /// checkpoints; benchmarks call it alone (`examples/bench_train`).
    pub fn train_step(&mut self) -> Result<StepLog> {
        self.last_phase = "start";
        self.step_phases().map_err(|e| {
            let during = format!("in training step {} after its `{}` phase (micro-batch {})", self.step + 1, self.last_phase, self.cfg.micro_batch());
            self.memory.explain(&during, e)
        })
    }

    fn step_phases(&mut self) -> Result<StepLog> {
        let step = self.step + 1;
        let accum = self.cfg.accumulation();
        let (mut loss_sum, mut aux_sum, mut con_sum) = (0f32, 0f32, 0f32);
        let mut counts: Vec<Vec<usize>> = Vec::new();
        let mut grads: Vec<Tensor> = Vec::new();
        if let Some(p) = &mut self.profile {
            p.start_step()?;
        }
        for micro in 0..accum {
            let (total, loss, aux, con, c, tape) = self.micro_step(step, micro)?;
            if !loss.is_finite() || !aux.is_finite() || !con.is_finite() {
                bail!("non-finite loss at step {step} (loss {loss}, balance loss {aux}, contrastive loss {con})");
            }
            loss_sum += loss;
            aux_sum += aux;
            con_sum += con;
            if counts.is_empty() {
                counts = c;
            } else {
                for (acc, layer) in counts.iter_mut().zip(c) {
                    acc.iter_mut().zip(layer).for_each(|(a, b)| *a += b);
                }
            }
            let mut store = total.backward()?;
            if let Some(tape) = tape {
                tape.backward(&self.model, &mut store, self.loss_scale())?;
            }
            self.mark("backward")?;
            // One micro-batch's gradients on one rank stay in the compute dtype: AdamW widens
            // them as it reads them. A sum over micro-batches or ranks is taken in f32
            // ([`TrainingWeights`]).
            let f32_grads = sums_gradients(&self.cfg, &self.parallel);
            for (i, (name, _)) in self.opt.vars().iter().enumerate() {
                // A parameter no expert token reached this pass has no gradient: zero.
                // Contiguous: the fused optimizer kernels take flat tensors (a matmul weight's
                // gradient arrives transposed).
                let g = match self.weights.take_grad(&mut store, name, f32_grads)? {
                    Some(g) => g,
                    None => self.weights.zero_grad(name, f32_grads)?,
                };
                if micro == 0 {
                    grads.push(g);
                } else {
                    grads[i] = (&grads[i] + g)?;
                }
            }
            self.mark("gradients collected")?;
            // Freeing the step's activations and autograd graph (one device free per tensor)
            // is a cost of its own: charge it to its own phase.
            drop(store);
            drop(total);
            self.mark("autograd graph freed")?;
        }
        let (grads, grad_norm) = match &self.parallel {
            Some(p) => {
                let grads = p.reduce_gradients(grads)?;
                let norm = p.global_norm_sq(&grads)?.sqrt();
                self.mark("gradients reduced")?;
                (grads, norm)
            }
            None => {
                let norm = sum_of_squares(&grads)?.sqrt();
                (grads, norm)
            }
        };
        if !grad_norm.is_finite() {
            bail!("non-finite gradient norm at step {step}");
        }
        self.mark("grad norm")?;
        // `clip_grad_norm_`: scale by max / (norm + 1e-6) when that is below 1 (the scaling
        // happens inside the AdamW update).
        let grad_scale = self.cfg.max_grad_norm.map(|max| max / (grad_norm as f64 + 1e-6)).filter(|&c| c < 1.0);
        let lr = self.cfg.lr_at(step);
        // The update frees each group's gradients as it finishes it, and writes the model's
        // bf16 copies of a bf16 plan itself.
        self.opt.step(grads, lr, grad_scale)?;
        self.mark("AdamW")?;
        self.ema.step(self.weights.masters(), self.cfg.ema_decay_at(step), step)?;
        self.mark("EMA")?;
        if let Some(p) = &mut self.profile {
            p.end_step()?;
        }
        self.step = step;
        let [loss, aux, contrastive] = match &self.parallel {
            Some(p) => {
                // the means over the ranks, and the global batch's expert counts
                let share = |v: f32| Tensor::new(v * p.share() as f32, &self.device);
                counts = p.sum_counts(&counts)?;
                let sums = p.sum_scalars(&[share(loss_sum)?, share(aux_sum)?, share(con_sum)?])?;
                [sums[0], sums[1], sums[2]]
            }
            None => [loss_sum, aux_sum, con_sum],
        }
        .map(|v| v / accum as f32);
        Ok(StepLog {
            step,
            loss,
            aux,
            contrastive,
            grad_norm,
            lr,
            steps_per_sec: 0.0,
            expert_counts: counts,
        })
    }

    /// Whether this rank writes the run's files (rank 0, or the only rank).
    fn writes(&self) -> bool {
        self.parallel.as_ref().is_none_or(Parallel::writes)
    }

    /// `tensors` with every expert under its global name, on the rank that writes (gathered
    /// under expert parallelism, a collective); None on the others.
    fn gathered(&self, tensors: Vec<(String, Tensor)>) -> Result<Option<Vec<(String, Tensor)>>> {
        match &self.parallel {
            Some(p) => Ok(p.gather_experts(tensors)?.filter(|_| p.writes())),
            None => Ok(Some(tensors)),
        }
    }

    /// Writes a checkpoint in the single-device format (rank 0; under expert parallelism a
    /// collective).
    fn save_checkpoint(&mut self) -> Result<()> {
        self.ema.flush(self.weights.masters())?;
        let tensors = |vars: &[(String, Var)]| vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect::<Vec<_>>();
        let model = self.gathered(tensors(self.weights.masters()))?;
        let ema = self.gathered(self.ema.tensors()?)?;
        let optim = self.gathered(self.opt.state_tensors())?;
        let (Some(model), Some(ema), Some(optim)) = (model, ema, optim) else { return Ok(()) };
        let req = SaveRequest { step: self.step, loader: self.loader.state(), seed: self.cfg.seed, model: &model, ema: &ema, optim: &optim };
        checkpoint::save(&checkpoint::checkpoints_dir(&self.cfg.out), &req, self.cfg.keep_last)?;
        Ok(())
    }

    /// Writes the EMA weights as a model folder (`ditmoe generate --model` reads it), with the
    /// `generate.json` that samples it by its objective: a rectified-flow model under a DDPM
    /// sampler gives noise. Rank 0 writes it; under expert parallelism a collective (the
    /// experts gathered under their global names into the single-device layout).
    pub fn export_ema(&mut self, dir: &Path) -> Result<()> {
        self.ema.flush(self.weights.masters())?;
        let Some(ema) = self.gathered(self.ema.tensors()?)? else { return Ok(()) };
        std::fs::create_dir_all(dir).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", dir.display())))?;
        write_safetensors_atomic(&dir.join("model.safetensors"), &ema)?;
        write_atomic(&dir.join("config.json"), self.model_cfg.to_json().as_bytes())?;
        let names = serde_json::to_string(&self.class_names).expect("names serialise");
        write_atomic(&dir.join("class_names.json"), names.as_bytes())?;
        let sampler = match self.cfg.objective {
            Objective::Rf => SamplerKind::Euler,
            Objective::Ddpm => SamplerKind::Ddpm,
        };
        // guidance needs the null class, which exists only when labels were dropped in training
        let cfg_scale = if self.model_cfg.class_dropout_prob > 0.0 { 4.0 } else { 1.0 };
        let defaults = serde_json::json!({"sampler": sampler.name(), "steps": sampler.official_steps(), "cfg_scale": cfg_scale});
        write_atomic(&dir.join("generate.json"), defaults.to_string().as_bytes())
    }

    /// A class grid from the EMA weights into `<out>/samples/step-<step>.png` (rank 0). Under
    /// expert parallelism every rank samples the same grid (the forward is a collective) on its
    /// own experts' EMA, and rank 0 writes it.
    fn write_samples(&mut self) -> Result<()> {
        self.ema.flush(self.weights.masters())?;
        let splits = self.parallel.as_ref().is_some_and(Parallel::splits_experts);
        if !self.writes() && !splits {
            return Ok(());
        }
        let grid = sample_grid(&self.model_cfg, self.cfg.objective, &self.ema.tensors()?, self.cfg.seed, &self.plan.frozen())?;
        if !self.writes() {
            return Ok(());
        }
        let dir = self.cfg.out.join("samples");
        std::fs::create_dir_all(&dir).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", dir.display())))?;
        grid.write_png(&dir.join(format!("step-{:08}.png", self.step)))
    }

    /// Trains until `steps` or the time budget; saves a checkpoint every `ckpt_every` steps and
    /// at the end, then exports the EMA model to `<out>/ema`. A non-finite loss or gradient
    /// stops with an error naming the step; the checkpoints already written are untouched.
    pub fn run(&mut self, progress: bool) -> Result<RunSummary> {
        let start = Instant::now();
        let budget = self.cfg.max_minutes.map(|m| m * 60.0);
        let mut log = if self.writes() { Some(JsonlLog::open(&self.cfg.out, self.step)?) } else { None };
        let bar = if progress && self.writes() { crate::progress::bar(self.cfg.steps) } else { ProgressBar::hidden() };
        bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("template"));
        bar.set_position(self.step);
        let mut records = Vec::new();
        let mut stop = StopReason::Steps;
        let (mut last_log_time, mut last_log_step) = (Instant::now(), self.step);
        // Duration of the latest step: the first one also pays for kernel compilation and
        // loader start-up, so the slowest step would overstate what the next one costs.
        let mut last_step = 0f64;
        let mut saved_step = None;
        let mut steps_run = 0u64;
        while self.step < self.cfg.steps {
            let out_of_time = budget.is_some_and(|b| budget_runs_out(start.elapsed().as_secs_f64(), b, last_step, steps_run));
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
            let mut rec = self.train_step()?;
            last_step = t0.elapsed().as_secs_f64();
            if rec.step.is_multiple_of(self.cfg.log_every) {
                rec.steps_per_sec = (rec.step - last_log_step) as f64 / last_log_time.elapsed().as_secs_f64();
                (last_log_time, last_log_step) = (Instant::now(), rec.step);
                if let Some(log) = &mut log {
                    log.write(&rec)?;
                }
                let con = if self.model_cfg.promoe.is_some() { format!(" con {:.4}", rec.contrastive) } else { String::new() };
                bar.set_message(format!("loss {:.4} aux {:.4}{con} |g| {:.3} {:.2} it/s", rec.loss, rec.aux, rec.grad_norm, rec.steps_per_sec));
            }
            bar.set_position(self.step);
            if self.cfg.sample_every > 0 && self.step.is_multiple_of(self.cfg.sample_every) {
                self.write_samples()?;
            }
            if self.step.is_multiple_of(self.cfg.ckpt_every) {
                self.save_checkpoint()?;
                saved_step = Some(self.step);
            }
            records.push(rec);
        }
        if saved_step != Some(self.step) {
            self.save_checkpoint()?;
        }
        let ema_dir = self.cfg.out.join("ema");
        self.export_ema(&ema_dir)?;
        bar.finish();
        Ok(RunSummary { steps: records, final_step: self.step, stop, resumed_from: self.resumed_from.clone(), warnings: self.warnings.clone(), ema_dir })
    }
}

#[cfg(test)]
mod tests {
    use super::budget_runs_out;

    #[test]
    fn a_slow_first_step_does_not_end_a_short_budget() {
        // a 45 s first step (compilation) in a 180 s budget: one more step fits
        assert!(!budget_runs_out(45.0, 180.0, 45.0, 1));
        // later steps reserve four of the latest: stop when they would not fit
        assert!(!budget_runs_out(100.0, 180.0, 0.5, 40));
        assert!(budget_runs_out(170.0, 180.0, 2.0, 40));
        // a slow first step that leaves no room for a second one still stops
        assert!(budget_runs_out(100.0, 180.0, 100.0, 1));
        // before any step: only the save margin
        assert!(!budget_runs_out(0.0, 180.0, 0.0, 0));
        assert!(budget_runs_out(176.0, 180.0, 0.0, 0));
    }
}
