//! The mixture-of-experts engine shared by every model that uses it (the image DiT, and the
//! language-model path): routing, experts, dispatch and the block that combines them.
pub mod balance_loss;
pub mod dispatch;
pub mod experts;
pub mod router;
pub mod sparse_moe;

pub use balance_loss::balance_loss;
pub use dispatch::ExpertDispatch;
pub use experts::SwigluExpert;
pub use router::{Routing, TopKRouter};
pub use sparse_moe::{MoeOutput, SharedExpertMoe};
