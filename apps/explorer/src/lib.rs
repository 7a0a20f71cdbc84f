//! The DiT-MoE expert-routing explorer: sample with a model (or open a saved trajectory) and
//! browse which experts every patch is routed to, step by step and layer by layer.
//!
//! * [`app`]: [`ExplorerApp`], the state and UI (eframe-independent, tested with kittest).
//! * [`worker`]: sampling runs on a background thread.
//! * [`views`]: the pictures each view shows and exports.
//! * [`pictures`]: model states as images.
pub mod app;
pub mod pictures;
pub mod views;
pub mod worker;

pub use app::ExplorerApp;
