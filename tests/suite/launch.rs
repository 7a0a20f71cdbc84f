//! Processes and the process-level CPU backend: `ditmoe launch` of `dist check` (torchrun's
//! variables, the TCP rendezvous and every collective across real processes), a failing rank
//! ending the job instead of hanging it, named errors for torchrun's variables, and the TCP
//! communicator against the in-process one (ranks as threads over localhost).
use candle_core::{Device, Result, Tensor};
use ditmoe::dist::rendezvous::DEFAULT_JOIN_TIMEOUT;
use ditmoe::dist::{Communicator, LocalGroup, Rendezvous, TcpComm, WorldInfo};
use std::collections::HashMap;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A port that was free a moment ago, for one job's rendezvous.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

const VARS: [&str; 6] = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"];

fn ditmoe(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ditmoe"));
    cmd.args(args).env_remove("RUST_BACKTRACE");
    VARS.iter().for_each(|v| {
        cmd.env_remove(v);
    });
    cmd.envs(env.iter().copied()).output().unwrap()
}

fn launch(n: usize, extra: &[&str]) -> (Output, Duration) {
    let (n, port) = (n.to_string(), free_port().to_string());
    let mut args = vec!["launch", "--nproc-per-node", &n, "--master-port", &port, "--", "dist", "check"];
    args.extend(extra);
    let t = Instant::now();
    let out = ditmoe(&args, &[]);
    (out, t.elapsed())
}

#[test]
fn launch_runs_every_collective_on_two_three_and_four_ranks() {
    for n in [2, 3, 4] {
        let (out, _) = launch(n, &[]);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "launch of {n}: {stdout}\n{stderr}");
        let sum = n * (n + 1) / 2;
        for r in 0..n {
            let line = stdout.lines().find(|l| l.starts_with(&format!("[rank{r}]: rank {r}/{n}:"))).unwrap_or_else(|| panic!("no line of rank {r} in {stdout}"));
            assert!(line.contains(&format!("all_reduce_sum {sum} ok")) && line.contains("all_to_all_v"), "{line}");
            // at 4 ranks the expert groups of 2 (their own rendezvous) run every collective too
            let groups = ["expert-parallel all_reduce_sum 3 ok", "expert-data-parallel all_reduce_sum 3 ok"];
            assert_eq!(groups.iter().all(|g| line.contains(g)), n == 4, "{line}");
        }
    }
}

#[test]
fn a_failing_rank_ends_the_launch_with_its_error() {
    let (out, took) = launch(3, &["--fail-rank", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(stderr.contains("[rank1]: error: rank 1 fails on request"), "{stderr}");
    let last = stderr.lines().last().unwrap();
    assert!(last.starts_with("error: rank ") && last.contains("rank 1 fails on request"), "{last}");
}

#[test]
fn torchrun_variables_are_checked_by_name() {
    let out = ditmoe(&["dist", "check"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("RANK is not set"), "{stderr}");

    let good = [("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")];
    let with = |name: &str, value: Option<&str>| {
        let mut vars: HashMap<String, String> = good.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match value {
            Some(v) => vars.insert(name.to_string(), v.to_string()),
            None => vars.remove(name),
        };
        WorldInfo::from_vars(|k| vars.get(k).cloned())
    };
    let info = with("RANK", Some("1")).unwrap();
    assert_eq!(info, WorldInfo { rank: 1, world_size: 2, local_rank: 1, master_addr: "127.0.0.1".into(), master_port: 29500 });
    for (name, value, want) in [
        ("WORLD_SIZE", None, "WORLD_SIZE is not set"),
        ("MASTER_ADDR", None, "MASTER_ADDR is not set"),
        ("MASTER_PORT", None, "MASTER_PORT is not set"),
        ("LOCAL_RANK", None, "LOCAL_RANK is not set"),
        ("RANK", Some("one"), "RANK=\"one\" is not a non-negative integer"),
        ("RANK", Some("2"), "RANK=2 is out of range for WORLD_SIZE=2"),
        ("WORLD_SIZE", Some("0"), "WORLD_SIZE=0"),
        ("LOCAL_RANK", Some("-1"), "LOCAL_RANK=\"-1\""),
        ("MASTER_PORT", Some("0"), "MASTER_PORT=\"0\" is not a port number"),
        ("MASTER_PORT", Some("70000"), "MASTER_PORT=\"70000\" is not a port number"),
    ] {
        let err = with(name, value).unwrap_err().to_string();
        assert!(err.contains(want), "{name}={value:?}: {err}");
    }
}

/// Runs `f` on every rank of a TCP group of `world` ranks (threads of this process over
/// localhost) and returns the ranks' results.
fn on_tcp_ranks<T: Send + 'static>(world: usize, f: impl Fn(TcpComm) -> T + Send + Sync + 'static) -> Vec<T> {
    let port = free_port();
    let f = std::sync::Arc::new(f);
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            let f = f.clone();
            std::thread::spawn(move || {
                let info = WorldInfo { rank, world_size: world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port };
                f(TcpComm::new(Rendezvous::join_with_timeouts(&info, DEFAULT_JOIN_TIMEOUT, Duration::from_secs(20)).unwrap()))
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// A rank's received rows, gathered counts and all-reduced sum.
type Results = (Vec<Vec<f32>>, Vec<Vec<usize>>, Vec<f32>);

/// Every collective on a rank's values, the results as plain numbers.
fn collectives(comm: &dyn Communicator) -> Result<Results> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let d = 3;
    // uneven splits with empty chunks: rank r sends (2 r + 3 p) % 4 rows to rank p
    let splits = |src: usize, dst: usize| (2 * src + 3 * dst) % 4;
    let send_counts: Vec<usize> = (0..world).map(|p| splits(rank, p)).collect();
    let recv_counts: Vec<usize> = (0..world).map(|p| splits(p, rank)).collect();
    let rows = send_counts.iter().sum::<usize>();
    let send = Tensor::from_vec((0..rows * d).map(|i| (1000 * rank + i) as f32 * 0.37).collect::<Vec<f32>>(), (rows, d), &Device::Cpu)?;
    let got = comm.all_to_all_v(&send, &send_counts, &recv_counts)?.to_vec2::<f32>()?;
    let counts = comm.all_gather_counts(&send_counts)?;
    let x = Tensor::from_vec((0..5).map(|i| ((rank + 1) * (i + 1)) as f32 / 7.0).collect::<Vec<f32>>(), 5, &Device::Cpu)?;
    let sum = comm.all_reduce_sum(&x)?.to_vec1::<f32>()?;
    comm.barrier()?;
    Ok((got, counts, sum))
}

#[test]
fn tcp_comm_matches_the_local_one() {
    for world in [1, 2, 3] {
        let tcp = on_tcp_ranks(world, |comm| collectives(&comm).unwrap());
        let local: Vec<_> = LocalGroup::new(world).into_iter().map(|comm| std::thread::spawn(move || collectives(&comm).unwrap())).collect();
        let local: Vec<_> = local.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(tcp, local, "world {world}");
    }
}

#[test]
fn tcp_failures_reach_every_rank_without_a_hang() {
    let t = Instant::now();
    // a rank that reports an error: the others' next collective fails with its message
    let errs = on_tcp_ranks(3, |comm| {
        if comm.rank() == 1 {
            comm.rendezvous().report_error("rank 1: out of memory");
            return String::new();
        }
        comm.barrier().unwrap_err().to_string()
    });
    for e in [&errs[0], &errs[2]] {
        assert!(e.contains("rank 1: out of memory"), "{e}");
    }
    // a rank that leaves: a collective that needs its part fails with why
    let errs = on_tcp_ranks(3, |comm| {
        if comm.rank() == 2 {
            return String::new();
        }
        let send = Tensor::zeros((0, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        comm.all_to_all_v(&send, &[0; 3], &[0; 3]).unwrap_err().to_string()
    });
    for e in [&errs[0], &errs[1]] {
        assert!(e.contains("rank 2 left the group"), "{e}");
    }
    // mismatched splits are an error on every rank, named by the ranks that disagree
    let errs = on_tcp_ranks(2, |comm| {
        let send = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let (sc, rc) = if comm.rank() == 0 { ([1, 1], [1, 1]) } else { ([0, 2], [1, 2]) };
        comm.all_to_all_v(&send, &sc, &rc).unwrap_err().to_string()
    });
    for e in &errs {
        assert!(e.contains("rank 1 sends 0 rows to rank 0, which expects 1"), "{e}");
    }
    assert!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
}
