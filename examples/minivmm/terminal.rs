//! The host terminal in raw mode while the guest owns it, restored on every
//! way out: normal exit and errors (the guard's `Drop`), panics (a panic
//! hook) and Ctrl-C / SIGTERM (the main loop sees the signal and returns
//! normally, so the guard drops).
//!
//! "Raw" here keeps ISIG: Ctrl-C still raises SIGINT, which ends minivmm
//! cleanly, rather than going to the guest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::signal::register_signal_handler;

/// The terminal settings to restore, once raw mode was entered.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);
/// Set by SIGINT / SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
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
