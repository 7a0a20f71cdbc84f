//! Sampling runs off the UI thread: a run loads the model if it is not loaded yet, records
//! the trajectory and reports progress through a channel, waking the UI on every message
//! so the progress bar moves while the window stays responsive.
use candle_core::{DType, Device};
use ditmoe::analysis::{record_trajectory, Progress, RecordRequest, RoutingTrajectory};
use ditmoe::checkpoint::ModelDir;
use ditmoe::DitMoe;
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::Arc;

/// A model loaded on a device, shared between runs.
#[derive(Clone)]
pub struct LoadedModel {
    pub dir: ModelDir,
    pub model: Arc<DitMoe>,
    pub device: Device,
    pub dtype: DType,
}

enum Message {
    Progress(Progress),
    Done(Box<RunResult>),
}

/// A finished run: its trajectory and the model it loaded (kept for the next run), or why
/// it failed.
pub type RunResult = Result<(RoutingTrajectory, LoadedModel), String>;

/// What polling a run found.
pub enum Poll {
    Running(Option<Progress>),
    Finished(Box<RunResult>),
}

/// A run in flight.
pub struct Run {
    rx: Receiver<Message>,
    last: Option<Progress>,
}

impl Run {
    /// Starts a run on a new thread. `loaded` is reused when it is `dir` on `device` in
    /// `dtype`; otherwise the thread loads the model first. `wake` is called after every
    /// message (the UI passes `Context::request_repaint`).
    pub fn start(
        dir: ModelDir,
        loaded: Option<LoadedModel>,
        device: Device,
        dtype: DType,
        req: RecordRequest,
        wake: impl Fn() + Send + 'static,
    ) -> Self {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let result = (|| -> candle_core::Result<_> {
                let loaded = match loaded.filter(|l| l.dir.dir == dir.dir && l.device.same_device(&device) && l.dtype == dtype) {
                    Some(l) => l,
                    None => LoadedModel { model: Arc::new(dir.load(&ditmoe::ExecutionPlan::inference(&device, ditmoe::Precision::of_dtype(dtype)))?), dir: dir.clone(), device: device.clone(), dtype },
                };
                let label = loaded.dir.dir.display().to_string();
                let traj = record_trajectory(&loaded.model, &label, loaded.dir.class_names.clone(), &req, &loaded.device, &mut |p| {
                    // A closed channel means the window is gone: nothing to report to.
                    tx.send(Message::Progress(p)).ok();
                    wake();
                })?;
                Ok((traj, loaded))
            })();
            tx.send(Message::Done(Box::new(result.map_err(|e| e.to_string())))).ok();
            wake();
        });
        Self { rx, last: None }
    }

    /// Drains the channel without blocking.
    pub fn poll(&mut self) -> Poll {
        loop {
            match self.rx.try_recv() {
                Ok(Message::Progress(p)) => self.last = Some(p),
                Ok(Message::Done(r)) => return Poll::Finished(r),
                Err(TryRecvError::Empty) => return Poll::Running(self.last),
                Err(TryRecvError::Disconnected) => return Poll::Finished(Box::new(Err("the sampling thread stopped unexpectedly".into()))),
            }
        }
    }
}
