//! A priority scheduler for remote fetches: at most `limit` fetches run at once
//! (at most `limit - 1` of them prefetch or background: the last slot is kept
//! for a container's reads), and when a slot frees the most urgent waiter gets
//! it: every queued
//! [`Priority::Foreground`] request goes before any [`Priority::Prefetch`] one,
//! which goes before any [`Priority::Background`] one; equal priorities are
//! served in arrival order.
//!
//! Callers are plain threads: [`Scheduler::acquire`] blocks until a slot is
//! granted and returns a [`Permit`] that frees the slot when dropped.
//!
//! A queued request can be made more urgent while it waits
//! ([`Scheduler::acquire_dyn`] with a [`PrioCell`]): when a foreground reader
//! needs bytes that a queued background fetch will bring, it raises that
//! fetch's priority instead of waiting behind all other traffic (no priority
//! inversion, no starvation of readers behind background download).
//!
//! A [`Priority::Prefetch`] request is granted only while no foreground
//! fetch runs, in this process or (with [`Scheduler::with_host_flag`]) a
//! container's read in any other on the host: the working set the
//! snapshotter fetches ahead of a device shares the link with the device
//! worker's reads. Only the schedulers of containers' reads raise the flag
//! (a device worker's); the snapshotter's own foreground fetches (layer
//! opens during a pull) hold only its own prefetches, as before: holding
//! the working set behind them delayed it by 80–100 ms at 1 Gbit/s.
//!
//! Why hold them: prefetch keeps a slow link busy, and a container's read
//! that misses it then waits behind the queued prefetch bytes at the
//! bottleneck, over a connection that restarts slow start after idling, on
//! a round trip those bytes inflate: a 256 KiB read took 405 ms on a 100 Mbit/s link
//! beside two 512 KiB prefetches (docs/BENCHMARKS.md, issue 18, "Misses
//! during a prefetch"). Holding the next prefetch until the read is done
//! lets the link drain for it; the prefetches already running go on.
//!
//! Background fetches also stay out of the way of running ones: a
//! [`Priority::Background`] request is granted only when no more urgent fetch
//! holds a slot and none has for [`BACKGROUND_QUIET`]. A whole-blob download
//! shares the link and the CPU with the reads it would slow down, so it runs
//! in the pauses between a container's reads, not beside them.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Priority;
use crate::cache::ForegroundFlag;
use zfile::sync::{recover, MutexExt};

/// Default number of fetches allowed in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// How often a prefetch held by another process's foreground fetch looks
/// again (no wake-up crosses processes).
const HOST_POLL: Duration = Duration::from_millis(2);

/// How long after the last foreground or prefetch fetch a background fetch
/// waits before it is granted a slot.
pub const BACKGROUND_QUIET: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct State {
    /// Fetches holding a slot.
    running: usize,
    /// Waiters, most urgent first: (priority, arrival ticket).
    queue: BTreeSet<(Priority, u64)>,
    next_ticket: u64,
    /// Slots granted so far, per priority (diagnostics).
    granted: [u64; 3],
    /// Foreground and prefetch fetches holding a slot.
    urgent_running: usize,
    /// Foreground fetches holding a slot.
    fg_running: usize,
    /// When the last of them finished.
    urgent_idle_since: Option<Instant>,
}

/// Bounded-concurrency, strict-priority admission for fetches. Share it (in an
/// `Arc`) between every [`RemoteBlob`](super::blob::RemoteBlob) that should
/// count against the same limit.
#[derive(Debug)]
pub struct Scheduler {
    limit: usize,
    background_quiet: Duration,
    state: Mutex<State>,
    cv: Condvar,
    /// Prefetches wait while another flag on the host is raised; with
    /// `raise_host`, this one is raised while a foreground fetch of this
    /// scheduler runs.
    host: Option<ForegroundFlag>,
    raise_host: AtomicBool,
}

/// A granted fetch slot; dropping it frees the slot for the next waiter.
#[derive(Debug)]
#[must_use = "the slot is released when the permit is dropped"]
pub struct Permit<'a> {
    sched: &'a Scheduler,
    prio: Priority,
}

impl Permit<'_> {
    /// The priority the slot was requested with.
    pub fn priority(&self) -> Priority {
        self.prio
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut st = self.sched.lock();
        st.running -= 1;
        if self.prio == Priority::Foreground {
            st.fg_running -= 1;
            if st.fg_running == 0 && self.sched.raise_host.load(Ordering::Relaxed) {
                if let Some(h) = &self.sched.host {
                    h.lower();
                }
            }
        }
        if self.prio != Priority::Background {
            st.urgent_running -= 1;
            if st.urgent_running == 0 {
                st.urgent_idle_since = Some(Instant::now());
            }
        }
        drop(st);
        self.sched.cv.notify_all();
    }
}

fn prio_from(v: u8) -> Priority {
    match v {
        0 => Priority::Foreground,
        1 => Priority::Prefetch,
        _ => Priority::Background,
    }
}

/// A priority that other threads may raise while its request is queued.
#[derive(Debug)]
pub struct PrioCell(AtomicU8);

impl PrioCell {
    /// A cell holding `prio`.
    pub fn new(prio: Priority) -> Self {
        Self(AtomicU8::new(prio as u8))
    }

    /// The current priority.
    pub fn get(&self) -> Priority {
        prio_from(self.0.load(Ordering::Acquire))
    }

    /// Makes the priority at least as urgent as `prio`; returns whether it
    /// changed. Call [`Scheduler::nudge`] afterwards so a queued request
    /// notices.
    pub fn raise(&self, prio: Priority) -> bool {
        self.0.fetch_min(prio as u8, Ordering::AcqRel) > prio as u8
    }
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new(DEFAULT_CONCURRENCY)
    }
}

impl Scheduler {
    /// A scheduler allowing `limit` concurrent fetches (0 is treated as 1).
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            background_quiet: BACKGROUND_QUIET,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            host: None,
            raise_host: AtomicBool::new(false),
        }
    }

    /// The same scheduler holding its prefetches while another process's
    /// container read runs, through `flag`; with `raise`, its own
    /// foreground fetches are containers' reads and raise it (see the
    /// module docs).
    pub fn with_host_flag(mut self, flag: ForegroundFlag, raise: bool) -> Self {
        self.host = Some(flag);
        self.raise_host = AtomicBool::new(raise);
        self
    }

    /// Sets whether this scheduler's foreground fetches raise its host
    /// flag ([`Scheduler::with_host_flag`]); from its next foreground fetch
    /// that starts with none running.
    pub fn set_raise_host_flag(&self, raise: bool) {
        self.raise_host.store(raise, Ordering::Relaxed);
    }

    /// Whether another process's foreground fetch runs now.
    fn foreground_elsewhere(&self) -> bool {
        self.host.as_ref().is_some_and(|h| h.raised_elsewhere())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few counters updated atomically under the lock; a
        // panic elsewhere cannot leave it half-updated.
        self.state.locked()
    }

    /// The same scheduler with background fetches waiting `quiet` (instead of
    /// [`BACKGROUND_QUIET`]) after the last urgent fetch; zero lets them run
    /// beside urgent ones whenever a slot is free.
    pub fn with_background_quiet(mut self, quiet: Duration) -> Self {
        self.background_quiet = quiet;
        self
    }

    /// The concurrency limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Slots a request at `prio` may be granted while others run: all of
    /// them for a foreground read; one fewer for prefetch and background
    /// (when the limit is above 1), so a container's read never queues
    /// behind a full house of long prefetch requests.
    fn cap(&self, prio: Priority) -> usize {
        if prio == Priority::Foreground || self.limit < 2 {
            self.limit
        } else {
            self.limit - 1
        }
    }

    /// Blocks until a slot is free and no more urgent (or earlier equally
    /// urgent) request is waiting, then takes the slot.
    pub fn acquire(&self, prio: Priority) -> Permit<'_> {
        self.acquire_dyn(&PrioCell::new(prio))
    }

    /// [`Scheduler::acquire`] with a priority that may be raised (by
    /// [`PrioCell::raise`] + [`Scheduler::nudge`]) while the request waits. The
    /// permit carries the priority the slot was finally granted at.
    pub fn acquire_dyn(&self, cell: &PrioCell) -> Permit<'_> {
        let mut st = self.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        let mut me = (cell.get(), ticket);
        st.queue.insert(me);
        // Wake anyone in `wait_queued`.
        self.cv.notify_all();
        loop {
            let now = cell.get();
            if now < me.0 {
                st.queue.remove(&me);
                me.0 = now;
                st.queue.insert(me);
                self.cv.notify_all();
            }
            if st.running < self.cap(me.0) && st.queue.first() == Some(&me) {
                // The most urgent waiter; a background one also waits out
                // running urgent fetches and the quiet time after them, a
                // prefetch running foreground ones.
                let quiet_left = match (me.0, st.urgent_idle_since) {
                    (Priority::Background, _) if self.background_quiet.is_zero() => {
                        Some(Duration::ZERO)
                    }
                    (Priority::Background, _) if st.urgent_running > 0 => None,
                    (Priority::Background, Some(t)) => {
                        Some(self.background_quiet.saturating_sub(t.elapsed()))
                    }
                    (Priority::Prefetch, _) if st.fg_running > 0 => None,
                    (Priority::Prefetch, _) if self.foreground_elsewhere() => Some(HOST_POLL),
                    _ => Some(Duration::ZERO),
                };
                match quiet_left {
                    Some(d) if d.is_zero() => break,
                    Some(d) => {
                        st = recover(self.cv.wait_timeout(st, d)).0;
                        continue;
                    }
                    None => {}
                }
            }
            st = recover(self.cv.wait(st));
        }
        st.queue.remove(&me);
        st.running += 1;
        if me.0 != Priority::Background {
            st.urgent_running += 1;
        }
        if me.0 == Priority::Foreground {
            st.fg_running += 1;
            if st.fg_running == 1 && self.raise_host.load(Ordering::Relaxed) {
                if let Some(h) = &self.host {
                    h.raise();
                }
            }
        }
        st.granted[me.0 as usize] += 1;
        let more = st.running < self.limit && !st.queue.is_empty();
        // (A waiter that does not fit re-checks its own cap.)
        drop(st);
        if more {
            // The next waiter may fit too.
            self.cv.notify_all();
        }
        Permit {
            sched: self,
            prio: me.0,
        }
    }

    /// Wakes queued requests so they re-read their [`PrioCell`]s.
    pub fn nudge(&self) {
        let _st = self.lock();
        self.cv.notify_all();
    }

    /// Runs `f` holding a slot of priority `prio`.
    pub fn run<T>(&self, prio: Priority, f: impl FnOnce() -> T) -> T {
        let _permit = self.acquire(prio);
        f()
    }

    /// Fetches holding a slot now.
    pub fn running(&self) -> usize {
        self.lock().running
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Slots granted so far at `prio`.
    pub fn granted(&self, prio: Priority) -> u64 {
        self.lock().granted[prio as usize]
    }

    /// Requests waiting for a slot now at priority `prio`.
    pub fn queued_at(&self, prio: Priority) -> usize {
        self.lock().queue.iter().filter(|q| q.0 == prio).count()
    }

    /// Blocks until at least `n` requests are waiting for a slot. For tests and
    /// diagnostics: lets a caller order events without sleeping.
    pub fn wait_queued(&self, n: usize) {
        let mut st = self.lock();
        while st.queue.len() < n {
            st = recover(self.cv.wait(st));
        }
    }

    /// Blocks until at least `n` requests are waiting at priority `prio`
    /// (counting requests raised to it). For tests and diagnostics.
    pub fn wait_queued_at(&self, prio: Priority, n: usize) {
        let mut st = self.lock();
        while st.queue.iter().filter(|q| q.0 == prio).count() < n {
            st = recover(self.cv.wait(st));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_zero_is_one_and_permits_release() {
        let s = Scheduler::new(0);
        assert_eq!(s.limit(), 1);
        {
            let p = s.acquire(Priority::Background);
            assert_eq!(p.priority(), Priority::Background);
            assert_eq!(s.running(), 1);
        }
        assert_eq!(s.running(), 0);
        assert_eq!(s.run(Priority::Foreground, || 7), 7);
        assert_eq!(s.granted(Priority::Foreground), 1);
        assert_eq!(s.granted(Priority::Background), 1);
    }
}
