//! The device side of block, rng, net (transmit and receive) and console
//! over arbitrary descriptor chains in arbitrary guest memory, fed through
//! a queue of either ring format. Checks that nothing panics and that no
//! chain is returned with a used length past its writable size (the
//! per-chain devices are checked here; net receive and console check it in
//! `give_back` under debug assertions, which fuzz builds enable).
#![no_main]

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_memory::vm_memory::{Bytes, GuestAddress};
use vmkit_memory::{GuestMemoryMmap, MemoryLayout};
use vmkit_virtio::devices::console::{ConsoleBackend, ConsoleCounters, ConsoleEngine};
use vmkit_virtio::devices::net::{
    transmit_chain, FrameBufs, NetBackend, NetCounters, NetPair, PairBackend, RxEngine,
};
use vmkit_virtio::devices::rng::fill_chain;
use vmkit_virtio::devices::{Block, BlockOptions};
use vmkit_virtio::queue::{DescChain, Queue, QueueConfig, RingFormat};
use vmkit_virtio::worker::Completion;

#[derive(Arbitrary, Debug)]
enum Target {
    Block,
    Rng,
    NetTx,
    NetRx,
    ConsoleTx,
    ConsoleRx,
}

#[derive(Arbitrary, Debug)]
struct Input {
    target: Target,
    packed: bool,
    event_idx: bool,
    size_log: u8,
    /// Negotiated device features.
    features: u64,
    /// Written at 0x1000: descriptors, rings, indirect tables, buffers.
    memory: Vec<u8>,
    /// Frames waiting in the net backend, or console input.
    frames: Vec<Vec<u8>>,
    /// Console output: how much each write takes (0: WouldBlock).
    takes: Vec<u16>,
    rounds: u8,
}

const BASE: u64 = 0x1000;

/// A console backend with scripted input and output.
#[derive(Debug)]
struct Script {
    input: Vec<Vec<u8>>,
    takes: Vec<u16>,
    out: usize,
}

impl ConsoleBackend for Script {
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }
    fn read_input(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(next) = self.input.pop() else {
            return Ok(0);
        };
        let n = next.len().min(buf.len());
        buf[..n].copy_from_slice(&next[..n]);
        Ok(n)
    }
    fn write_output(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.takes.pop() {
            Some(0) => Err(io::ErrorKind::WouldBlock.into()),
            Some(t) => {
                let n = usize::from(t).min(buf.len());
                self.out += n;
                Ok(n)
            }
            None => Ok(buf.len()),
        }
    }
}

thread_local! {
    static DISK: RefCell<Option<Block>> = const { RefCell::new(None) };
    static PAIR: RefCell<Option<(PairBackend, PairBackend)>> = const { RefCell::new(None) };
}

fn disk() -> Block {
    let path = std::env::temp_dir().join(format!("vmkit-fuzz-disk-{}.img", std::process::id()));
    std::fs::write(&path, vec![0x5au8; 64 * 1024]).unwrap();
    let b = Block::open(&path, BlockOptions::default()).unwrap();
    let _ = std::fs::remove_file(&path);
    b
}

fn writable(chain: &DescChain) -> u64 {
    chain.writable().iter().map(|d| u64::from(d.len)).sum()
}

fn check(chain: &DescChain, c: Completion) {
    if let Completion::Used(n) = c {
        assert!(
            u64::from(n) <= writable(chain),
            "used {n} past {}",
            writable(chain)
        );
    }
}

/// Pops every chain (bounded) and hands it to `f`, returning it used.
fn per_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut f: impl FnMut(&DescChain) -> Completion,
) {
    for _ in 0..512 {
        match queue.pop(mem) {
            Ok(Some(chain)) => {
                let c = f(&chain);
                check(&chain, c);
                match c {
                    Completion::Used(n) => {
                        if queue.add_used(mem, chain.token(), n).is_err() {
                            return;
                        }
                    }
                    Completion::NotNow => {
                        queue.undo_pop(chain.token());
                        return;
                    }
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}

fuzz_target!(|input: Input| {
    let Ok(layout) = MemoryLayout::new(1 << 20) else {
        return;
    };
    let Ok(mem) = layout.create_memory(&Default::default()) else {
        return;
    };
    let bytes = &input.memory[..input.memory.len().min(0x8000)];
    let _ = mem.write_slice(bytes, GuestAddress(BASE));
    let size: u16 = 1 << (input.size_log % 9);
    let n = u64::from(size);
    let format = if input.packed {
        RingFormat::Packed
    } else {
        RingFormat::Split
    };
    let config = QueueConfig {
        max_size: 256,
        size,
        ready: true,
        desc: BASE,
        driver: BASE + 16 * n,
        device: (BASE + 16 * n + 6 + 2 * n + 3) & !3,
    };
    let Ok(mut queue) = Queue::new(0, &config, format, input.event_idx, &mem) else {
        return;
    };
    let features = input.features;
    match input.target {
        Target::Block => DISK.with(|d| {
            let mut d = d.borrow_mut();
            let block = d.get_or_insert_with(disk);
            per_chain(&mut queue, &mem, |chain| {
                block.process_chain(&mem, chain, features).unwrap()
            });
        }),
        Target::Rng => per_chain(&mut queue, &mem, |chain| fill_chain(&mem, chain)),
        Target::NetTx => PAIR.with(|p| {
            let mut p = p.borrow_mut();
            let (a, b) = p.get_or_insert_with(|| NetPair::new().unwrap());
            let counters = NetCounters::default();
            per_chain(&mut queue, &mem, |chain| {
                transmit_chain(&mem, chain, features, a, &counters)
            });
            // Drain what was sent so the socket never fills up.
            let mut sink = vec![0u8; 70_000];
            while b.recv(&mut FrameBufs::from_slice(&mut sink)).is_ok() {}
        }),
        Target::NetRx => PAIR.with(|p| {
            let mut p = p.borrow_mut();
            let (a, b) = p.get_or_insert_with(|| NetPair::new().unwrap());
            // Start from an empty socket.
            let mut sink = vec![0u8; 70_000];
            while b.recv(&mut FrameBufs::from_slice(&mut sink)).is_ok() {}
            for f in input.frames.iter().take(16) {
                let mut f = f.clone();
                let _ = a.send(&mut FrameBufs::from_slice(&mut f));
            }
            let counters = NetCounters::default();
            let mut engine = RxEngine::new(features);
            for _ in 0..=input.rounds % 4 {
                if engine.run(&mut queue, &mem, b, &counters, 64).is_err() {
                    break;
                }
            }
        }),
        Target::ConsoleTx | Target::ConsoleRx => {
            let mut backend = Script {
                input: input.frames.clone(),
                takes: input.takes.clone(),
                out: 0,
            };
            let counters = ConsoleCounters::default();
            let mut engine = ConsoleEngine::new(4096);
            for _ in 0..=input.rounds % 4 {
                let r = if matches!(input.target, Target::ConsoleTx) {
                    engine
                        .transmit(&mut queue, &mem, &mut backend, &counters)
                        .map(|_| ())
                } else {
                    engine.pump_input(&mut backend, &counters);
                    engine.deliver(&mut queue, &mem, &counters).map(|_| ())
                };
                if r.is_err() {
                    break;
                }
            }
            assert!(engine.pending_input() <= 4096);
        }
    }
});
