//! The host terminal in raw mode while the guest owns it, restored on every
//! way out: normal exit and errors (the guard's `Drop`), panics (a panic
//! hook) and Ctrl-C / SIGTERM (the main loop sees the signal and returns
//! normally, so the guard drops).
//!
//! "Raw" here keeps ISIG: Ctrl-C still raises SIGINT, which ends minivmm
//! cleanly, rather than going to the guest.
//!
//! With `--snapshot`, SIGUSR1 asks for a snapshot (see
//! [`catch_snapshot_signal`]). Like SIGINT it only sets a flag, which the
//! main loop polls. vmkit's vCPU kicks use a real-time signal
//! (`SIGRTMIN`, [`vmkit_vcpu::handle::kick_signal`]), so the two never
//! meet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::signal::register_signal_handler;

/// The terminal settings to restore, once raw mode was entered.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);
/// Set by SIGINT / SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Set by SIGUSR1 (with `--snapshot`).
static SNAPSHOT_REQUESTED: AtomicBool = AtomicBool::new(false);

/// The signal that asks for a snapshot.
pub const SNAPSHOT_SIGNAL: libc::c_int = libc::SIGUSR1;

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

extern "C" fn on_snapshot_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an atomic store: async-signal-safe.
    SNAPSHOT_REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether SIGUSR1 arrived (since [`catch_snapshot_signal`]).
pub fn snapshot_requested() -> bool {
    SNAPSHOT_REQUESTED.load(Ordering::SeqCst)
}

/// Blocks (`block`) or unblocks the snapshot signal on the calling thread.
/// Threads inherit the mask of the thread that creates them.
fn mask_snapshot_signal(block: bool) -> Result<(), String> {
    // SAFETY: sigset_t is a plain bit array; all zeroes is a valid value,
    // which sigemptyset below makes the empty set portably.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: as above; SIGUSR1 is a valid signal number.
    unsafe { libc::sigaddset(&mut set, SNAPSHOT_SIGNAL) };
    let how = if block {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // SAFETY: reads `set` and changes only the calling thread's mask; the
    // old mask is not asked for (null).
    let rc = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "cannot change the mask of signal {SNAPSHOT_SIGNAL}: {}",
            std::io::Error::from_raw_os_error(rc)
        ))
    }
}

/// Routes SIGUSR1 to [`snapshot_requested`] and blocks it on the calling
/// thread, so that every thread created afterwards (vCPUs, device
/// workers, the console reader) has it blocked too and never sees its
/// blocking calls interrupted by it; [`accept_snapshot_signal`] then
/// unblocks it on the thread that polls the flag. A SIGUSR1 sent in
/// between waits, pending, until then.
pub fn catch_snapshot_signal() -> Result<(), String> {
    mask_snapshot_signal(true)?;
    register_signal_handler(SNAPSHOT_SIGNAL, on_snapshot_signal)
        .map_err(|e| format!("cannot install a handler for signal {SNAPSHOT_SIGNAL}: {e}"))
}

/// Unblocks SIGUSR1 on the calling thread (the main loop's): from now on
/// it is delivered here, and only here.
pub fn accept_snapshot_signal() -> Result<(), String> {
    mask_snapshot_signal(false)
}

/// Whether SIGINT or SIGTERM arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Routes SIGINT and SIGTERM to [`interrupted`].
pub fn catch_signals() -> Result<(), String> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(sig, on_signal)
            .map_err(|e| format!("cannot install a handler for signal {sig}: {e}"))?;
    }
    Ok(())
}

fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(t) = saved {
        // SAFETY: tcsetattr reads the termios struct we pass by reference
        // and changes only the terminal's settings.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    }
}

/// Raw mode for as long as it lives (a no-op when stdin is not a terminal).
#[derive(Debug)]
pub struct RawMode(());

impl RawMode {
    /// Enters raw mode if stdin is a terminal.
    pub fn enter() -> RawMode {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return RawMode(());
        }
        // SAFETY: termios is plain data; all-zero is a valid value that
        // tcgetattr overwrites.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into the struct we own.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return RawMode(());
        }
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        let mut raw = t;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHONL | libc::IEXTEN);
        raw.c_iflag &= !(libc::ICRNL | libc::IXON | libc::INLCR | libc::IGNCR);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: as for restore.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) };
        RawMode(())
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}
