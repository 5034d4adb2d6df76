//! virtio devices.

pub mod block;
pub mod console;
pub mod net;
pub mod rng;

pub use block::{Block, BlockError, BlockOptions};
pub use console::{Console, ConsoleBackend, ConsoleOptions, FdConsole, SocketConsole};
pub use net::{Net, NetBackend, NetOptions, NetPair, Tap};
pub use rng::Rng;
