//! Processes finding each other: torchrun's environment ([`WorldInfo`]) and a small TCP
//! rendezvous on `MASTER_ADDR:MASTER_PORT` ([`Rendezvous`]) that connects every rank to rank 0,
//! broadcasts a blob from rank 0 (the NCCL unique id, [`super::nccl`]), carries the CPU
//! backend's collectives ([`super::TcpComm`]) and propagates failures.
//!
//! The variables are the ones `torchrun` (torch.distributed.run) sets for each worker: `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; `ditmoe launch` sets the same
//! ones on one host, and `torchrun --no-python ditmoe …` sets them on several hosts.
//!
//! The rendezvous plays the part of PyTorch's `TCPStore` in the `env://` init method: rank 0
//! listens on `MASTER_PORT` (on every interface, as the store does), every other rank connects
//! to `MASTER_ADDR:MASTER_PORT`, retrying until rank 0 is up or the join timeout passes, and
//! says which rank of which world size it is. The connections are a star through rank 0 and stay
//! open for the life of the group.
//!
//! Failures end the job instead of hanging it. A background thread per connection reads every
//! message as it arrives, so a failure is noticed even between collectives (the watchdog of
//! PyTorch's `ProcessGroupNCCL`):
//! - a rank that reports an error ([`Rendezvous::report_error`], or any collective that fails on
//!   it) sends the message to rank 0, which relays it to every other rank; from then on every
//!   collective on every rank fails with that message;
//! - a rank whose connection closes (it returned, crashed or was killed) is gone: a collective
//!   that waits for its part fails at once with the reason, and the failure then spreads as
//!   above. A clean exit says goodbye first, so the message tells a departure from a crash;
//! - a rank that stays but never calls makes its peers fail after the timeout.
//!
//! Every message is a frame: kind (data, error, goodbye), the collective's code and sequence
//! number (a rank that calls another collective than its peers is an error, not a silent
//! mix-up, as in [`super::LocalComm`]), the payload's length and the payload.
use candle_core::{bail, Error, Result};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long ranks wait for each other to join: the default timeout of PyTorch's `TCPStore`.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a collective waits for a peer that is alive but does not call: the default timeout
/// of PyTorch's NCCL process group (a step of a large model can take long on one rank).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The first bytes a rank sends rank 0, then its rank and world size (u32 each).
const HELLO: &[u8; 8] = b"ditmoe\x00\x01";

/// One process's place in the job, from torchrun's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldInfo {
    /// `RANK`: this process, `0..world_size`.
    pub rank: usize,
    /// `WORLD_SIZE`: the processes of the job, on every host.
    pub world_size: usize,
    /// `LOCAL_RANK`: this process on its host; the GPU it uses.
    pub local_rank: usize,
    /// `MASTER_ADDR`: the host of rank 0, which every rank can reach.
    pub master_addr: String,
    /// `MASTER_PORT`: the port rank 0 listens on.
    pub master_port: u16,
}

impl WorldInfo {
    /// Reads torchrun's variables from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads torchrun's variables through `var` (the environment, or a map in tests). Each
    /// missing or invalid variable is an error that names it.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| -> Result<String> {
            match var(name) {
                Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
                _ => bail!("{name} is not set: run under `ditmoe launch` or torchrun, which set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"),
            }
        };
        let number = |name: &str| -> Result<usize> {
            let v = get(name)?;
            v.parse::<usize>().map_err(|_| Error::Msg(format!("{name}={v:?} is not a non-negative integer")))
        };
        let rank = number("RANK")?;
        let world_size = number("WORLD_SIZE")?;
        if world_size == 0 {
            bail!("WORLD_SIZE=0: a job has at least one process")
        }
        if rank >= world_size {
            bail!("RANK={rank} is out of range for WORLD_SIZE={world_size} (ranks are 0..{})", world_size - 1)
        }
        let local_rank = number("LOCAL_RANK")?;
        if local_rank > rank {
            bail!("LOCAL_RANK={local_rank} is larger than RANK={rank} (a host's ranks are a block of the job's)")
        }
        let master_addr = get("MASTER_ADDR")?;
        let port = get("MASTER_PORT")?;
        let master_port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => bail!("MASTER_PORT={port:?} is not a port number (1..65535)"),
        };
        Ok(Self { rank, world_size, local_rank, master_addr, master_port })
    }
}

/// The collectives a frame belongs to; a rank that receives another one than it called fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Blob = 1,
    Barrier,
    AllReduceSum,
    AllGatherCounts,
    AllToAllV,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Blob => "broadcast_blob",
            Op::Barrier => "barrier",
            Op::AllReduceSum => "all_reduce_sum",
            Op::AllGatherCounts => "all_gather_counts",
            Op::AllToAllV => "all_to_all_v",
        }
    }

    fn name_of(code: u8) -> &'static str {
        [Op::Blob, Op::Barrier, Op::AllReduceSum, Op::AllGatherCounts, Op::AllToAllV].into_iter().find(|op| *op as u8 == code).map_or("an unknown collective", Op::name)
    }
}

const DATA: u8 = 1;
const ERROR: u8 = 2;
const BYE: u8 = 3;

struct Frame {
    op: u8,
    seq: u64,
    payload: Vec<u8>,
}

fn write_frame(w: &mut impl Write, kind: u8, op: u8, seq: u64, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 18];
    head[0] = kind;
    head[1] = op;
    head[2..10].copy_from_slice(&seq.to_le_bytes());
    head[10..18].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

fn read_frame(r: &mut impl Read) -> std::io::Result<(u8, Frame)> {
    let mut head = [0u8; 18];
    r.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[10..18].try_into().expect("8 bytes")) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok((head[0], Frame { op: head[1], seq: u64::from_le_bytes(head[2..10].try_into().expect("8 bytes")), payload }))
}

/// What the connections' reader threads and the collectives share.
struct Shared {
    rank: usize,
    world: usize,
    /// `links[peer]`: the write half of the connection to `peer` (rank 0: every other rank;
    /// the others: rank 0 only).
    links: Vec<Option<Mutex<TcpStream>>>,
    state: Mutex<State>,
    arrived: Condvar,
    /// Held while a failure is being relayed, so that a goodbye sent on drop cannot overtake it
    /// (a peer that read the goodbye first would report a departure instead of the error).
    relaying: Mutex<()>,
}

struct State {
    /// `inbox[peer]`: the data frames `peer` sent, oldest first.
    inbox: Vec<VecDeque<Frame>>,
    /// Why a peer's connection closed.
    gone: Vec<Option<String>>,
    /// The first failure; every collective after it fails with it.
    abort: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // a poisoned lock still holds consistent queues: every update is one push or one set
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a frame to `peer`; an I/O error is returned as is.
    fn send(&self, peer: usize, kind: u8, op: u8, seq: u64, payload: &[u8]) -> std::io::Result<()> {
        let link = self.links[peer].as_ref().expect("frames go to linked peers only");
        write_frame(&mut *link.lock().unwrap_or_else(PoisonError::into_inner), kind, op, seq, payload)
    }

    /// Records the group's first failure, sends it to every linked peer except `from` (rank 0
    /// relays a leaf's error to the other leaves), wakes every waiting collective and returns
    /// the failure as an error.
    fn fail(&self, why: String, from: Option<usize>) -> Error {
        let _relaying = self.relaying.lock().unwrap_or_else(PoisonError::into_inner);
        let why = {
            let mut st = self.lock();
            if let Some(first) = &st.abort {
                return Error::Msg(first.clone());
            }
            st.abort = Some(why.clone());
            why
        };
        self.arrived.notify_all();
        for peer in (0..self.world).filter(|&p| self.links[p].is_some() && Some(p) != from) {
            // a peer that is gone cannot be told, and needs not be
            let _ = self.send(peer, ERROR, 0, 0, why.as_bytes());
        }
        Error::Msg(why)
    }

    /// The reader thread of the connection to `peer`: files data frames into the peer's inbox,
    /// turns an error frame into the group's failure, and marks the peer gone when its
    /// connection closes.
    fn read_from(self: Arc<Self>, peer: usize, mut stream: TcpStream) {
        loop {
            let why = match read_frame(&mut stream) {
                Ok((DATA, frame)) => {
                    self.lock().inbox[peer].push_back(frame);
                    self.arrived.notify_all();
                    continue;
                }
                Ok((ERROR, frame)) => {
                    self.fail(String::from_utf8_lossy(&frame.payload).into_owned(), Some(peer));
                    continue;
                }
                Ok((BYE, _)) => format!("rank {peer} left the group"),
                Ok((kind, _)) => format!("rank {peer} sent a frame of unknown kind {kind}"),
                Err(e) => format!("rank {peer} exited or lost its connection without a word ({e})"),
            };
            self.lock().gone[peer] = Some(why);
            self.arrived.notify_all();
            return;
        }
    }
}

/// This rank's connections to the others: a star through rank 0, with failure propagation
/// (the module docs). Dropping it says goodbye to the peers; a panicking rank tells them it
/// panicked.
pub struct Rendezvous {
    shared: Arc<Shared>,
    timeout: Duration,
    /// Collectives this rank has called: the sequence number of the next one.
    seq: AtomicU64,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rendezvous {{ rank: {}, world: {} }}", self.shared.rank, self.shared.world)
    }
}

impl Rendezvous {
    /// Joins the job `info` describes, with the default timeouts.
    pub fn join(info: &WorldInfo) -> Result<Self> {
        Self::join_with_timeouts(info, DEFAULT_JOIN_TIMEOUT, DEFAULT_TIMEOUT)
    }

    /// Joins the job: rank 0 listens on `MASTER_PORT` until every other rank has connected, the
    /// others connect to `MASTER_ADDR:MASTER_PORT` (retrying while rank 0 is not up yet); both
    /// give up after `join_timeout`. `timeout` is how long collectives wait for a silent peer.
    pub fn join_with_timeouts(info: &WorldInfo, join_timeout: Duration, timeout: Duration) -> Result<Self> {
        Self::join_inner(info, None, join_timeout, timeout)
    }

    /// Joins as rank 0 on a listener it has bound already (its port is `info.master_port`): a
    /// sub-group's leader binds a free port, tells the members, and accepts on that same
    /// socket, so no other process can take the port in between.
    pub fn join_on(info: &WorldInfo, listener: TcpListener) -> Result<Self> {
        Self::join_inner(info, Some(listener), DEFAULT_JOIN_TIMEOUT, DEFAULT_TIMEOUT)
    }

    fn join_inner(info: &WorldInfo, listener: Option<TcpListener>, join_timeout: Duration, timeout: Duration) -> Result<Self> {
        let (rank, world) = (info.rank, info.world_size);
        let deadline = Instant::now() + join_timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        if world > 1 && rank == 0 {
            accept_all(info, listener, deadline, &mut streams)?;
        } else if world > 1 {
            streams[0] = Some(connect(info, deadline)?);
        }
        let links = streams.iter().map(|s| s.as_ref().map(|s| s.try_clone().map(Mutex::new)).transpose()).collect::<std::io::Result<Vec<_>>>()?;
        let state = State { inbox: (0..world).map(|_| VecDeque::new()).collect(), gone: vec![None; world], abort: None };
        let shared = Arc::new(Shared { rank, world, links, state: Mutex::new(state), arrived: Condvar::new(), relaying: Mutex::new(()) });
        for (peer, stream) in streams.into_iter().enumerate() {
            if let Some(stream) = stream {
                let shared = shared.clone();
                std::thread::Builder::new().name(format!("rendezvous-rank{peer}")).spawn(move || shared.read_from(peer, stream))?;
            }
        }
        Ok(Self { shared, timeout, seq: AtomicU64::new(0) })
    }

    pub fn rank(&self) -> usize {
        self.shared.rank
    }

    pub fn world_size(&self) -> usize {
        self.shared.world
    }

    /// Rank 0's `blob` on every rank (the others pass `None`): how the NCCL unique id that
    /// `ncclGetUniqueId` makes on rank 0 reaches the ranks that call `ncclCommInitRank` with it.
    pub fn broadcast_blob(&self, blob: Option<&[u8]>) -> Result<Vec<u8>> {
        let me = self.rank();
        let mine = match (me, blob) {
            (0, Some(b)) => b.to_vec(),
            (0, None) => return Err(self.report_error("rank 0: broadcast_blob needs the blob on rank 0")),
            (_, _) => Vec::new(),
        };
        self.star(Op::Blob, mine, |parts| Ok(vec![parts[0].clone(); parts.len()]))
    }

    /// Ends the group with `msg`: every rank's next collective (and any that waits now) fails
    /// with it. A rank calls it before it exits with an error of its own, so that the others
    /// report that error instead of a lost connection. Returns the group's failure, `msg` unless
    /// the group had failed already.
    pub fn report_error(&self, msg: impl Into<String>) -> Error {
        self.shared.fail(msg.into(), None)
    }

    /// The address `peer`'s connection comes from, as this rank sees it (rank 0 sees every
    /// rank's): where a rank that leads a sub-group is reached ([`super::TcpComm::split`]).
    pub fn peer_host(&self, peer: usize) -> Option<IpAddr> {
        let link = self.shared.links.get(peer)?.as_ref()?;
        link.lock().unwrap_or_else(PoisonError::into_inner).peer_addr().ok().map(|a| a.ip())
    }

    /// The group's failure, if a rank has reported one.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().abort.clone()
    }

    /// One collective through rank 0. Every rank sends `mine` to rank 0; rank 0 passes every
    /// rank's part, by rank, to `combine`, which returns each rank's reply (an error from it
    /// ends the group with its message); every rank returns its reply.
    pub(crate) fn star(&self, op: Op, mine: Vec<u8>, combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>) -> Result<Vec<u8>> {
        let (me, world) = (self.rank(), self.world_size());
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        if let Some(why) = self.failure() {
            bail!("rank {me}: {} (collective #{seq}) after the group failed: {why}", op.name())
        }
        if world == 1 {
            return Ok(combine(vec![mine])?.swap_remove(0));
        }
        if me != 0 {
            self.send(0, op, seq, &mine)?;
            return Ok(self.recv(op, seq, &[0])?.swap_remove(0));
        }
        let leaves: Vec<usize> = (1..world).collect();
        let mut parts = vec![mine];
        parts.extend(self.recv(op, seq, &leaves)?);
        let mut replies = combine(parts).map_err(|e| self.report_error(format!("rank 0: {e}")))?;
        for &peer in &leaves {
            self.send(peer, op, seq, &replies[peer])?;
        }
        Ok(replies.swap_remove(0))
    }

    fn send(&self, peer: usize, op: Op, seq: u64, payload: &[u8]) -> Result<()> {
        self.shared.send(peer, DATA, op as u8, seq, payload).map_err(|e| {
            let why = self.shared.lock().gone[peer].clone().unwrap_or_else(|| format!("cannot reach rank {peer}: {e}"));
            self.report_error(format!("rank {}: {} (collective #{seq}) failed: {why}", self.rank(), op.name()))
        })
    }

    /// The next data frame from each of `peers`, in their order, once all have arrived.
    fn recv(&self, op: Op, seq: u64, peers: &[usize]) -> Result<Vec<Vec<u8>>> {
        let (me, name) = (self.rank(), op.name());
        let sh = &*self.shared;
        let deadline = Instant::now() + self.timeout;
        let mut st = sh.lock();
        let failed = loop {
            if let Some(why) = &st.abort {
                return Err(Error::Msg(format!("rank {me}: {name} (collective #{seq}) failed: {why}")));
            }
            let Some(&src) = peers.iter().find(|&&p| st.inbox[p].is_empty()) else { break None };
            if let Some(why) = &st.gone[src] {
                break Some(format!("{why} before rank {me}'s {name} (collective #{seq}) got its part"));
            }
            let now = Instant::now();
            if now >= deadline {
                break Some(format!("rank {me} waited {:?} for rank {src} in {name} (collective #{seq})", self.timeout));
            }
            st = sh.arrived.wait_timeout(st, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        };
        if let Some(why) = failed {
            drop(st);
            return Err(self.report_error(why));
        }
        let frames: Vec<(usize, Frame)> = peers.iter().map(|&p| (p, st.inbox[p].pop_front().expect("every inbox was checked non-empty"))).collect();
        drop(st);
        let mut parts = Vec::with_capacity(frames.len());
        for (src, f) in frames {
            if f.op != op as u8 || f.seq != seq {
                return Err(self.report_error(format!("rank {me} called {name} (collective #{seq}), rank {src} called {} (collective #{})", Op::name_of(f.op), f.seq)));
            }
            parts.push(f.payload);
        }
        Ok(parts)
    }
}

impl Drop for Rendezvous {
    /// Says goodbye (or, while panicking, ends the group) and closes the write halves; the
    /// reader threads end when the peers close theirs.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.report_error(format!("rank {} panicked", self.rank()));
        }
        let sh = &*self.shared;
        let _relaying = sh.relaying.lock().unwrap_or_else(PoisonError::into_inner);
        for peer in (0..sh.world).filter(|&p| sh.links[p].is_some()) {
            let _ = sh.send(peer, BYE, 0, 0, &[]);
            if let Some(link) = &sh.links[peer] {
                let _ = link.lock().unwrap_or_else(PoisonError::into_inner).shutdown(Shutdown::Write);
            }
        }
    }
}

fn resolve(info: &WorldInfo) -> Result<SocketAddr> {
    let addr = (info.master_addr.as_str(), info.master_port);
    addr.to_socket_addrs()
        .map_err(|e| Error::Msg(format!("MASTER_ADDR={}: cannot resolve: {e}", info.master_addr)))?
        .next()
        .ok_or_else(|| Error::Msg(format!("MASTER_ADDR={}: resolves to no address", info.master_addr)))
}

/// Rank 0: listens on every interface of `MASTER_ADDR`'s address family (or on the listener it
/// was given) and takes one connection from each other rank.
fn accept_all(info: &WorldInfo, listener: Option<TcpListener>, deadline: Instant, streams: &mut [Option<TcpStream>]) -> Result<()> {
    let listener = match listener {
        Some(l) => l,
        None => {
            let any = match resolve(info)?.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            TcpListener::bind((any, info.master_port)).map_err(|e| Error::Msg(format!("rank 0 cannot listen on MASTER_PORT={}: {e}", info.master_port)))?
        }
    };
    listener.set_nonblocking(true)?;
    let mut missing = info.world_size - 1;
    while missing > 0 {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let absent: Vec<usize> = (1..info.world_size).filter(|&r| streams[r].is_none()).collect();
                    bail!("rank 0: ranks {absent:?} did not join on port {} in time", info.master_port)
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100))))?;
        let mut hello = [0u8; 16];
        if stream.try_clone()?.read_exact(&mut hello).is_err() || &hello[..8] != HELLO {
            // not one of ours (a port scan, a stale client): ignore it
            continue;
        }
        let (rank, world) = (u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize, u32::from_le_bytes(hello[12..].try_into().expect("4 bytes")) as usize);
        let why = if world != info.world_size {
            Some(format!("rank {rank} joined with WORLD_SIZE={world}, rank 0 has WORLD_SIZE={}", info.world_size))
        } else if rank == 0 || rank >= world {
            Some(format!("a process joined as rank {rank} of {world}, which is not a rank rank 0 waits for"))
        } else if streams[rank].is_some() {
            Some(format!("two processes joined as rank {rank}"))
        } else {
            None
        };
        if let Some(why) = why {
            let mut s = stream;
            let _ = write_frame(&mut s, ERROR, 0, 0, why.as_bytes());
            for s in streams.iter_mut().flatten() {
                let _ = write_frame(s, ERROR, 0, 0, why.as_bytes());
            }
            bail!("rank 0: {why}")
        }
        stream.set_read_timeout(None)?;
        stream.set_nodelay(true)?;
        streams[rank] = Some(stream);
        missing -= 1;
    }
    Ok(())
}

/// A rank other than 0: connects to rank 0, retrying until `deadline`, and says who it is.
fn connect(info: &WorldInfo, deadline: Instant) -> Result<TcpStream> {
    loop {
        let last = match resolve(info).and_then(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(Error::from)) {
            Ok(mut s) => {
                s.set_nodelay(true)?;
                let mut hello = HELLO.to_vec();
                hello.extend((info.rank as u32).to_le_bytes());
                hello.extend((info.world_size as u32).to_le_bytes());
                s.write_all(&hello)?;
                return Ok(s);
            }
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!("rank {}: cannot reach rank 0 at MASTER_ADDR={} MASTER_PORT={} ({last})", info.rank, info.master_addr, info.master_port)
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
