//! Deterministic test data shared by the build (which bakes digests and the
//! write pattern into the L2 initramfs) and the L1 agent (which writes the
//! disk and serves the payload): both are the same program, so they agree.

use sha2::{Digest, Sha256};

/// Size of the disk image the agent gives L2 (sparse beyond the patterns:
/// room for the sequential-read benchmark).
pub const DISK_SIZE: u64 = (DD_MIB + 4) << 20;
/// MiB L2 reads sequentially from the disk for the throughput benchmark.
pub const DD_MIB: u64 = 256;
/// Where L2 leaves its kernel log when profiling (`vmkit.dmesg`), after
/// the benchmark's range; at most [`DMESG_MAX`] bytes, NUL-terminated by
/// the zeros after it.
pub const DMESG_OFFSET: u64 = DD_MIB << 20;
/// The most kernel log L2 leaves on the disk.
pub const DMESG_MAX: u64 = 4 << 20;
/// The pattern L2 reads sits at the start of the disk.
pub const BLK_READ_LEN: usize = 64 << 10;
/// Where L2 writes its pattern (L2's `dd ... seek=256` with 4 KiB blocks).
pub const BLK_WRITE_OFFSET: u64 = 1 << 20;
/// Length of the pattern L2 writes.
pub const BLK_WRITE_LEN: usize = 64 << 10;
/// Length of the payload L2 fetches over the network.
pub const PAYLOAD_LEN: usize = 256 << 10;

/// `len` pseudo-random bytes from an xorshift64* stream seeded with `seed`.
fn stream(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The bytes the agent writes at the start of the disk for L2 to read.
pub fn blk_read_pattern() -> Vec<u8> {
    stream(0x766d_6b69_745f_7264, BLK_READ_LEN)
}

/// The bytes L2 writes at [`BLK_WRITE_OFFSET`] (shipped in its initramfs).
pub fn blk_write_pattern() -> Vec<u8> {
    stream(0x766d_6b69_745f_7772, BLK_WRITE_LEN)
}

/// The payload the agent serves to L2 over TCP.
pub fn payload() -> Vec<u8> {
    stream(0x766d_6b69_745f_6e65, PAYLOAD_LEN)
}

/// Lower-case hex SHA-256 of `data`, as `sha256sum` prints it.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_deterministic_distinct_and_sized() {
        assert_eq!(blk_read_pattern(), blk_read_pattern());
        assert_eq!(blk_read_pattern().len(), BLK_READ_LEN);
        assert_eq!(blk_write_pattern().len(), BLK_WRITE_LEN);
        assert_eq!(payload().len(), PAYLOAD_LEN);
        assert_ne!(blk_read_pattern(), blk_write_pattern());
        assert_ne!(blk_read_pattern().get(..4096), payload().get(..4096));
        // Not a constant fill: a stuck generator would make the checks vacuous.
        let p = payload();
        let zeros = p.iter().filter(|b| **b == 0).count();
        assert!(zeros < PAYLOAD_LEN / 64, "{zeros} zero bytes");
        // The write region must not overlap the read pattern.
        assert!(BLK_WRITE_OFFSET >= BLK_READ_LEN as u64);
        assert!(BLK_WRITE_OFFSET + BLK_WRITE_LEN as u64 <= DISK_SIZE);
    }

    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
