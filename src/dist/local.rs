//! The in-process backend: `N` ranks as `N` threads of one process, exchanging candle tensors
//! through shared mailboxes. It is how CI runs expert and data parallelism on the CPU, with the
//! same dispatch code an NCCL backend serves on GPUs.
//!
//! Each ordered pair of ranks has a FIFO mailbox. A collective posts one message to every rank
//! (itself included), then waits for one message from every rank; since every rank calls the
//! collectives in the same order, the i-th message of a mailbox belongs to the sender's i-th
//! collective, and each message carries its collective's name, so a rank that calls another
//! collective is an error, not a silent mix-up. Results are combined in rank order, so every
//! rank computes the same bits.
//!
//! Failures end the group instead of hanging it: a [`LocalComm`] that is dropped (its thread
//! returned, early with an error or not, or panicked and unwound) marks its rank as gone, and a
//! rank waiting for a message the gone rank never posted fails at once; a rank that stays but
//! never calls makes its peers fail after the group's timeout. The first failure aborts the
//! group: every collective after it, on any rank, returns that error.
use super::comm::{check_splits, Communicator};
use candle_core::{Error, Result, Tensor};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long [`LocalGroup::new`]'s collectives wait for a peer that is alive but does not call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The state the ranks of one in-process group share.
pub struct LocalGroup {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    posted: Condvar,
}

struct State {
    /// `mail[src * world + dst]`: the messages `src` posted to `dst`, oldest first.
    mail: Vec<VecDeque<Message>>,
    /// Ranks whose communicator was dropped, and how.
    gone: Vec<Option<Departure>>,
    /// The first failure; every collective after it fails with it.
    abort: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum Departure {
    Returned,
    Panicked,
}

struct Message {
    /// The collective that posted it.
    op: &'static str,
    payload: Payload,
}

enum Payload {
    Nothing,
    Tensor(Tensor),
    Counts(Vec<usize>),
}

impl LocalGroup {
    /// A group of `world` ranks: one communicator per rank, to be moved into its thread (the
    /// group itself lives as long as one of them does, so it is never handed out).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize) -> Vec<LocalComm> {
        Self::with_timeout(world, DEFAULT_TIMEOUT)
    }

    /// [`Self::new`] whose collectives give up on a silent peer after `timeout`.
    pub fn with_timeout(world: usize, timeout: Duration) -> Vec<LocalComm> {
        let state = State { mail: (0..world * world).map(|_| VecDeque::new()).collect(), gone: vec![None; world], abort: None };
        let group = Arc::new(Self { world, timeout, state: Mutex::new(state), posted: Condvar::new() });
        (0..world).map(|rank| LocalComm { group: group.clone(), rank, collectives: AtomicU64::new(0) }).collect()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Error::Msg("local group: a rank panicked inside a collective".into()))
    }

    /// Aborts the group with `why` (unless it already failed) and wakes every waiting rank;
    /// the error to return.
    fn fail(&self, st: &mut State, why: String) -> Error {
        let why = st.abort.get_or_insert(why).clone();
        self.posted.notify_all();
        Error::Msg(why)
    }
}

/// One rank's handle on a [`LocalGroup`].
pub struct LocalComm {
    group: Arc<LocalGroup>,
    rank: usize,
    /// Collectives this rank has called, for the error messages.
    collectives: AtomicU64,
}

impl std::fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalComm {{ rank: {}, world: {} }}", self.rank, self.group.world)
    }
}

impl LocalComm {
    /// Posts `outgoing[dst]` to every rank and returns what every rank posted to this one, by
    /// source rank.
    fn exchange(&self, op: &'static str, outgoing: Vec<Payload>) -> Result<Vec<Payload>> {
        let (g, me) = (&*self.group, self.rank);
        let n = self.collectives.fetch_add(1, Ordering::Relaxed);
        let mut st = g.lock()?;
        if let Some(why) = &st.abort {
            return Err(Error::Msg(format!("rank {me}: {op} (collective #{n}) after the group failed: {why}")));
        }
        for (dst, payload) in outgoing.into_iter().enumerate() {
            st.mail[me * g.world + dst].push_back(Message { op, payload });
        }
        g.posted.notify_all();
        let deadline = Instant::now() + g.timeout;
        loop {
            if let Some(why) = &st.abort {
                return Err(Error::Msg(format!("rank {me}: {op} (collective #{n}) failed: {why}")));
            }
            let Some(src) = (0..g.world).find(|&src| st.mail[src * g.world + me].is_empty()) else { break };
            if let Some(how) = st.gone[src] {
                let how = match how {
                    Departure::Returned => "left the group",
                    Departure::Panicked => "panicked",
                };
                return Err(g.fail(&mut st, format!("rank {src} {how} before rank {me}'s {op} (collective #{n}) got its part")));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(g.fail(&mut st, format!("rank {me} waited {:?} for rank {src} in {op} (collective #{n})", g.timeout)));
            }
            st = g.posted.wait_timeout(st, deadline - now).map_err(|_| Error::Msg("local group: a rank panicked inside a collective".into()))?.0;
        }
        let mut got = Vec::with_capacity(g.world);
        for src in 0..g.world {
            let m = st.mail[src * g.world + me].pop_front().expect("every mailbox was checked non-empty");
            if m.op != op {
                return Err(g.fail(&mut st, format!("collective #{n}: rank {me} called {op}, rank {src} called {}", m.op)));
            }
            got.push(m.payload);
        }
        Ok(got)
    }

    /// Aborts the group with `err` (a local check that failed inside a collective: the peers
    /// would otherwise wait for this rank's part).
    fn abort(&self, err: Error) -> Error {
        match self.group.lock() {
            Ok(mut st) => self.group.fail(&mut st, format!("rank {}: {err}", self.rank)),
            Err(e) => e,
        }
    }
}

fn tensor(p: Payload) -> Tensor {
    match p {
        Payload::Tensor(t) => t,
        _ => unreachable!("messages of one collective carry one payload kind"),
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world
    }

    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", (0..self.group.world).map(|_| Payload::Nothing).collect())?;
        Ok(())
    }

    /// Sums in rank order (every rank adds the same tensors in the same order: equal bits).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        // the graph stays on this rank's thread
        let t = t.detach();
        let got = self.exchange("all_reduce_sum", (0..self.group.world).map(|_| Payload::Tensor(t.clone())).collect())?;
        let mut parts = got.into_iter().map(tensor);
        let first = parts.next().expect("a group has at least one rank");
        let shape_of = |p: &Tensor| (p.dims().to_vec(), p.dtype());
        // storage of its own, whatever the world size (one rank: a copy of its own tensor)
        let mut sum = first.force_contiguous()?;
        for p in parts {
            if shape_of(&p) != shape_of(&first) {
                return Err(self.abort(Error::Msg(format!("all_reduce_sum: tensors {:?} and {:?} across ranks", shape_of(&first), shape_of(&p)))));
            }
            sum = (sum + p)?;
        }
        Ok(sum)
    }

    fn all_gather_counts(&self, counts: &[usize]) -> Result<Vec<Vec<usize>>> {
        let got = self.exchange("all_gather_counts", (0..self.group.world).map(|_| Payload::Counts(counts.to_vec())).collect())?;
        let got: Vec<Vec<usize>> = got
            .into_iter()
            .map(|p| match p {
                Payload::Counts(c) => c,
                _ => unreachable!("messages of one collective carry one payload kind"),
            })
            .collect();
        if let Some(c) = got.iter().find(|c| c.len() != counts.len()) {
            return Err(self.abort(Error::Msg(format!("all_gather_counts: vectors of {} and {} counts across ranks", counts.len(), c.len()))));
        }
        Ok(got)
    }

    fn all_to_all_v(&self, send: &Tensor, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor> {
        check_splits(self, send, send_counts, recv_counts).map_err(|e| self.abort(e))?;
        let send = send.detach();
        let (d, dtype, dev) = (send.dim(1)?, send.dtype(), send.device().clone());
        let mut at = 0;
        let mut outgoing = Vec::with_capacity(send_counts.len());
        for &c in send_counts {
            outgoing.push(Payload::Tensor(send.narrow(0, at, c)?));
            at += c;
        }
        let parts: Vec<Tensor> = self.exchange("all_to_all_v", outgoing)?.into_iter().map(tensor).collect();
        for (src, p) in parts.iter().enumerate() {
            if p.dims() != [recv_counts[src], d] || p.dtype() != dtype {
                let (got, want) = ((p.dims(), p.dtype()), ([recv_counts[src], d], dtype));
                return Err(self.abort(Error::Msg(format!("all_to_all_v: rank {src} sent {got:?}, rank {} expected {want:?}", self.rank))));
            }
        }
        // The parts are views of the senders' tensors; the result gets storage of its own, as
        // an NCCL receive buffer is (`Tensor::cat` of one part would hand the view back).
        let parts: Vec<Tensor> = parts.into_iter().filter(|p| p.dim(0).is_ok_and(|r| r > 0)).collect();
        match parts.as_slice() {
            [] => Tensor::zeros((0, d), dtype, &dev),
            [one] => one.force_contiguous(),
            _ => Tensor::cat(&parts, 0),
        }
    }
}

impl Drop for LocalComm {
    /// Marks the rank as gone, so that peers waiting on it fail instead of waiting; a panic
    /// aborts the group at once.
    fn drop(&mut self) {
        let panicked = std::thread::panicking();
        let mut st = self.group.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.gone[self.rank] = Some(if panicked { Departure::Panicked } else { Departure::Returned });
        if panicked {
            st.abort.get_or_insert_with(|| format!("rank {} panicked", self.rank));
        }
        self.group.posted.notify_all();
    }
}
