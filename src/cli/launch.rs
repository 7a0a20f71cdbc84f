//! `ditmoe launch`: one process per GPU on this host, the way torchrun starts them; the
//! commands' side of a launch ([`join`], [`reported`]); and `ditmoe dist check`, which proves
//! the chain (variables, rendezvous, the backend's collectives) on CPUs or, under NCCL, GPUs.
use super::usage;
use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};
use ditmoe::dist::{Communicator, World, WorldInfo};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Args)]
pub struct LaunchArgs {
    /// Processes to start on this host, one per GPU (torchrun's `--nproc-per-node`).
    #[arg(long)]
    nproc_per_node: usize,
    /// The port rank 0 listens on for the rendezvous (torchrun's `--master-port`).
    #[arg(long, default_value_t = 29500)]
    master_port: u16,
    /// The ditmoe command every process runs, after `--` (e.g. `-- dist check`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Starts `--nproc-per-node` copies of this executable with torchrun's variables (`RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` 127.0.0.1, `MASTER_PORT`),
/// prefixes each line they print with its rank (`[rank1]: …`, as torchrun's `--tee` does), and
/// waits for them. The first rank that fails ends the job: the others get [`FAILURE_GRACE`] to end
/// by themselves, are then killed, and the launch fails with that rank's error, so a failure
/// never leaves the job hanging. Several hosts: run
/// `torchrun --no-python ditmoe …` on each, which sets the same variables.
pub fn run(a: LaunchArgs) -> Result<()> {
    let n = a.nproc_per_node;
    if n == 0 {
        return Err(usage("--nproc-per-node: at least one process"));
    }
    if a.master_port == 0 {
        return Err(usage("--master-port: a port number (1..65535)"));
    }
    let exe = std::env::current_exe().context("launch: cannot find the ditmoe executable")?;
    let mut ranks: Vec<Rank> = Vec::with_capacity(n);
    for rank in 0..n {
        let spawned = Command::new(&exe)
            .args(&a.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", a.master_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(child) => ranks.push(Rank::new(rank, child)),
            Err(e) => {
                end_all(&mut ranks, Duration::ZERO);
                return Err(anyhow!("launch: cannot start rank {rank} ({}): {e}", exe.display()));
            }
        }
    }
    // the first rank to fail, in the order the failures are seen
    let failed = loop {
        let (running, failed) = poll(&mut ranks).context("launch: waiting for a rank")?;
        if failed.is_some() || !running {
            break failed;
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    end_all(&mut ranks, FAILURE_GRACE);
    let Some(rank) = failed else { return Ok(()) };
    let r = &ranks[rank];
    let status = describe(r.status.expect("a failed rank has exited"));
    let last_error = r.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    match last_error {
        Some(err) => Err(anyhow!("rank {rank} failed ({status}): {err}")),
        None => Err(anyhow!("rank {rank} failed ({status})")),
    }
}

/// One started process and the threads that copy its output.
struct Rank {
    rank: usize,
    child: Child,
    status: Option<ExitStatus>,
    /// The last `error: …` line it printed, without the prefix.
    last_error: Arc<Mutex<Option<String>>>,
    output: Vec<JoinHandle<()>>,
}

impl Rank {
    fn new(rank: usize, mut child: Child) -> Self {
        let last_error = Arc::new(Mutex::new(None));
        let out = child.stdout.take().expect("stdout is piped");
        let err = child.stderr.take().expect("stderr is piped");
        let output = vec![
            std::thread::spawn(move || copy_lines(rank, out, std::io::stdout, None)),
            {
                let last_error = last_error.clone();
                std::thread::spawn(move || copy_lines(rank, err, std::io::stderr, Some(last_error)))
            },
        ];
        Self { rank, child, status: None, last_error, output }
    }
}

/// Copies `from` line by line to `to`, each line prefixed with the rank; remembers the last
/// `error:` line in `last_error`.
fn copy_lines<W: Write>(rank: usize, from: impl Read, to: fn() -> W, last_error: Option<Arc<Mutex<Option<String>>>>) {
    for line in BufReader::new(from).split(b'\n') {
        let Ok(line) = line else { return };
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches('\r');
        if let (Some(last), Some(msg)) = (&last_error, line.strip_prefix("error: ")) {
            *last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(msg.to_string());
        }
        // one write per line, so the ranks' lines do not interleave mid-line
        let _ = to().write_all(format!("[rank{rank}]: {line}\n").as_bytes());
    }
}

/// How often the launcher looks at its ranks.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Records the exit status of every rank that ended since the last poll. Returns whether any
/// rank still runs, and the first (in rank order) of those that ended now with a failure.
fn poll(ranks: &mut [Rank]) -> std::io::Result<(bool, Option<usize>)> {
    let (mut running, mut failed) = (false, None);
    for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
        match r.child.try_wait()? {
            Some(status) => {
                r.status = Some(status);
                if !status.success() && failed.is_none() {
                    failed = Some(r.rank);
                }
            }
            None => running = true,
        }
    }
    Ok((running, failed))
}

/// How long the other ranks have, once one failed, to end by themselves before they are killed
/// (torchrun likewise signals its workers and waits before it kills them). A rank that fails the
/// same check, e.g. a bad flag every rank validates, then prints its own error instead of being
/// cut off mid-way.
const FAILURE_GRACE: Duration = Duration::from_secs(3);

/// Waits up to `grace` for the ranks still running to exit, kills those that have not, reaps
/// them all and waits for their output to be copied.
fn end_all(ranks: &mut [Rank], grace: Duration) {
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline && matches!(poll(ranks), Ok((true, _))) {
        std::thread::sleep(POLL_INTERVAL);
    }
    for r in ranks.iter_mut() {
        if r.status.is_none() {
            let _ = r.child.kill();
            r.status = r.child.wait().ok();
        }
    }
    for r in ranks.iter_mut() {
        for t in r.output.drain(..) {
            let _ = t.join();
        }
    }
}

fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    #[cfg(unix)]
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
        return format!("killed by signal {signal}");
    }
    status.to_string()
}

#[derive(Args)]
pub struct DistArgs {
    #[command(subcommand)]
    command: DistCommand,
}

#[derive(Subcommand)]
enum DistCommand {
    /// Join the job (torchrun's variables), run every collective of the backend on known values
    /// (and of the expert groups over 2 ranks, at an even world size above 2) and print one line
    /// per rank: `ditmoe launch --nproc-per-node 2 -- dist check [--device cuda]`.
    Check(CheckArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// cpu (the TCP backend) or cuda (NCCL, with the `nccl` feature; LOCAL_RANK's GPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// This rank fails once it has joined: shows that a failing rank ends the job on every rank.
    #[arg(long)]
    fail_rank: Option<usize>,
}

pub fn run_dist(a: DistArgs) -> Result<()> {
    match a.command {
        DistCommand::Check(a) => check(a),
    }
}

/// The job this process was launched into (None for a plain run), with the backend for
/// `device`.
pub fn join(device: &Device) -> Result<Option<World>> {
    World::from_env(device).map_err(|e| usage(e.to_string()))
}

/// `result`, reported to the other ranks when it is an error, so that the job ends with this
/// rank's message on every rank (and `launch` with it) instead of a lost connection.
pub fn reported<T>(world: Option<&World>, result: Result<T>) -> Result<T> {
    if let (Some(w), Err(e)) = (world, &result) {
        w.report_error(&format!("rank {}: {e:#}", w.rank()));
    }
    result
}

/// Whether this process prints and writes a command's results: rank 0 of a launched job, or a
/// plain run.
pub fn leads(world: Option<&World>) -> bool {
    world.is_none_or(|w| w.rank() == 0)
}

/// `plan` with the job's data parallelism and the MoE layers' experts split over groups of
/// `expert_parallel` consecutive ranks (None: the world size, each rank loading only its
/// share); a plain run refuses a split, as it has no ranks.
pub fn parallel_plan(world: Option<&World>, plan: ditmoe::ExecutionPlan, expert_parallel: Option<usize>) -> Result<ditmoe::ExecutionPlan> {
    match world {
        Some(w) => {
            let ep = expert_parallel.unwrap_or(w.world_size());
            w.apply(plan, ep).map_err(|e| usage(format!("--expert-parallel {ep}: {e}")))
        }
        None => {
            needs_launch("--expert-parallel", expert_parallel.unwrap_or(1))?;
            Ok(plan)
        }
    }
}

/// A flag that only a launched job can honour, refused in a plain run.
fn needs_launch(flag: &str, value: usize) -> Result<()> {
    match value {
        1 => Ok(()),
        _ => Err(usage(format!("{flag} {value}: a run of one process has no ranks to split over; start it under `ditmoe launch --nproc-per-node N --` (or torchrun)"))),
    }
}

fn check(a: CheckArgs) -> Result<()> {
    let device = super::device(&a.device)?;
    let Some(world) = join(&device)? else {
        // no job: name the first missing variable
        return Err(usage(WorldInfo::from_env().err().map_or_else(|| "dist check: not launched".to_string(), |e| e.to_string())));
    };
    let (rank, size) = (world.rank(), world.world_size());
    let result = if a.fail_rank == Some(rank) { Err(anyhow!("rank {rank} fails on request (--fail-rank {rank})")) } else { check_collectives(&world, &device) };
    let line = reported(Some(&world), result)?;
    println!("rank {rank}/{size}: {} backend: {line}", world.backend());
    Ok(())
}

/// Every collective on values each rank can predict, on `device`; the line to print, or what
/// differed. The sub-groups of expert parallelism over 2 ranks are checked where the world
/// size is even.
fn check_collectives(world: &World, device: &Device) -> Result<String> {
    let comm = world.comm();
    let (rank, size) = (comm.rank(), comm.world_size());
    let blob = world.rendezvous().broadcast_blob((rank == 0).then_some(b"ditmoe rendezvous".as_slice()))?;
    anyhow::ensure!(blob == b"ditmoe rendezvous", "broadcast_blob: got {blob:?}");
    let mut line = vec!["broadcast_blob ok".to_string()];
    line.extend(check_group("", &*comm, device)?);
    if size % 2 == 0 && size > 2 {
        let (ep, edp) = world.expert_groups(2)?;
        let edp = edp.expect("expert parallelism over fewer ranks than the job has an expert-data-parallel group");
        anyhow::ensure!((ep.rank(), ep.world_size(), edp.rank(), edp.world_size()) == (rank % 2, 2, rank / 2, size / 2), "expert groups of rank {rank}: expert-parallel {}/{}, expert-data-parallel {}/{}", ep.rank(), ep.world_size(), edp.rank(), edp.world_size());
        line.extend(check_group("expert-parallel ", &*ep, device)?);
        line.extend(check_group("expert-data-parallel ", &*edp, device)?);
    }
    Ok(line.join(", "))
}

/// The collectives of one group on known values: what each printed.
fn check_group(name: &str, comm: &dyn Communicator, device: &Device) -> Result<Vec<String>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    comm.barrier()?;

    let counts = comm.all_gather_counts(&[rank, 10 * rank + 1])?;
    let want: Vec<Vec<usize>> = (0..world).map(|p| vec![p, 10 * p + 1]).collect();
    anyhow::ensure!(counts == want, "{name}all_gather_counts: got {counts:?}, want {want:?}");

    let sum = comm.all_reduce_sum(&Tensor::full((rank + 1) as f32, 4, device)?)?.to_vec1::<f32>()?;
    let want_sum = world * (world + 1) / 2;
    anyhow::ensure!(sum == vec![want_sum as f32; 4], "{name}all_reduce_sum: got {sum:?}, want {want_sum} everywhere");

    // uneven splits, some empty: rank r sends (r + p) % 3 rows of value 100 r + p to rank p
    let d = 2;
    let splits = |src: usize, dst: usize| (src + dst) % 3;
    let send_counts: Vec<usize> = (0..world).map(|p| splits(rank, p)).collect();
    let recv_counts: Vec<usize> = (0..world).map(|p| splits(p, rank)).collect();
    let rows: Vec<f32> = (0..world).flat_map(|p| vec![(100 * rank + p) as f32; send_counts[p] * d]).collect();
    let send = Tensor::from_vec(rows, (send_counts.iter().sum::<usize>(), d), device)?;
    let got = comm.all_to_all_v(&send, &send_counts, &recv_counts)?.flatten_all()?.to_vec1::<f32>()?;
    let want: Vec<f32> = (0..world).flat_map(|p| vec![(100 * p + rank) as f32; recv_counts[p] * d]).collect();
    anyhow::ensure!(got == want, "{name}all_to_all_v: got {got:?}, want {want:?}");
    comm.barrier()?;
    Ok(vec![format!("{name}barrier ok"), format!("{name}all_gather_counts ok"), format!("{name}all_reduce_sum {want_sum} ok"), format!("{name}all_to_all_v {} rows ok", recv_counts.iter().sum::<usize>())])
}
