//! The process-level CPU backend: the ranks are processes (one per `ditmoe launch` or torchrun
//! worker) and the collectives travel over the rendezvous' TCP connections, as gloo's do for
//! PyTorch's CPU process groups. It is how multi-process runs work without GPUs, and how CI
//! tests `ditmoe launch` end to end.
//!
//! Every collective goes through rank 0 (the rendezvous is a star): each rank sends its part,
//! rank 0 combines the parts in rank order and sends each rank its share. That is simple and
//! gives the same results as [`super::LocalComm`], bit for bit (sums in rank order, rows in the
//! senders' order), at a cost: rank 0's connection carries every byte twice, and the others
//! wait for the slowest rank plus two hops, so the time of a collective grows linearly with the
//! world size. Fine for tests and small CPU jobs; GPUs use NCCL ([`super::nccl`]).
//!
//! Sub-groups (Megatron-Core's expert-parallel and expert-data-parallel groups,
//! [`TcpComm::split`]) are rendezvous of their own: each group's first rank listens on a port of
//! its choosing, the job's rendezvous tells the members where (rank 0 knows every rank's address
//! from its connection), and the members join a star through that rank, as `new_group` makes
//! a gloo group from the parent's store. The groups then run their collectives independently of
//! each other, as process groups do (a checkpoint gather runs in one expert-parallel group
//! only). Each collective of a sub-group first checks the job's rendezvous, so a failure
//! reported anywhere in the job ends the sub-group's next collective too.
//!
//! Tensors travel as their dtype, shape and little-endian bytes (the hosts' own order on every
//! platform ditmoe builds for); a tensor on another device is copied to the host and its result
//! copied back to that device.
use super::comm::{check_splits, Communicator};
use super::rendezvous::{Op, Rendezvous, WorldInfo};
use candle_core::{bail, DType, Device, Error, Result, Tensor};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Arc;

/// One rank's handle on a process group whose collectives go over TCP through its first rank:
/// the whole job, or this rank's group of a partition of it ([`TcpComm::split`]).
#[derive(Debug)]
pub struct TcpComm {
    rdv: Arc<Rendezvous>,
    /// The job's rendezvous, for a sub-group: its failure ends the group's collectives too.
    job: Option<Arc<Rendezvous>>,
}

impl TcpComm {
    /// The communicator of the whole job over a joined rendezvous ([`Rendezvous::join`]).
    pub fn new(rdv: Rendezvous) -> Self {
        Self::over(Arc::new(rdv))
    }

    /// The whole job's communicator over a rendezvous that others share (the job's control
    /// plane, [`super::World`]).
    pub fn over(rdv: Arc<Rendezvous>) -> Self {
        Self { rdv, job: None }
    }

    /// This rank's group of `groups`, a partition of the job's ranks (each group's ranks in
    /// group-rank order; every rank of the job calls it with the same partition, a collective
    /// of the job). `master_addr` is `MASTER_ADDR`, where rank 0 is reached. The groups' first
    /// ranks listen on ports of their choosing, and the members join them (module docs).
    pub fn split(&self, groups: &[Vec<usize>], master_addr: &str) -> Result<Self> {
        let job = self.job.as_ref().unwrap_or(&self.rdv).clone();
        let (me, world) = (job.rank(), job.world_size());
        let mut seen = vec![false; world];
        for &r in groups.iter().flatten() {
            if r >= world || std::mem::replace(&mut seen[r], true) {
                bail!("tcp split: {groups:?} is not a partition of the ranks 0..{world}")
            }
        }
        if let Some(missing) = seen.iter().position(|s| !s) {
            bail!("tcp split: {groups:?} leaves out rank {missing}")
        }
        let group = groups.iter().find(|g| g.contains(&me)).expect("a partition holds every rank");
        let (rank, leader) = (group.iter().position(|&r| r == me).expect("in its group"), group[0]);
        // the leader binds a free port on every interface and accepts its members on it
        let listener = if rank == 0 && group.len() > 1 { Some(TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))?) } else { None };
        let port = listener.as_ref().map(|l| l.local_addr().map(|a| a.port())).transpose()?.unwrap_or(0);
        let mut mine = Vec::new();
        put(&mut mine, usize::from(port));
        // rank 0 answers each rank with its leader's host, as rank 0's connection sees it
        // (empty: rank 0 itself, at MASTER_ADDR), and port
        let reply = job.star(Op::Blob, mine, |parts| {
            let hosts: Vec<String> = (0..world).map(|r| if r == 0 { String::new() } else { job.peer_host(r).map_or(String::new(), |h| h.to_string()) }).collect();
            let ports: Vec<u64> = parts.iter().map(|p| u64::from_le_bytes(p[..8].try_into().expect("a port"))).collect();
            let leader_of = |r: usize| groups.iter().find(|g| g.contains(&r)).expect("a partition holds every rank")[0];
            Ok((0..world)
                .map(|r| {
                    let l = leader_of(r);
                    let mut reply = ports[l].to_le_bytes().to_vec();
                    reply.extend(hosts[l].as_bytes());
                    reply
                })
                .collect())
        })?;
        let port = u16::try_from(u64::from_le_bytes(reply[..8].try_into().expect("a port"))).map_err(|e| Error::Msg(format!("tcp split: {e}")))?;
        let host = match std::str::from_utf8(&reply[8..]) {
            Ok("") => master_addr.to_string(),
            Ok(h) => h.to_string(),
            Err(e) => bail!("tcp split: rank {leader}'s address: {e}"),
        };
        let info = WorldInfo { rank, world_size: group.len(), local_rank: 0, master_addr: host, master_port: port.max(1) };
        let joined = match listener {
            Some(l) => Rendezvous::join_on(&info, l),
            None => Rendezvous::join(&info),
        };
        let rdv = joined.map_err(|e| job.report_error(format!("rank {me}: joining the group of ranks {group:?}: {e}")))?;
        Ok(Self { rdv: Arc::new(rdv), job: Some(job) })
    }

    /// The connections underneath: to broadcast a blob or report an error that ends the group.
    pub fn rendezvous(&self) -> &Rendezvous {
        &self.rdv
    }

    /// One collective through the group's first rank, once the job is known to be healthy.
    fn star(&self, op: Op, mine: Vec<u8>, combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>) -> Result<Vec<u8>> {
        if let Some(why) = self.job.as_ref().and_then(|j| j.failure()) {
            return Err(self.rdv.report_error(why));
        }
        self.rdv.star(op, mine, combine)
    }
}

fn put(buf: &mut Vec<u8>, v: usize) {
    buf.extend((v as u64).to_le_bytes());
}

/// Reads what [`put`] wrote, in order.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("tcp: a message ended {} bytes early", n - self.0.len())
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn usize(&mut self) -> Result<usize> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().expect("8 bytes")) as usize)
    }

    fn usizes(&mut self, n: usize) -> Result<Vec<usize>> {
        (0..n).map(|_| self.usize()).collect()
    }

    fn dtype(&mut self) -> Result<DType> {
        let n = self.usize()?;
        let name = std::str::from_utf8(self.bytes(n)?).map_err(|e| Error::Msg(format!("tcp: dtype name: {e}")))?;
        name.parse::<DType>().map_err(|e| Error::Msg(format!("tcp: {e}")))
    }
}

fn put_dtype(buf: &mut Vec<u8>, dtype: DType) {
    put(buf, dtype.as_str().len());
    buf.extend(dtype.as_str().as_bytes());
}

/// The elements of `t`, row-major, as little-endian bytes.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?.to_device(&Device::Cpu)?;
    macro_rules! le {
        ($ty:ty) => {
            t.to_vec1::<$ty>()?.iter().flat_map(|v| v.to_le_bytes()).collect()
        };
    }
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?,
        DType::U32 => le!(u32),
        DType::I64 => le!(i64),
        DType::BF16 => le!(half::bf16),
        DType::F16 => le!(half::f16),
        DType::F32 => le!(f32),
        DType::F64 => le!(f64),
        other => bail!("the TCP backend does not carry {other:?} tensors"),
    })
}

/// A tensor as dtype, shape and bytes.
fn encode(t: &Tensor) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    put_dtype(&mut buf, t.dtype());
    put(&mut buf, t.rank());
    t.dims().iter().for_each(|&d| put(&mut buf, d));
    buf.extend(tensor_bytes(t)?);
    Ok(buf)
}

/// What [`encode`] wrote, as a host tensor with storage of its own.
fn decode(buf: &[u8]) -> Result<Tensor> {
    let mut r = Reader(buf);
    let dtype = r.dtype()?;
    let rank = r.usize()?;
    let dims = r.usizes(rank)?;
    Tensor::from_raw_buffer(r.0, dtype, &dims, &Device::Cpu)
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rdv.rank()
    }

    fn world_size(&self) -> usize {
        self.rdv.world_size()
    }

    fn barrier(&self) -> Result<()> {
        self.star(Op::Barrier, Vec::new(), |parts| Ok(vec![Vec::new(); parts.len()]))?;
        Ok(())
    }

    /// Rank 0 sums in rank order and sends every rank the same bytes: equal bits everywhere,
    /// and the bits [`super::LocalComm`] computes.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let reply = self.star(Op::AllReduceSum, encode(&t.detach())?, |parts| {
            let n = parts.len();
            let mut parts = parts.iter().map(|p| decode(p));
            let mut sum = parts.next().expect("a group has at least one rank")?;
            let shape_of = |p: &Tensor| (p.dims().to_vec(), p.dtype());
            for p in parts {
                let p = p?;
                if shape_of(&p) != shape_of(&sum) {
                    bail!("all_reduce_sum: tensors {:?} and {:?} across ranks", shape_of(&sum), shape_of(&p))
                }
                sum = (sum + p)?;
            }
            Ok(vec![encode(&sum)?; n])
        })?;
        decode(&reply)?.to_device(t.device())
    }

    fn all_gather_counts(&self, counts: &[usize]) -> Result<Vec<Vec<usize>>> {
        let mut mine = Vec::with_capacity(8 * counts.len());
        counts.iter().for_each(|&c| put(&mut mine, c));
        let reply = self.star(Op::AllGatherCounts, mine, |parts| {
            if let Some(p) = parts.iter().find(|p| p.len() != parts[0].len()) {
                bail!("all_gather_counts: vectors of {} and {} counts across ranks", parts[0].len() / 8, p.len() / 8)
            }
            Ok(vec![parts.concat(); parts.len()])
        })?;
        let mut r = Reader(&reply);
        (0..self.world_size()).map(|_| r.usizes(counts.len())).collect()
    }

    /// Each rank sends rank 0 its splits and rows; rank 0 checks that every rank expects what
    /// its peers send, and sends each rank its rows, by source rank, in the senders' order.
    fn all_to_all_v(&self, send: &Tensor, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor> {
        check_splits(self, send, send_counts, recv_counts).map_err(|e| self.rdv.report_error(format!("rank {}: {e}", self.rank())))?;
        let ((_, d), dtype) = (send.dims2()?, send.dtype());
        let mut mine = Vec::new();
        send_counts.iter().chain(recv_counts).for_each(|&c| put(&mut mine, c));
        put(&mut mine, d);
        put_dtype(&mut mine, dtype);
        mine.extend(tensor_bytes(&send.detach())?);
        let reply = self.star(Op::AllToAllV, mine, |parts| {
            let world = parts.len();
            struct Part<'a> {
                send: Vec<usize>,
                recv: Vec<usize>,
                d: usize,
                dtype: DType,
                rows: &'a [u8],
            }
            let parts = parts
                .iter()
                .map(|p| {
                    let mut r = Reader(p);
                    Ok(Part { send: r.usizes(world)?, recv: r.usizes(world)?, d: r.usize()?, dtype: r.dtype()?, rows: r.0 })
                })
                .collect::<Result<Vec<_>>>()?;
            for (src, p) in parts.iter().enumerate() {
                if (p.d, p.dtype) != (parts[0].d, parts[0].dtype) {
                    bail!("all_to_all_v: rank {src} sends rows of {} {:?}, rank 0 rows of {} {:?}", p.d, p.dtype, parts[0].d, parts[0].dtype)
                }
                for (dst, q) in parts.iter().enumerate() {
                    if p.send[dst] != q.recv[src] {
                        bail!("all_to_all_v: rank {src} sends {} rows to rank {dst}, which expects {}", p.send[dst], q.recv[src])
                    }
                }
            }
            let row = parts[0].d * parts[0].dtype.size_in_bytes();
            // each sender's chunk for `dst` starts after its chunks for the ranks before `dst`
            let offset = |p: &Part, dst: usize| p.send[..dst].iter().sum::<usize>() * row;
            Ok((0..world).map(|dst| parts.iter().flat_map(|p| &p.rows[offset(p, dst)..offset(p, dst) + p.send[dst] * row]).copied().collect()).collect())
        })?;
        // a fresh host tensor (storage of its own), moved to the rows' device
        Tensor::from_raw_buffer(&reply, dtype, &[recv_counts.iter().sum::<usize>(), d], &Device::Cpu)?.to_device(send.device())
    }
}
