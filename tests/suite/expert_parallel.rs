//! Expert parallelism on the in-process backend: P ranks as threads of this process
//! (`ditmoe::dist::LocalGroup`), each building the MoE layer with only its block of the routed
//! experts (under their global names) and running its own slice of the tokens, against the
//! single-device layer on all the tokens. Outputs, expert choices and gradients must agree:
//! the input's per rank, the experts' on their owner, and the replicated weights' (router,
//! shared expert) after the data-parallel all-reduce. And a failing rank must make its peers
//! fail with an error, not hang.
use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::rel_err;
use ditmoe::dist::{all_reduce_gradients, Communicator, ExpertParallel, LocalComm, LocalGroup};
use ditmoe::moe::{BalanceForm, BalanceLossConfig, ExpertForm, MoeConfig, MoeInput, MoeLayer, RouterConfig};
use ditmoe::{ExecutionPlan, Precision};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const D: usize = 16;
const E: usize = 4;
/// Every rank's token count, per world size: uneven, and at P = 4 a rank without tokens.
const SPLITS: [&[usize]; 3] = [&[31], &[22, 9], &[5, 0, 17, 9]];
const TOL: f64 = 1e-5;
/// Draws of weights and tokens per case and world size (each a different routing).
const SEEDS: u64 = 16;

/// A layer of `form` with `top_k` experts per token and a shared expert of width `shared`
/// (0: none). Top-2 layers renormalise the gate weights when `norm` (the language models) or
/// not (DiT-MoE); `shared_gate` adds Qwen2-MoE's sigmoid gate on the shared expert.
fn config(form: ExpertForm, top_k: usize, shared: usize) -> MoeConfig {
    lm_config(form, top_k, shared, top_k > 1, false)
}

fn lm_config(form: ExpertForm, top_k: usize, shared: usize, norm: bool, shared_gate: bool) -> MoeConfig {
    MoeConfig {
        hidden_size: D,
        num_experts: E,
        top_k,
        expert_intermediate_size: 24,
        expert_form: form,
        shared_expert_intermediate_size: shared,
        shared_expert_gate: shared_gate,
        residual_intermediate_size: 0,
        router: RouterConfig::TopK { norm_topk_prob: norm },
        balance_loss: BalanceLossConfig { coefficient: 0.01, form: BalanceForm::Batch },
        capacity: Default::default(),
        names: Default::default(),
    }
}

/// Normal samples from a fixed seed (xorshift64* and Box-Muller), so that every run checks the
/// same routings.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self, std: f64, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (std * (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()) as f32).collect();
        Tensor::from_vec(v, shape, &cpu()).unwrap()
    }
}

fn cpu() -> Device {
    Device::Cpu
}

fn training() -> ExecutionPlan {
    ExecutionPlan::training(&cpu(), Precision::F32)
}

fn vars(vm: &VarMap) -> BTreeMap<String, Var> {
    vm.data().lock().unwrap().iter().map(|(n, v)| (n.clone(), v.clone())).collect()
}

fn is_expert(name: &str) -> bool {
    name.starts_with("experts.")
}

/// The single-device layer with random weights, and the weights by name. With `starve`, the
/// last expert's router row points away from every token's constant first feature, so no
/// token picks it (and at P = 4 its owner receives no rows).
fn reference(cfg: &MoeConfig, starve: bool, rng: &mut Rng) -> (MoeLayer, BTreeMap<String, Tensor>) {
    let vm = VarMap::new();
    let layer = MoeLayer::new(cfg, &training(), VarBuilder::from_varmap(&vm, DType::F32, &cpu())).unwrap();
    let mut weights = BTreeMap::new();
    for (name, var) in vars(&vm) {
        let fan_in = if name.ends_with("bias") { 9 } else { var.dims()[1] };
        let mut w = rng.normal((1.0 / fan_in as f64).sqrt(), var.dims());
        if starve && name == "gate.weight" {
            let mut rows = w.to_vec2::<f32>().unwrap();
            rows[E - 1][0] = -8.0;
            w = Tensor::new(rows, &cpu()).unwrap();
        }
        var.set(&w).unwrap();
        weights.insert(name, w);
    }
    (layer, weights)
}

/// Tokens whose first feature is a constant 4 (what `starve` keys on).
fn tokens(s: usize, rng: &mut Rng) -> Tensor {
    let x = rng.normal(1.0, &[s, D]);
    Tensor::cat(&[&Tensor::full(4f32, (s, 1), &cpu()).unwrap(), &x.narrow(1, 1, D - 1).unwrap()], 1).unwrap()
}

/// What the single-device layer gives for all the tokens: output, choices, the gradients of
/// `<out, probe>` (input and every parameter; zeros for an expert without tokens).
struct Want {
    out: Tensor,
    ids: Vec<Vec<u32>>,
    dx: Tensor,
    grads: BTreeMap<String, Tensor>,
}

fn single_device(layer: &MoeLayer, weights: &BTreeMap<String, Tensor>, x: &Tensor, probe: &Tensor) -> Result<(Want, BTreeMap<String, Var>)> {
    // a fresh VarMap holding the same weights, so the gradients are this forward's only
    let vm = VarMap::new();
    let layer = MoeLayer::new(layer.config(), &training(), VarBuilder::from_varmap(&vm, DType::F32, &cpu()))?;
    let vs = vars(&vm);
    for (n, v) in &vs {
        v.set(&weights[n])?;
    }
    let xv = Var::from_tensor(x)?;
    let o = layer.forward(&MoeInput { tokens: xv.as_tensor(), seq_len: 1, unconditional: None, train: true })?;
    let g = (&o.out * probe)?.sum_all()?.backward()?;
    let grads = vs.iter().map(|(n, v)| (n.clone(), g.get(v).cloned().unwrap_or_else(|| v.zeros_like().unwrap()))).collect();
    let want = Want { out: o.out.detach(), ids: o.routing.experts.to_vec2()?, dx: g.get(&xv).expect("input gradient").clone(), grads };
    Ok((want, vs))
}

/// What one rank computes: its tokens' outputs, choices and input gradient, its balance loss,
/// its experts' gradients and the all-reduced gradients of the replicated weights.
struct RankOut {
    out: Tensor,
    ids: Vec<Vec<u32>>,
    dx: Tensor,
    aux: f32,
    names: BTreeSet<String>,
    grads: BTreeMap<String, Tensor>,
}

/// The dispatch the ranks run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// The dropless all-to-all.
    AllToAll,
    /// The static dispatch with this capacity per (rank, expert).
    Static(usize),
    /// The all-gather + reduce-scatter baseline.
    AllGather,
}

impl Mode {
    fn expert_parallel(self, comm: Arc<dyn Communicator>) -> ExpertParallel {
        let ep = ExpertParallel::new(comm);
        match self {
            Self::AllToAll => ep,
            Self::Static(c) => ep.with_static_capacity(c),
            Self::AllGather => ep.with_all_gather(),
        }
    }

    /// `plan` with this dispatch over `comm`.
    fn plan(self, plan: &ExecutionPlan, comm: Arc<dyn Communicator>) -> ExecutionPlan {
        ExecutionPlan { expert_parallel: Some(self.expert_parallel(comm)), ..plan.clone() }
    }
}

/// One rank: the layer from its share of the weights, forward on its tokens in training mode,
/// backward of `<out, probe>`, the data-parallel all-reduce of the replicated gradients, and
/// the static dispatch's capacity check.
fn rank(comm: LocalComm, cfg: &MoeConfig, weights: &BTreeMap<String, Tensor>, x: Tensor, probe: Tensor, mode: Mode) -> Result<RankOut> {
    let comm: Arc<dyn Communicator> = Arc::new(comm);
    let plan = mode.plan(&training(), comm.clone());
    let vm = VarMap::new();
    let layer = MoeLayer::new(cfg, &plan, VarBuilder::from_varmap(&vm, DType::F32, &cpu()))?;
    let vs = vars(&vm);
    for (n, v) in &vs {
        v.set(&weights[n])?;
    }
    let xv = Var::from_tensor(&x)?;
    let o = layer.forward(&MoeInput { tokens: xv.as_tensor(), seq_len: 1, unconditional: None, train: true })?;
    let g = (&o.out * &probe)?.sum_all()?.backward()?;
    let grad = |v: &Var| g.get(v).cloned().unwrap_or_else(|| v.zeros_like().unwrap());
    let replicated: Vec<(&String, &Var)> = vs.iter().filter(|(n, _)| !is_expert(n)).collect();
    let reduced = all_reduce_gradients(comm.as_ref(), &replicated.iter().map(|(_, v)| grad(v)).collect::<Vec<_>>())?;
    let mut grads: BTreeMap<String, Tensor> = replicated.iter().map(|(n, _)| (*n).clone()).zip(reduced).collect();
    grads.extend(vs.iter().filter(|(n, _)| is_expert(n)).map(|(n, v)| (n.clone(), grad(v))));
    let dx = g.get(&xv).cloned().unwrap_or_else(|| x.zeros_like().unwrap());
    plan.expert_parallel.as_ref().expect("expert parallel").check_capacity()?;
    Ok(RankOut { out: o.out.detach(), ids: o.routing.experts.to_vec2()?, dx, aux: o.aux_loss.expect("balance loss").to_scalar()?, names: vs.into_keys().collect(), grads })
}

/// The largest relative errors of one run: output, input gradient, replicated gradients,
/// expert gradients.
#[derive(Debug, Default, Clone, Copy)]
struct Errors {
    out: f64,
    dx: f64,
    replicated: f64,
    experts: f64,
}

/// Runs the layer over `splits.len()` ranks with `mode`'s dispatch and checks it against the
/// single-device layer, on the weights and tokens drawn from `seed`; the errors and what each
/// rank computed.
fn check(tag: &str, cfg: &MoeConfig, starve: bool, splits: &[usize], seed: u64, mode: Mode) -> (Errors, Vec<RankOut>) {
    let rng = &mut Rng(seed);
    let (layer, weights) = reference(cfg, starve, rng);
    let s: usize = splits.iter().sum();
    let (x, probe) = (tokens(s, rng), rng.normal(1.0, &[s, D]));
    let (want, _) = single_device(&layer, &weights, &x, &probe).unwrap();
    if starve {
        assert!(want.ids.iter().flatten().all(|&e| e != E as u32 - 1), "{tag}: expert {} gets no tokens", E - 1);
    }
    let p = splits.len();
    let starts: Vec<usize> = splits.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
    let ranks: Vec<RankOut> = std::thread::scope(|scope| {
        let handles: Vec<_> = LocalGroup::new(p)
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                let (x, probe) = (x.narrow(0, starts[r], splits[r]).unwrap(), probe.narrow(0, starts[r], splits[r]).unwrap());
                let (cfg, weights) = (cfg, &weights);
                scope.spawn(move || rank(comm, cfg, weights, x, probe, mode))
            })
            .collect();
        handles.into_iter().enumerate().map(|(r, h)| h.join().unwrap().unwrap_or_else(|e| panic!("{tag} P={p}: rank {r}: {e}"))).collect()
    });

    // each rank holds the replicated weights and its own block of experts, by global name
    let per = E / p;
    for (r, out) in ranks.iter().enumerate() {
        let own = |n: &str| !is_expert(n) || (r * per..(r + 1) * per).any(|e| n.starts_with(&format!("experts.{e}.")));
        let want_names: BTreeSet<String> = weights.keys().filter(|n| own(n)).cloned().collect();
        assert_eq!(out.names, want_names, "{tag} P={p}: rank {r}'s parameters");
    }
    let cat = |f: &dyn Fn(&RankOut) -> Tensor| Tensor::cat(&ranks.iter().map(f).collect::<Vec<_>>(), 0).unwrap();
    let ids: Vec<Vec<u32>> = ranks.iter().flat_map(|r| r.ids.clone()).collect();
    assert_eq!(ids, want.ids, "{tag} P={p}: expert choices");
    let mut errs = Errors { out: rel_err(&cat(&|r| r.out.clone()), &want.out), dx: rel_err(&cat(&|r| r.dx.clone()), &want.dx), ..Default::default() };
    for (name, w) in &want.grads {
        if is_expert(name) {
            let owner = ranks.iter().find(|r| r.grads.contains_key(name)).unwrap_or_else(|| panic!("{tag} P={p}: no rank has {name}"));
            errs.experts = errs.experts.max(rel_err(&owner.grads[name], w));
        } else {
            // the all-reduce gives every rank the same sum
            for r in &ranks[1..] {
                assert_eq!(r.grads[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(), ranks[0].grads[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{tag} P={p}: all-reduced {name}");
            }
            errs.replicated = errs.replicated.max(rel_err(&ranks[0].grads[name], w));
        }
    }
    // each rank's balance loss is the single-device loss of its own tokens (0 without tokens)
    for (r, out) in ranks.iter().enumerate() {
        let own = match splits[r] {
            0 => 0.0,
            n => layer.forward(&MoeInput { tokens: &x.narrow(0, starts[r], n).unwrap(), seq_len: 1, unconditional: None, train: true }).unwrap().aux_loss.unwrap().to_scalar::<f32>().unwrap(),
        };
        assert!((out.aux - own).abs() <= 1e-6 * own.abs().max(1e-3), "{tag} P={p}: rank {r}'s balance loss {} vs {own}", out.aux);
    }
    if p == 1 {
        // one rank is the single-device layer itself
        assert!(errs.out == 0.0 && errs.dx == 0.0 && errs.replicated == 0.0 && errs.experts == 0.0, "{tag} P=1: {errs:?}");
    }
    for (what, e) in [("output", errs.out), ("input gradient", errs.dx), ("replicated gradients", errs.replicated), ("expert gradients", errs.experts)] {
        assert!(e <= TOL, "{tag} P={p} {mode:?}: {what}: relative error {e:.3e} > {TOL:.0e}");
    }
    (errs, ranks)
}

/// [`check`] at P = 1, 2, 4, each on [`SEEDS`] draws of weights and tokens; prints the largest
/// errors per P (`cargo test --test suite expert_parallel:: -- --nocapture` shows the table).
fn check_all(tag: &str, cfg: &MoeConfig, starve: bool) {
    for splits in SPLITS {
        let worst = (1..=SEEDS).map(|seed| check(tag, cfg, starve, splits, seed, Mode::AllToAll).0).fold(Errors::default(), |a, e| Errors {
            out: a.out.max(e.out),
            dx: a.dx.max(e.dx),
            replicated: a.replicated.max(e.replicated),
            experts: a.experts.max(e.experts),
        });
        println!("| {} | {tag} | {:.1e} | {:.1e} | {:.1e} | {:.1e} |", splits.len(), worst.out, worst.dx, worst.replicated, worst.experts);
    }
}

#[test]
fn swiglu_top1_without_shared_expert() {
    check_all("swiglu top-1", &config(ExpertForm::Swiglu, 1, 0), false);
}

#[test]
fn swiglu_top2_with_shared_expert() {
    check_all("swiglu top-2 shared", &config(ExpertForm::Swiglu, 2, 20), false);
    check_all("swiglu top-2 unnormalised shared (DiT)", &lm_config(ExpertForm::Swiglu, 2, 20, false, false), false);
    check_all("swiglu top-2 gated shared (Qwen2)", &lm_config(ExpertForm::Swiglu, 2, 20, true, true), false);
}

#[test]
fn gelu_top2_without_shared_expert() {
    check_all("gelu-tanh top-2", &config(ExpertForm::GeluBias, 2, 0), false);
}

#[test]
fn gelu_top1_with_shared_expert() {
    check_all("gelu-erf top-1 shared", &config(ExpertForm::GeluErfBias, 1, 20), false);
}

/// No token picks the last expert: at P = 4 its owner receives no rows, and its gradients are
/// zero on every layout.
#[test]
fn an_expert_without_tokens() {
    check_all("swiglu top-2 shared, starved", &config(ExpertForm::Swiglu, 2, 20), true);
    check_all("gelu-tanh top-1, starved", &config(ExpertForm::GeluBias, 1, 0), true);
}

#[test]
fn experts_must_split_evenly_over_the_ranks() {
    let comm: Arc<dyn Communicator> = Arc::new(LocalGroup::new(3).remove(0));
    let err = MoeLayer::new(&config(ExpertForm::Swiglu, 2, 0), &training().with_expert_parallel(comm), VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu())).unwrap_err().to_string();
    assert!(err.contains("4 experts do not split evenly over 3 ranks"), "{err}");
}

/// Runs `body` on every rank of a fresh group, in threads; each rank's result, and how long
/// the slowest took.
fn on_ranks<T: Send>(comms: Vec<LocalComm>, body: impl Fn(usize, LocalComm) -> Result<T> + Sync) -> (Vec<std::thread::Result<Result<T>>>, Duration) {
    let start = Instant::now();
    let body = &body;
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = comms.into_iter().enumerate().map(|(r, c)| scope.spawn(move || body(r, c))).collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    (results, start.elapsed())
}

/// An expert-parallel forward and backward of a layer over `comm`'s group.
fn ep_step(comm: LocalComm, weights: &BTreeMap<String, Tensor>, cfg: &MoeConfig, backward: bool) -> Result<()> {
    let comm: Arc<dyn Communicator> = Arc::new(comm);
    let vm = VarMap::new();
    let layer = MoeLayer::new(cfg, &training().with_expert_parallel(comm), VarBuilder::from_varmap(&vm, DType::F32, &cpu()))?;
    for (n, v) in vars(&vm) {
        v.set(&weights[&n])?;
    }
    let x = Var::from_tensor(&tokens(6, &mut Rng(11)))?;
    let o = layer.forward(&MoeInput { tokens: x.as_tensor(), seq_len: 1, unconditional: None, train: true })?;
    if backward {
        o.out.sum_all()?.backward()?;
    }
    Ok(())
}

/// A rank that returns with an error before a collective (in the forward, or between the
/// forward and the backward) makes every peer's collective fail at once, not wait.
#[test]
fn a_rank_that_returns_early_fails_its_peers() {
    let cfg = config(ExpertForm::Swiglu, 2, 0);
    let (_, weights) = reference(&cfg, false, &mut Rng(7));
    for forward_first in [false, true] {
        let (results, took) = on_ranks(LocalGroup::new(4), |r, comm| match (r, forward_first) {
            (1, false) => candle_core::bail!("rank 1 failed before its forward"),
            (1, true) => {
                ep_step(comm, &weights, &cfg, false)?;
                candle_core::bail!("rank 1 failed before its backward")
            }
            _ => ep_step(comm, &weights, &cfg, true),
        });
        assert!(took < Duration::from_secs(5), "the peers failed after {took:?}");
        for (r, res) in results.into_iter().enumerate() {
            let err = res.expect("no panic").expect_err("every rank fails").to_string();
            let want = if r == 1 { "rank 1 failed" } else { "rank 1 left the group" };
            assert!(err.contains(want), "forward first {forward_first}, rank {r}: {err}");
        }
    }
}

/// A rank that panics aborts the group: its peers' collectives return errors.
#[test]
fn a_panicking_rank_fails_its_peers() {
    let (results, took) = on_ranks(LocalGroup::new(3), |r, comm| {
        if r == 2 {
            panic!("rank 2 panics on purpose");
        }
        comm.barrier()?;
        comm.all_gather_counts(&[r])
    });
    assert!(took < Duration::from_secs(5), "the peers failed after {took:?}");
    let mut results = results.into_iter();
    for r in 0..2 {
        let err = results.next().unwrap().expect("no panic").expect_err("the barrier fails").to_string();
        assert!(err.contains("rank 2 panicked"), "rank {r}: {err}");
    }
    assert!(results.next().unwrap().is_err(), "rank 2 panicked");
}

/// A rank that stays but never calls makes its peers fail after the group's timeout.
#[test]
fn a_silent_rank_times_out() {
    let (results, took) = on_ranks(LocalGroup::with_timeout(2, Duration::from_millis(200)), |r, comm| {
        match r {
            0 => std::thread::sleep(Duration::from_millis(1500)),
            _ => comm.barrier()?,
        }
        drop(comm);
        Ok(())
    });
    let err = results[1].as_ref().expect("no panic").as_ref().expect_err("the barrier times out").to_string();
    assert!(err.contains("waited") && err.contains("for rank 0 in barrier"), "{err}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// Ranks that call different collectives, or all-to-alls whose splits disagree, get errors.
#[test]
fn mismatched_collectives_are_errors() {
    let (results, _) = on_ranks(LocalGroup::new(2), |r, comm| match r {
        0 => comm.barrier(),
        _ => comm.all_gather_counts(&[1, 2]).map(|_| ()),
    });
    for res in results {
        let err = res.expect("no panic").expect_err("a mismatch").to_string();
        assert!(err.contains("rank 0 called barrier"), "{err}");
    }
    let (results, _) = on_ranks(LocalGroup::new(2), |r, comm| {
        let send = Tensor::zeros((3, 2), DType::F32, &cpu())?;
        // rank 0 sends rank 1 two rows, rank 1 expects one
        let (send_counts, recv_counts) = if r == 0 { ([1, 2], [1, 2]) } else { ([2, 1], [1, 1]) };
        comm.all_to_all_v(&send, &send_counts, &recv_counts).map(|_| ())
    });
    let err = results[1].as_ref().expect("no panic").as_ref().expect_err("splits disagree").to_string();
    assert!(err.contains("all_to_all_v: rank 0 sent ([2, 2], F32), rank 1 expected ([1, 2], F32)"), "{err}");
}

/// Inference: each rank loads its block from the whole single-device checkpoint (by the global
/// names), with frozen weights on the kernel pipeline's stacks, and the outputs match.
#[test]
fn frozen_ranks_load_their_block_from_the_single_device_checkpoint() {
    let cfg = config(ExpertForm::Swiglu, 2, 20);
    let rng = &mut Rng(5);
    let (_, weights) = reference(&cfg, false, rng);
    let checkpoint: std::collections::HashMap<String, Tensor> = weights.clone().into_iter().collect();
    let frozen = ExecutionPlan::inference(&cpu(), Precision::F32).with_moe_kernels(true);
    let x = tokens(31, rng);
    let single = MoeLayer::new(&cfg, &frozen, VarBuilder::from_tensors(checkpoint.clone(), DType::F32, &cpu())).unwrap();
    let want = single.forward(&MoeInput { tokens: &x, seq_len: 1, unconditional: None, train: false }).unwrap().out;
    let splits = SPLITS[2];
    let starts: Vec<usize> = splits.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
    let run = |mode: Mode| {
        let (results, _) = on_ranks(LocalGroup::new(splits.len()), |r, comm| {
            let plan = mode.plan(&frozen, Arc::new(comm));
            let layer = MoeLayer::new(&cfg, &plan, VarBuilder::from_tensors(checkpoint.clone(), DType::F32, &cpu()))?;
            assert_eq!(layer.local_experts(), r..r + 1, "rank {r}'s block");
            assert!(!layer.is_fused(), "expert parallelism leaves the single-device fused path");
            let o = layer.forward(&MoeInput { tokens: &x.narrow(0, starts[r], splits[r])?, seq_len: 1, unconditional: None, train: false })?;
            plan.expert_parallel.as_ref().expect("expert parallel").check_capacity()?;
            Ok(o.out)
        });
        let outs: Vec<Tensor> = results.into_iter().map(|r| r.expect("no panic").expect("forward")).collect();
        Tensor::cat(&outs, 0).unwrap()
    };
    let all_to_all = run(Mode::AllToAll);
    let e = rel_err(&all_to_all, &want);
    assert!(e <= TOL, "frozen output: relative error {e:.3e}");
    // at most 17 tokens per rank: no (rank, expert) chunk holds more
    for mode in [Mode::Static(17), Mode::AllGather] {
        let e = rel_err(&run(mode), &all_to_all);
        assert!(e <= OUT_TOL, "frozen output, {mode:?}: relative error {e:.3e} against the all-to-all");
    }
}

// The static (capacity-padded) dispatch and the all-gather + reduce-scatter baseline.

/// Slots per (rank, expert) of a routing `ids` (every token's choices, rank-major) split over
/// the ranks as `splits`.
fn rank_expert_counts(ids: &[Vec<u32>], splits: &[usize]) -> Vec<Vec<usize>> {
    let mut at = 0;
    splits
        .iter()
        .map(|&n| {
            let mut c = vec![0; E];
            for e in ids[at..at + n].iter().flatten() {
                c[*e as usize] += 1;
            }
            at += n;
            c
        })
        .collect()
}

/// How close the other dispatches' outputs come to the all-to-all's. They run each expert on
/// other row counts (padded chunks, all tokens' slots), and the CPU matmul picks its kernel by
/// row count, so the last bits may differ.
const OUT_TOL: f64 = 1e-6;

/// The static dispatch with the smallest capacity that holds the routing (the fullest
/// (rank, expert) chunk exactly full) and the all-gather baseline give the all-to-all
/// dispatch's outputs and gradients to rounding; both match the single-device layer as the
/// all-to-all does (inside [`check`]), and the capacity check passes on every rank. (One rank
/// runs the single-device layer whatever the dispatch.)
#[test]
fn static_capacity_and_all_gather_match_the_all_to_all_dispatch() {
    let cases = [
        ("swiglu top-1", config(ExpertForm::Swiglu, 1, 0), false),
        ("swiglu top-2 shared", config(ExpertForm::Swiglu, 2, 20), false),
        ("swiglu top-2 unnormalised shared (DiT)", lm_config(ExpertForm::Swiglu, 2, 20, false, false), false),
        ("gelu-tanh top-2", config(ExpertForm::GeluBias, 2, 0), false),
        ("swiglu top-2 shared, starved", config(ExpertForm::Swiglu, 2, 20), true),
    ];
    for (tag, cfg, starve) in &cases {
        for splits in SPLITS {
            let mut worst = [[0f64; 2]; 2];
            for seed in 1..=SEEDS {
                let (_, base) = check(tag, cfg, *starve, splits, seed, Mode::AllToAll);
                let ids: Vec<Vec<u32>> = base.iter().flat_map(|r| r.ids.clone()).collect();
                let tight = rank_expert_counts(&ids, splits).into_iter().flatten().max().unwrap();
                for (m, mode) in [Mode::Static(tight), Mode::AllGather].into_iter().enumerate() {
                    let (_, run) = check(tag, cfg, *starve, splits, seed, mode);
                    for (r, (got, want)) in run.iter().zip(&base).enumerate() {
                        let out = rel_err(&got.out, &want.out);
                        assert!(out <= OUT_TOL, "{tag} P={} {mode:?} seed {seed}: rank {r}'s output off by {out:.1e}", splits.len());
                        let dx = rel_err(&got.dx, &want.dx);
                        let grads = want.grads.iter().map(|(n, w)| rel_err(&got.grads[n], w)).fold(0.0, f64::max);
                        assert!(dx.max(grads) <= TOL, "{tag} P={} {mode:?} seed {seed}: rank {r}'s gradients off by {:.1e}", splits.len(), dx.max(grads));
                        worst[m] = [worst[m][0].max(out), worst[m][1].max(dx).max(grads)];
                    }
                }
            }
            println!("| {} | {tag} | {:.1e} / {:.1e} | {:.1e} / {:.1e} |", splits.len(), worst[0][0], worst[0][1], worst[1][0], worst[1][1]);
        }
    }
}

/// A capacity one below the fullest (rank, expert) chunk: the forward runs (the overflowing
/// slots get weight 0), and the check after it fails on every rank, promptly and with the same
/// message, naming the layer and, for every rank that overflowed, its fullest expert. (One
/// rank exchanges nothing, so it has no capacity to overflow.)
#[test]
fn an_overflowing_static_capacity_fails_on_every_rank() {
    let cfg = config(ExpertForm::Swiglu, 2, 20);
    let rng = &mut Rng(3);
    let (single, weights) = reference(&cfg, false, rng);
    let checkpoint: std::collections::HashMap<String, Tensor> = weights.iter().map(|(n, w)| (format!("blocks.3.moe.{n}"), w.clone())).collect();
    let x = tokens(31, rng);
    let ids: Vec<Vec<u32>> = single.forward(&MoeInput { tokens: &x, seq_len: 1, unconditional: None, train: false }).unwrap().routing.experts.to_vec2().unwrap();
    let frozen = ExecutionPlan::inference(&cpu(), Precision::F32).with_moe_kernels(true);
    for splits in &SPLITS[1..] {
        let counts = rank_expert_counts(&ids, splits);
        let capacity = counts.iter().flatten().max().unwrap() - 1;
        let over: Vec<String> = counts
            .iter()
            .enumerate()
            .filter_map(|(r, c)| {
                let n = *c.iter().max().unwrap();
                let e = c.iter().position(|&m| m == n).unwrap();
                (n > capacity).then(|| format!("layer blocks.3.moe: expert {e} got {n} slots from rank {r}"))
            })
            .collect();
        let want = format!("expert parallelism: the static capacity of {capacity} slots per (rank, expert) overflowed ({}); raise it or use the dropless dispatch", over.join("; "));
        let starts: Vec<usize> = splits.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
        let (results, took) = on_ranks(LocalGroup::new(splits.len()), |r, comm| {
            let plan = Mode::Static(capacity).plan(&frozen, Arc::new(comm));
            let layer = MoeLayer::new(&cfg, &plan, VarBuilder::from_tensors(checkpoint.clone(), DType::F32, &cpu()).pp("blocks.3.moe"))?;
            layer.forward(&MoeInput { tokens: &x.narrow(0, starts[r], splits[r])?, seq_len: 1, unconditional: None, train: false })?;
            plan.expert_parallel.as_ref().expect("expert parallel").check_capacity()
        });
        assert!(took < Duration::from_secs(5), "P={}: the ranks failed after {took:?}", splits.len());
        for (r, res) in results.into_iter().enumerate() {
            let err = res.expect("no panic").expect_err("the capacity overflows").to_string();
            // the message's first line (a backtrace may follow)
            assert_eq!(err.lines().next(), Some(want.as_str()), "P={}: rank {r}", splits.len());
        }
    }
}
