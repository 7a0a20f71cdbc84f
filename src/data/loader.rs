//! Deterministic, resumable, multi-threaded batch loader.
//!
//! Every sample the loader produces is a pure function of (seed, epoch, position): epoch `e`
//! visits the dataset in a permutation seeded from (seed, e), and the item at `position` of
//! that permutation gets its own RNG (for the random flip) seeded from (seed, e, position).
//! Worker threads only compute; the consumer reassembles results in sequence order. Batches
//! are therefore identical for any number of threads, and a [`LoaderState`] saved with a
//! checkpoint restarts the stream exactly where it stopped. (Reproducibility holds for a fixed
//! `Cargo.lock`: `rand` does not promise the same `StdRng` stream across versions.)
//!
//! Batches are `x: [B, C, H, W]` f32 and `y: [B]` **u32** class ids: u32 is the index dtype
//! every candle backend accepts for `index_select`/`Embedding` (Metal lacks i64 for some of
//! them), and it is what `Tensor::to_vec1::<u32>` reads back.

use super::dataset::{Dataset, Sample};
use candle_core::{bail, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};

/// How batches are drawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub seed: u64,
    /// Visit each epoch in a seeded random order (DiT's `DistributedSampler(shuffle=True)`).
    pub shuffle: bool,
    /// Drop an epoch's final incomplete batch (DiT's `DataLoader(drop_last=True)`).
    pub drop_last: bool,
    /// Loading threads; 0 loads on the calling thread with no read-ahead.
    pub num_workers: usize,
    /// How many batches the workers may read ahead of the consumer.
    pub prefetch_batches: usize,
    /// Skip (and count) samples that fail to load instead of returning the error.
    pub skip_bad: bool,
}

impl LoaderConfig {
    /// DiT's training defaults: shuffled, last incomplete batch dropped, one worker per core,
    /// two batches of read-ahead, unreadable files are errors.
    pub fn new(batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            seed,
            shuffle: true,
            drop_last: true,
            num_workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefetch_batches: 2,
            skip_bad: false,
        }
    }
}

/// Where the next batch starts: `position` items of epoch `epoch`'s permutation have been
/// consumed. Save it with a checkpoint; a loader built from it yields exactly the batches the
/// uninterrupted run would have yielded next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub position: u64,
}

/// One training batch.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[B, C, H, W]` f32.
    pub x: Tensor,
    /// `[B]` u32 class ids.
    pub y: Tensor,
    /// Epoch the batch belongs to.
    pub epoch: u64,
}

/// An endless stream of batches over a [`Dataset`], epoch after epoch.
pub struct DataLoader {
    dataset: Arc<dyn Dataset>,
    config: LoaderConfig,
    device: Device,
    state: LoaderState,
    skipped: u64,
    schedule: Schedule,
    pool: Option<WorkerPool>,
}

impl DataLoader {
    /// A loader that starts at `start` (`LoaderState::default()` for a fresh run) and puts
    /// batches on `device`.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        config: LoaderConfig,
        start: LoaderState,
        device: &Device,
    ) -> Result<Self> {
        let len = dataset.len();
        if config.batch_size == 0 {
            bail!("batch size must be positive");
        }
        if len == 0 {
            bail!("dataset is empty");
        }
        if config.drop_last && len < config.batch_size {
            bail!(
                "dataset has {len} items, fewer than one batch of {} (drop_last is set)",
                config.batch_size
            );
        }
        if start.position > len as u64 {
            bail!(
                "loader state position {} is beyond the dataset's {len} items",
                start.position
            );
        }
        let schedule = Schedule {
            seed: config.seed,
            shuffle: config.shuffle,
            len: len as u64,
            permutation: None,
        };
        let mut loader = Self {
            dataset,
            config,
            device: device.clone(),
            state: start,
            skipped: 0,
            schedule,
            pool: None,
        };
        loader.skip_exhausted_epoch();
        Ok(loader)
    }

    /// The next batch, crossing into the next epoch when the current one is used up.
    ///
    /// On error the loader stays at the batch that failed ([`Self::state`] is unchanged), so a
    /// checkpoint taken afterwards still resumes correctly.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let (state, skipped) = (self.state, self.skipped);
        let batch = self.assemble();
        if batch.is_err() {
            self.state = state;
            self.skipped = skipped;
            // The workers' read-ahead no longer matches the consumer: restart them lazily.
            self.pool = None;
        }
        batch
    }

    /// Where the next batch starts.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Samples skipped as unreadable (with `skip_bad`) since this loader was created.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Batches in an epoch when no sample is skipped.
    pub fn batches_per_epoch(&self) -> usize {
        let (len, b) = (self.dataset.len(), self.config.batch_size);
        if self.config.drop_last {
            len / b
        } else {
            len.div_ceil(b)
        }
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    fn assemble(&mut self) -> Result<Batch> {
        let len = self.dataset.len() as u64;
        let b = self.config.batch_size;
        loop {
            let LoaderState { epoch, position } = self.state;
            let mut samples = Vec::with_capacity(b);
            while samples.len() < b && self.state.position < len {
                let item = self.take(epoch * len + self.state.position)?;
                self.state.position += 1;
                match item {
                    Ok(sample) => samples.push(sample),
                    Err(_) if self.config.skip_bad => self.skipped += 1,
                    Err(e) => return Err(e),
                }
            }
            if samples.len() == b || (!self.config.drop_last && !samples.is_empty()) {
                self.skip_exhausted_epoch();
                return self.collate(epoch, samples);
            }
            if position == 0 {
                bail!(
                    "epoch {epoch}: no batch of {b} could be formed from {len} items \
                     ({} unreadable items skipped so far)",
                    self.skipped
                );
            }
            // Skipped items left the rest of this epoch short of a batch: continue with the next.
            self.state = LoaderState {
                epoch: epoch + 1,
                position: 0,
            };
        }
    }

    /// Moves to the next epoch once the current one cannot yield another batch, so that
    /// `state()` reports the epoch the next batch really comes from.
    fn skip_exhausted_epoch(&mut self) {
        let left = self.dataset.len() as u64 - self.state.position;
        if left == 0 || (self.config.drop_last && left < self.config.batch_size as u64) {
            self.state = LoaderState {
                epoch: self.state.epoch + 1,
                position: 0,
            };
        }
    }

    /// The item at global sequence number `seq` (= epoch * len + position). The outer error
    /// is a loader failure; the inner one is the dataset's, which `skip_bad` may skip.
    fn take(&mut self, seq: u64) -> Result<Result<Sample>> {
        if self.config.num_workers == 0 {
            return Ok(load(self.dataset.as_ref(), &self.schedule.job(seq)));
        }
        let pool = match &mut self.pool {
            Some(pool) => pool,
            None => self.pool.insert(WorkerPool::spawn(
                &self.dataset,
                self.config.num_workers,
                (self.config.prefetch_batches.max(1) * self.config.batch_size)
                    .max(self.config.num_workers) as u64,
                seq,
            )?),
        };
        pool.take(seq, &mut self.schedule)
    }

    fn collate(&self, epoch: u64, samples: Vec<Sample>) -> Result<Batch> {
        let [c, h, w] = self.dataset.sample_shape();
        let n = samples.len();
        let mut x = Vec::with_capacity(n * c * h * w);
        let mut y = Vec::with_capacity(n);
        for sample in samples {
            if sample.data.len() != c * h * w {
                bail!(
                    "dataset returned {} values for a sample of shape [{c}, {h}, {w}]",
                    sample.data.len()
                );
            }
            x.extend_from_slice(&sample.data);
            y.push(sample.label);
        }
        Ok(Batch {
            x: Tensor::from_vec(x, (n, c, h, w), &self.device)?,
            y: Tensor::from_vec(y, n, &self.device)?,
            epoch,
        })
    }
}

/// Endless: `loader.by_ref().take(steps)` draws a fixed number of batches.
impl Iterator for DataLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.next_batch())
    }
}

/// Maps sequence numbers to dataset indices and per-item seeds.
struct Schedule {
    seed: u64,
    shuffle: bool,
    len: u64,
    /// The permutation of the epoch most recently asked for.
    permutation: Option<(u64, Vec<usize>)>,
}

/// Distinct streams derived from the user's seed.
const PERMUTATION_STREAM: u64 = 1;
const ITEM_STREAM: u64 = 2;

impl Schedule {
    fn job(&mut self, seq: u64) -> Job {
        let (epoch, position) = (seq / self.len, seq % self.len);
        let index = if self.shuffle {
            let (seed, len) = (self.seed, self.len as usize);
            let (_, perm) = match &mut self.permutation {
                Some(cached) if cached.0 == epoch => cached,
                slot => slot.insert((epoch, epoch_permutation(seed, epoch, len))),
            };
            perm[position as usize]
        } else {
            position as usize
        };
        Job {
            seq,
            index,
            item_seed: derive_seed(&[self.seed, ITEM_STREAM, epoch, position]),
        }
    }
}

fn epoch_permutation(seed: u64, epoch: u64, len: usize) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(derive_seed(&[seed, PERMUTATION_STREAM, epoch]));
    let mut perm: Vec<usize> = (0..len).collect();
    perm.shuffle(&mut rng);
    perm
}

/// SplitMix64 finaliser (Steele et al. 2014): decorrelates nearby inputs such as consecutive
/// epochs or positions, so derived seeds don't produce related RNG streams.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn derive_seed(parts: &[u64]) -> u64 {
    parts.iter().fold(0, |h, &p| splitmix64(h ^ p))
}

struct Job {
    seq: u64,
    index: usize,
    item_seed: u64,
}

/// Loads one item; a panicking dataset becomes an error instead of a dead worker that the
/// consumer would wait on forever.
fn load(dataset: &dyn Dataset, job: &Job) -> Result<Sample> {
    let mut rng = StdRng::seed_from_u64(job.item_seed);
    catch_unwind(AssertUnwindSafe(|| dataset.get(job.index, &mut rng))).unwrap_or_else(|_| {
        Err(candle_core::Error::Msg(format!(
            "panic while loading item {}",
            job.index
        )))
    })
}

/// Worker threads fed in sequence order, at most `capacity` items ahead of the consumer.
struct WorkerPool {
    jobs: Sender<Job>,
    results: Receiver<(u64, Result<Sample>)>,
    stop: Arc<AtomicBool>,
    /// Results that arrived before the consumer asked for them.
    ready: BTreeMap<u64, Result<Sample>>,
    /// Next sequence number to hand to the workers.
    dispatched: u64,
    capacity: u64,
}

impl WorkerPool {
    fn spawn(
        dataset: &Arc<dyn Dataset>,
        num_workers: usize,
        capacity: u64,
        first_seq: u64,
    ) -> Result<Self> {
        let (job_tx, job_rx) = channel::<Job>();
        let (result_tx, results) = channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let stop = Arc::new(AtomicBool::new(false));
        for i in 0..num_workers {
            let (dataset, job_rx, result_tx, stop) = (
                Arc::clone(dataset),
                Arc::clone(&job_rx),
                result_tx.clone(),
                Arc::clone(&stop),
            );
            std::thread::Builder::new()
                .name(format!("ditmoe-data-{i}"))
                .spawn(move || loop {
                    let job = job_rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok(job) = job else { break };
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let result = load(dataset.as_ref(), &job);
                    if result_tx.send((job.seq, result)).is_err() {
                        break;
                    }
                })
                .map_err(|e| {
                    candle_core::Error::Msg(format!("cannot start data loader thread: {e}"))
                })?;
        }
        Ok(Self {
            jobs: job_tx,
            results,
            stop,
            ready: BTreeMap::new(),
            dispatched: first_seq,
            capacity,
        })
    }

    fn take(&mut self, seq: u64, schedule: &mut Schedule) -> Result<Result<Sample>> {
        // The consumer may jump ahead (an epoch's tail dropped by `drop_last`): forget
        // results it will never ask for and don't dispatch the items it jumped over.
        if self.ready.first_key_value().is_some_and(|(&k, _)| k < seq) {
            self.ready = self.ready.split_off(&seq);
        }
        self.dispatched = self.dispatched.max(seq);
        while self.dispatched < seq + self.capacity {
            if self.jobs.send(schedule.job(self.dispatched)).is_err() {
                bail!("data loader workers have exited");
            }
            self.dispatched += 1;
        }
        loop {
            if let Some(result) = self.ready.remove(&seq) {
                return Ok(result);
            }
            match self.results.recv() {
                Ok((s, result)) if s >= seq => {
                    self.ready.insert(s, result);
                }
                Ok(_) => {}
                Err(_) => bail!("data loader workers have exited"),
            }
        }
    }
}

/// Workers are detached: once the pool is gone they finish the item in hand, then see the
/// flag (or the closed queue) and exit, so dropping a loader never waits on a slow file.
impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
