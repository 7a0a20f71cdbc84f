//! The mixture-of-experts engine. It knows no model: a [`MoeConfig`] (experts, top-k, shared
//! expert, expert form, router, balance loss, capacity) and an execution plan build a
//! [`MoeLayer`], which maps tokens `[S, d]` to its output, its routing record and, in training,
//! its auxiliary losses. Two routers share the dispatch, the expert forms and the kernels:
//! DiT-MoE's top-k softmax router ([`TopKRouter`]) and ProMoE's prototypical router with an
//! unconditional expert ([`PrototypicalRouter`], [`RoutingContrastive`]).
pub mod balance_loss;
pub mod capacity;
pub mod config;
pub mod contrastive;
pub mod dispatch;
pub mod experts;
pub mod kernels;
pub mod layer;
pub mod prototypical;
pub mod router;

pub use balance_loss::{balance_loss, hf_load_balancing_loss};
pub use config::{BalanceForm, BalanceLossConfig, CapacityPolicy, ExpertForm, MoeConfig, ParamNames, RouterConfig};
pub use contrastive::RoutingContrastive;
pub use dispatch::ExpertDispatch;
pub use kernels::expert_act::GeluKind;
pub use experts::{stack_frozen, Experts, GeluMlp, SharedExpert, StackedExperts, SwigluExpert};
pub use layer::{MoeInput, MoeLayer, MoeOutput, MoeRouter, ResidualMlp};
pub use prototypical::{normalize_rows, PrototypicalRouter, WeightMode};
pub use router::{Routing, TopKRouter};
