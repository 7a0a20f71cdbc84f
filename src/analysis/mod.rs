//! Expert-routing analysis: which experts a DiT-MoE model picks for which tokens, along a
//! whole sampling trajectory, and the official analysis views of it (`analysis/` of
//! feizc/DiT-MoE: expert load by timestep, by patch position, by class).
//!
//! * [`trajectory`]: [`RoutingTrajectory`], every routing decision of a run, on the host.
//! * [`record`]: sampling with the routing record on ([`record_trajectory`]).
//! * [`defaults`]: a model's sampling defaults (`generate.json`).
//! * [`store`]: saving and reloading a trajectory (safetensors + JSON), no model needed.
//! * [`matrix`]: [`Matrix`], the table every aggregation returns.
//! * [`aggregate`]: the aggregations (load per step/patch/class, entropy).
//! * [`colormap`], [`heatmap`]: heatmap PNG rendering.
//! * [`text`]: labels on figures, drawn by plotters with the bundled DejaVu Sans.
//! * [`figures`]: the labelled per-layer figures the CLI writes and the explorer shows.
//! * [`curves`]: language-model training curves (validation loss against training tokens).
//! * [`tradeoff`]: `ditmoe eval --sweep`'s guidance/steps trade-off chart.
pub mod aggregate;
pub mod chart;
pub mod colormap;
pub mod curves;
pub mod defaults;
pub mod figures;
pub mod heatmap;
pub mod matrix;
pub mod record;
pub mod store;
pub mod text;
pub mod tradeoff;
pub mod trajectory;

pub use defaults::RunDefaults;
pub use heatmap::{Heatmap, Scale};
pub use matrix::Matrix;
pub use crate::sampling::SamplerKind;
pub use record::{record_trajectory, Progress, RecordRequest};
pub use store::is_trajectory_dir;
pub use trajectory::{Dims, ImageRecord, RoutingTrajectory, TrajectoryMeta};
