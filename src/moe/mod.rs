//! The mixture-of-experts engine shared by every model that uses it (the image DiT, and the
//! language-model path): routing, experts, dispatch and the layers that combine them. Two
//! routers share the dispatch and expert forms: DiT-MoE's top-k softmax router
//! ([`TopKRouter`], [`SharedExpertMoe`]) and ProMoE's prototypical router with an
//! unconditional expert ([`PrototypicalRouter`], [`ProMoeMoe`], [`RoutingContrastive`]).
pub mod balance_loss;
pub mod contrastive;
pub mod dispatch;
pub mod experts;
pub mod fused;
pub mod promoe_moe;
pub mod prototypical;
pub mod router;
pub mod sparse_moe;

pub use balance_loss::balance_loss;
pub use contrastive::RoutingContrastive;
pub use dispatch::ExpertDispatch;
pub use experts::{stack_frozen, GeluMlp, StackedExperts, SwigluExpert};
pub use fused::FusedSwiglu;
pub use promoe_moe::ProMoeMoe;
pub use prototypical::{normalize_rows, PrototypicalRouter, WeightMode};
pub use router::{Router, Routing, TopKRouter};
pub use sparse_moe::{routed_forward, MoeOutput, SharedExpertMoe};
