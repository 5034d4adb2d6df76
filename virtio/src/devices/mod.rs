//! virtio devices.

pub mod block;
pub mod rng;

pub use block::{Block, BlockError, BlockOptions};
pub use rng::Rng;
