//! Controlling a vCPU from other threads: kick, pause, resume and stop.
//!
//! # How a kick reaches the vCPU
//!
//! A [`VcpuHandle`] records the request (kick, pause or stop) in the vCPU's
//! shared control block, sets `immediate_exit` in the vCPU's `kvm_run`
//! mapping and sends the kick signal to the vCPU thread, all under one lock.
//! Whatever the vCPU thread is doing, the request is seen promptly:
//!
//! * inside `KVM_RUN`, the signal makes the ioctl return EINTR;
//! * about to enter `KVM_RUN` (or back in user space handling an exit),
//!   `immediate_exit` makes the next `KVM_RUN` return EINTR at once, after
//!   KVM has completed any port I/O or MMIO read in flight — so a paused vCPU
//!   never holds a half-finished exit;
//! * outside [`Vcpu::run`](crate::Vcpu::run) altogether, the request waits
//!   and the next `run` sees it first.
//!
//! On EINTR the run loop clears `immediate_exit` and takes the requests
//! under the same lock, so `immediate_exit` is set exactly while a request
//! is pending: a kick is never lost and never leaves a stale flag behind
//! (the failure Cloud Hypervisor issue 7427 describes).
//!
//! # Why `immediate_exit` is written through a raw pointer
//!
//! `kvm-ioctls`' `VcpuFd::run` holds a `&mut kvm_run` for the whole ioctl,
//! so writing the flag from another thread would alias it (rust-vmm/kvm
//! issue 373). vmkit issues `KVM_RUN` itself and treats the mapping as
//! memory shared with the kernel and other threads: the run loop reads exit
//! data through raw pointers, and `immediate_exit` is only ever accessed as
//! an `AtomicU8`. The mapping stays valid while any handle can write it:
//! dropping the `Vcpu` retires the control block (under its lock) before the
//! vCPU fd and its mapping go away, and a retired handle writes nothing.
//!
//! # The signal
//!
//! The kick signal defaults to `SIGRTMIN()`; [`set_kick_signal`] chooses
//! another before the first vCPU is created. Its handler, which does
//! nothing, is installed once per process, and [`Vcpu::run`](crate::Vcpu::run) unblocks the
//! signal on the calling thread.

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Errors from vCPU control.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The kick signal was already chosen (by an earlier
    /// [`set_kick_signal`] or the first vCPU).
    #[error("the kick signal is already {current}; it can be chosen only once per process")]
    SignalAlreadyChosen {
        /// The signal in use.
        current: c_int,
    },
    /// The signal number is not usable (not a real-time or standard signal,
    /// or SIGKILL/SIGSTOP).
    #[error("cannot use signal {signal} for kicks: {source}")]
    Signal {
        /// The signal.
        signal: c_int,
        /// What the system reported.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU was dropped.
    #[error("the vCPU no longer exists")]
    Gone,
}

/// What a vCPU is doing, as seen from a [`VcpuHandle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VcpuState {
    /// No thread is inside [`Vcpu::run`](crate::Vcpu::run).
    #[default]
    Idle,
    /// A thread is running the vCPU.
    Running,
    /// The vCPU is parked inside `run` by [`VcpuHandle::pause`].
    Paused,
}

static KICK_SIGNAL: OnceLock<Result<c_int, (c_int, i32)>> = OnceLock::new();

extern "C" fn on_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    // Nothing to do: the signal exists to make KVM_RUN return EINTR. (Empty,
    // hence async-signal-safe.)
}

fn install(signal: c_int) -> Result<c_int, (c_int, i32)> {
    if signal == libc::SIGKILL || signal == libc::SIGSTOP {
        return Err((signal, libc::EINVAL));
    }
    vmm_sys_util::signal::register_signal_handler(signal, on_kick)
        .map(|()| signal)
        .map_err(|e| (signal, e.errno()))
}

fn signal_result(r: &Result<c_int, (c_int, i32)>) -> Result<c_int, HandleError> {
    r.map_err(|(signal, errno)| HandleError::Signal {
        signal,
        source: std::io::Error::from_raw_os_error(errno),
    })
}

/// Chooses the signal used to kick vCPU threads and installs its handler.
/// Call it before creating the first vCPU; afterwards (or a second time
/// with another signal) it fails with
/// [`HandleError::SignalAlreadyChosen`].
pub fn set_kick_signal(signal: c_int) -> Result<(), HandleError> {
    let chosen = KICK_SIGNAL.get_or_init(|| install(signal));
    match chosen {
        Ok(current) if *current == signal => Ok(()),
        Ok(current) => Err(HandleError::SignalAlreadyChosen { current: *current }),
        Err(_) => signal_result(chosen).map(|_| ()),
    }
}

/// The kick signal, installing the default (`SIGRTMIN()`) on first use.
pub fn kick_signal() -> Result<c_int, HandleError> {
    signal_result(KICK_SIGNAL.get_or_init(|| install(vmm_sys_util::signal::SIGRTMIN())))
}

/// Unblocks `signal` on the calling thread.
fn unblock(signal: c_int) {
    // SAFETY: sigset_t is a plain bit array; all zeroes is a valid
    // (empty) value, and sigemptyset below makes it so portably.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: as above; a signal `install` accepted is valid, and an
    // invalid one would only make the call fail, leaving `set` as is.
    unsafe { libc::sigaddset(&mut set, signal) };
    // SAFETY: reads `set` and changes only the calling thread's mask;
    // the old mask is not requested (null).
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

/// What the run loop does after `KVM_RUN` returned EINTR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interrupt {
    /// Re-enter the guest (a pause ended, or a request was withdrawn).
    Continue,
    /// Return [`StopReason::Kicked`](crate::StopReason::Kicked).
    Kicked,
    /// Return [`StopReason::Stopped`](crate::StopReason::Stopped).
    Stopped,
    /// Not ours: another signal interrupted `KVM_RUN`.
    Foreign,
}

#[derive(Debug, Default)]
struct Control {
    /// False once the vCPU is dropped: nothing may touch its mapping.
    alive: bool,
    /// The thread inside `Vcpu::run`, if any.
    thread: Option<libc::pthread_t>,
    state: VcpuState,
    /// Some request was made since the run loop last took them.
    requested: bool,
    kick: bool,
    pause: bool,
    stop: bool,
    /// Threads waiting on `changed`; notifications (a futex syscall each)
    /// are skipped when there are none, which keeps them off the kick path.
    waiters: u32,
}

/// The `immediate_exit` byte of a vCPU's `kvm_run` mapping.
#[derive(Debug)]
struct ImmediateExit(*const AtomicU8);

// SAFETY: the pointer is only dereferenced as an `AtomicU8` (which is Sync)
// and only while the control block says the mapping is alive (see
// `VcpuShared::set_immediate_exit`), so sharing it between threads is sound.
unsafe impl Send for ImmediateExit {}
// SAFETY: as for Send.
unsafe impl Sync for ImmediateExit {}

/// The control block a [`Vcpu`](crate::Vcpu) shares with its handles.
#[derive(Debug)]
pub(crate) struct VcpuShared {
    immediate_exit: ImmediateExit,
    control: Mutex<Control>,
    changed: Condvar,
    signal: c_int,
}

impl VcpuShared {
    /// # Safety
    ///
    /// `immediate_exit` must point at the `immediate_exit` byte of a
    /// `kvm_run` mapping that stays mapped until [`retire`](Self::retire)
    /// has returned, and nothing may access that byte other than as an
    /// atomic (or from the kernel).
    pub(crate) unsafe fn new(immediate_exit: *mut u8) -> Result<Self, HandleError> {
        Ok(VcpuShared {
            immediate_exit: ImmediateExit(immediate_exit.cast_const().cast()),
            control: Mutex::new(Control {
                alive: true,
                ..Control::default()
            }),
            changed: Condvar::new(),
            signal: kick_signal()?,
        })
    }

    /// Wakes the waiters on `changed`, if there are any.
    fn notify(&self, c: &Control) {
        if c.waiters > 0 {
            self.changed.notify_all();
        }
    }

    /// Waits on `changed` (at most `timeout`, if given), counted in
    /// `waiters`.
    fn wait<'a>(
        &self,
        mut c: MutexGuard<'a, Control>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, Control> {
        c.waiters += 1;
        let mut c = match timeout {
            None => self.changed.wait(c).unwrap_or_else(PoisonError::into_inner),
            Some(t) => {
                self.changed
                    .wait_timeout(c, t)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
        c.waiters -= 1;
        c
    }

    fn lock(&self) -> MutexGuard<'_, Control> {
        // Every critical section leaves `Control` consistent.
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `immediate_exit`; the caller holds the lock and has checked
    /// `alive`.
    fn set_immediate_exit(&self, control: &Control, value: u8) {
        if control.alive {
            // SAFETY: `alive` is true and the caller holds the lock, so the
            // vCPU has not been retired: by the contract of `new` the
            // mapping is still there, and the byte is only accessed
            // atomically. `AtomicU8` has the size and alignment of `u8`.
            let flag = unsafe { &*self.immediate_exit.0 };
            flag.store(value, Ordering::SeqCst);
        }
    }

    /// Marks the vCPU as gone: from now on no handle touches its mapping.
    pub(crate) fn retire(&self) {
        let mut c = self.lock();
        c.alive = false;
        c.thread = None;
        c.state = VcpuState::Idle;
        self.notify(&c);
    }

    /// Called by `Vcpu::run` on entry: records the thread, unblocks the
    /// kick signal on it, and arms `immediate_exit` if requests are waiting.
    pub(crate) fn enter(&self) -> RunGuard<'_> {
        thread_local! {
            /// The kick signal this thread has unblocked, if any: one
            /// syscall per thread rather than one per `run`.
            static UNBLOCKED: std::cell::Cell<Option<c_int>> = const { std::cell::Cell::new(None) };
        }
        if UNBLOCKED.get() != Some(self.signal) {
            unblock(self.signal);
            UNBLOCKED.set(Some(self.signal));
        }
        let mut c = self.lock();
        // SAFETY: pthread_self has no preconditions.
        c.thread = Some(unsafe { libc::pthread_self() });
        c.state = VcpuState::Running;
        if c.requested {
            self.set_immediate_exit(&c, 1);
        }
        self.notify(&c);
        RunGuard { shared: self }
    }

    /// Sets `immediate_exit` for a KVM_RUN that only completes pending I/O.
    pub(crate) fn arm(&self) {
        let c = self.lock();
        self.set_immediate_exit(&c, 1);
    }

    /// Undoes [`arm`](Self::arm), unless a request is pending (which keeps
    /// `immediate_exit` set for `run`).
    pub(crate) fn disarm(&self) {
        let c = self.lock();
        if !c.requested {
            self.set_immediate_exit(&c, 0);
        }
    }

    /// Called by the run loop when `KVM_RUN` returned EINTR. Answers every
    /// request pending under one lock; one that cannot be answered now (a
    /// kick that came together with a stop) stays armed for the next
    /// `KVM_RUN`.
    pub(crate) fn interrupted(&self) -> Interrupt {
        let mut c = self.lock();
        self.set_immediate_exit(&c, 0);
        let mut ours = std::mem::take(&mut c.requested);
        if c.pause && !c.stop {
            c.state = VcpuState::Paused;
            self.notify(&c);
            while c.pause && !c.stop && c.alive {
                c = self.wait(c, None);
            }
            c.state = VcpuState::Running;
            self.notify(&c);
            // A kick or stop made before the pause was taken, or while
            // parked, is answered below: returning `Continue` with a kick
            // still flagged would lose it (immediate_exit is clear).
            c.requested = false;
            self.set_immediate_exit(&c, 0);
            ours = true;
        }
        let result = if c.stop {
            c.stop = false;
            Interrupt::Stopped
        } else if c.kick {
            c.kick = false;
            Interrupt::Kicked
        } else if ours {
            Interrupt::Continue
        } else {
            Interrupt::Foreign
        };
        if c.kick || c.stop || c.pause {
            c.requested = true;
            self.set_immediate_exit(&c, 1);
        }
        result
    }

    fn request(&self, f: impl FnOnce(&mut Control)) -> Result<(), HandleError> {
        let mut c = self.lock();
        if !c.alive {
            return Err(HandleError::Gone);
        }
        f(&mut c);
        c.requested = true;
        self.set_immediate_exit(&c, 1);
        if let Some(thread) = c.thread {
            // SAFETY: `thread` is recorded by `enter` and removed by
            // `RunGuard::drop`, both under this lock, so while we hold the
            // lock the thread is inside `Vcpu::run` and alive. The signal
            // has a handler (installed before any VcpuShared exists).
            let r = unsafe { libc::pthread_kill(thread, self.signal) };
            if r != 0 {
                log::warn!("kicking the vCPU thread failed: errno {r}");
            }
        }
        self.notify(&c);
        Ok(())
    }

    fn state(&self) -> VcpuState {
        self.lock().state
    }
}

/// Clears the running thread when `Vcpu::run` returns, however it returns.
pub(crate) struct RunGuard<'a> {
    shared: &'a VcpuShared,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        let mut c = self.shared.lock();
        c.thread = None;
        c.state = VcpuState::Idle;
        self.shared.notify(&c);
    }
}

/// Controls a [`Vcpu`](crate::Vcpu) from other threads (see the
/// [module documentation](self)). Cheap to clone; outliving the vCPU is
/// harmless (requests then fail with [`HandleError::Gone`]).
#[derive(Debug, Clone)]
pub struct VcpuHandle {
    pub(crate) shared: std::sync::Arc<VcpuShared>,
}

impl VcpuHandle {
    /// Makes [`Vcpu::run`](crate::Vcpu::run) return
    /// [`StopReason::Kicked`](crate::StopReason::Kicked) promptly (or at
    /// its next call, if no thread is running the vCPU). Kicks made before
    /// the run loop takes them merge into one.
    pub fn kick(&self) -> Result<(), HandleError> {
        self.shared.request(|c| c.kick = true)
    }

    /// Makes `run` return [`StopReason::Stopped`](crate::StopReason::Stopped)
    /// promptly, also from a pause.
    pub fn stop(&self) -> Result<(), HandleError> {
        self.shared.request(|c| c.stop = true)
    }

    /// Parks the vCPU and returns once it is parked (any port I/O or MMIO
    /// exit in flight completed) or no thread is running it.
    pub fn pause(&self) -> Result<(), HandleError> {
        self.shared.request(|c| c.pause = true)?;
        let mut c = self.shared.lock();
        while c.alive && c.pause && c.state == VcpuState::Running {
            c = self.shared.wait(c, None);
        }
        Ok(())
    }

    /// Like [`pause`](Self::pause) but gives up after `timeout`; returns
    /// whether the vCPU is parked (or idle). The pause request stays in
    /// place either way; [`resume`](Self::resume) withdraws it.
    pub fn pause_timeout(&self, timeout: Duration) -> Result<bool, HandleError> {
        self.shared.request(|c| c.pause = true)?;
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.lock();
        while c.alive && c.pause && c.state == VcpuState::Running {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            c = self.shared.wait(c, Some(left));
        }
        Ok(true)
    }

    /// Lets a paused vCPU run on (or withdraws a pause not yet taken).
    pub fn resume(&self) -> Result<(), HandleError> {
        let mut c = self.shared.lock();
        if !c.alive {
            return Err(HandleError::Gone);
        }
        c.pause = false;
        self.shared.notify(&c);
        Ok(())
    }

    /// Waits until the vCPU is in `state` (or dropped); returns whether it
    /// got there within `timeout`. For example, after a `pause` that found
    /// no thread inside `run`, waits for the next `run` to park.
    pub fn wait_for(&self, state: VcpuState, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.lock();
        while c.alive && c.state != state {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            c = self.shared.wait(c, Some(left));
        }
        c.state == state
    }

    /// What the vCPU is doing now.
    pub fn state(&self) -> VcpuState {
        self.shared.state()
    }
}

/// Pauses every vCPU of `handles` together: asks all of them first (so they
/// park in parallel), then waits for each. On return none of them runs
/// guest code until [`resume_all`].
pub fn pause_all(handles: &[VcpuHandle]) -> Result<(), HandleError> {
    for h in handles {
        h.shared.request(|c| c.pause = true)?;
    }
    for h in handles {
        h.pause()?;
    }
    Ok(())
}

/// Resumes every vCPU of `handles`.
pub fn resume_all(handles: &[VcpuHandle]) -> Result<(), HandleError> {
    handles.iter().try_for_each(VcpuHandle::resume)
}
