//! The fetch scheduler: bounded concurrency, strict priority when a slot frees.
//! Ordered with channels and `wait_queued`, never with sleeps.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use obd_remote::sched::Scheduler;
use obd_remote::Priority;

/// With one slot held, queues `prios` in the given order (each one is queued
/// before the next is started), frees the slot and returns the grant order.
fn grant_order(prios: &[Priority]) -> Vec<(Priority, usize)> {
    let s = Arc::new(Scheduler::new(1));
    let order = Arc::new(Mutex::new(Vec::new()));
    let (held_tx, held_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let holder = {
        let s = Arc::clone(&s);
        thread::spawn(move || {
            let _p = s.acquire(Priority::Foreground);
            held_tx.send(()).unwrap();
            // The "blocked in-flight fetch".
            release_rx.recv().unwrap();
        })
    };
    held_rx.recv().unwrap();
    assert_eq!(s.running(), 1);
    let mut waiters = Vec::new();
    for (k, &prio) in prios.iter().enumerate() {
        let (s2, order2) = (Arc::clone(&s), Arc::clone(&order));
        waiters.push(thread::spawn(move || {
            let _p = s2.acquire(prio);
            order2.lock().unwrap().push((prio, k));
        }));
        s.wait_queued(k + 1);
    }
    assert_eq!(s.running(), 1, "nobody may start while the slot is held");
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    for w in waiters {
        w.join().unwrap();
    }
    assert_eq!((s.running(), s.queued()), (0, 0));
    let v = order.lock().unwrap().clone();
    v
}

#[test]
fn foreground_overtakes_earlier_background() {
    let got = grant_order(&[Priority::Background, Priority::Foreground]);
    assert_eq!(
        got,
        vec![(Priority::Foreground, 1), (Priority::Background, 0)]
    );
}

#[test]
fn strict_priority_then_arrival_order() {
    use Priority::*;
    let got = grant_order(&[
        Background, Prefetch, Foreground, Background, Foreground, Prefetch,
    ]);
    assert_eq!(
        got,
        vec![
            (Foreground, 2),
            (Foreground, 4),
            (Prefetch, 1),
            (Prefetch, 5),
            (Background, 0),
            (Background, 3),
        ]
    );
}

#[test]
fn concurrency_is_bounded() {
    let s = Arc::new(Scheduler::new(3));
    let peak = Arc::new(Mutex::new((0usize, 0usize)));
    let barrier = Arc::new(std::sync::Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let (s, peak, barrier) = (Arc::clone(&s), Arc::clone(&peak), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                for _ in 0..50 {
                    let prio = [
                        Priority::Foreground,
                        Priority::Prefetch,
                        Priority::Background,
                    ][i % 3];
                    s.run(prio, || {
                        let mut p = peak.lock().unwrap();
                        p.0 += 1;
                        p.1 = p.1.max(p.0);
                        drop(p);
                        thread::yield_now();
                        peak.lock().unwrap().0 -= 1;
                    });
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let p = *peak.lock().unwrap();
    assert!(p.1 <= 3 && p.1 >= 1, "peak {}", p.1);
    assert_eq!(s.running(), 0);
    let total: u64 = [
        Priority::Foreground,
        Priority::Prefetch,
        Priority::Background,
    ]
    .iter()
    .map(|&p| s.granted(p))
    .sum();
    assert_eq!(total, 16 * 50);
}

#[test]
fn raised_request_is_requeued_at_its_new_priority() {
    use obd_remote::sched::PrioCell;
    let s = Arc::new(Scheduler::new(1));
    let held = s.acquire(Priority::Foreground);
    let order = Arc::new(Mutex::new(Vec::new()));
    let cell = Arc::new(PrioCell::new(Priority::Background));
    let spawn = |name: &'static str, cell: Arc<PrioCell>| {
        let (s, order) = (Arc::clone(&s), Arc::clone(&order));
        thread::spawn(move || {
            let p = s.acquire_dyn(&cell);
            order.lock().unwrap().push((name, p.priority()));
        })
    };
    let bg = spawn("raised", Arc::clone(&cell));
    s.wait_queued(1);
    let pf = spawn("prefetch", Arc::new(PrioCell::new(Priority::Prefetch)));
    s.wait_queued(2);
    assert!(cell.raise(Priority::Foreground));
    assert!(!cell.raise(Priority::Prefetch), "raise never lowers");
    s.nudge();
    s.wait_queued_at(Priority::Foreground, 1);
    drop(held);
    bg.join().unwrap();
    pf.join().unwrap();
    assert_eq!(
        *order.lock().unwrap(),
        vec![
            ("raised", Priority::Foreground),
            ("prefetch", Priority::Prefetch)
        ]
    );
}

/// A background fetch does not take a free slot while a foreground fetch
/// runs, and starts only the quiet time after the last one ended; a
/// foreground fetch arriving meanwhile goes first.
#[test]
fn background_waits_for_foreground_to_pause() {
    use std::time::{Duration, Instant};
    let quiet = Duration::from_millis(50);
    let s = Arc::new(Scheduler::new(4).with_background_quiet(quiet));
    let fg = s.acquire(Priority::Foreground);
    let (granted_tx, granted_rx) = mpsc::channel();
    let bg = {
        let s = Arc::clone(&s);
        thread::spawn(move || {
            let _p = s.acquire(Priority::Background);
            granted_tx.send(Instant::now()).unwrap();
        })
    };
    s.wait_queued_at(Priority::Background, 1);
    // Slots are free, yet the background request stays queued; another
    // foreground request is granted at once.
    let fg2 = s.acquire(Priority::Foreground);
    assert_eq!(s.running(), 2);
    assert_eq!(s.queued_at(Priority::Background), 1);
    drop(fg);
    // Taken before the last foreground slot is freed: the quiet time starts
    // no earlier than this.
    let before_idle = Instant::now();
    drop(fg2);
    let at = granted_rx.recv().unwrap();
    bg.join().unwrap();
    assert!(
        at.duration_since(before_idle) >= quiet,
        "granted {:?} after the last foreground fetch, quiet time {quiet:?}",
        at.duration_since(before_idle)
    );
    assert_eq!(s.granted(Priority::Background), 1);
}

/// With no foreground traffic at all a background fetch starts at once, and
/// a quiet time of zero turns the pause off.
#[test]
fn background_runs_when_nothing_else_does() {
    let s = Scheduler::new(2);
    drop(s.acquire(Priority::Background));
    let s = Scheduler::new(3).with_background_quiet(std::time::Duration::ZERO);
    let _fg = s.acquire(Priority::Foreground);
    let _bg = s.acquire(Priority::Background);
    assert_eq!(s.running(), 2);
}

/// Acquires a prefetch slot of `s` on a thread of its own, which sends on
/// the channel once it has it (then frees it).
fn prefetch_in_thread(s: &Arc<Scheduler>) -> (mpsc::Receiver<()>, thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let s = Arc::clone(s);
    let t = thread::spawn(move || {
        let p = s.acquire(Priority::Prefetch);
        tx.send(()).unwrap();
        drop(p);
    });
    (rx, t)
}

/// A prefetch waits while a foreground fetch runs (slots free or not), and
/// starts when the last one ends; prefetches already running go on.
#[test]
fn prefetch_waits_for_running_foreground_fetches() {
    let s = Arc::new(Scheduler::new(8));
    let running = s.acquire(Priority::Prefetch);
    let fg = s.acquire(Priority::Foreground);
    let fg2 = s.acquire(Priority::Foreground);
    let (rx, t) = prefetch_in_thread(&s);
    s.wait_queued_at(Priority::Prefetch, 1);
    assert_eq!(s.running(), 3);
    drop(fg);
    // One foreground fetch still runs: the prefetch still waits.
    assert!(rx.try_recv().is_err());
    assert_eq!(s.queued_at(Priority::Prefetch), 1);
    drop(fg2);
    rx.recv().unwrap();
    t.join().unwrap();
    drop(running);
    assert_eq!(s.granted(Priority::Prefetch), 2);
}

/// Two schedulers over one cache directory, as the snapshotter (fetching a
/// working set ahead) and a device worker (a container's reads) are: a
/// foreground fetch of one holds the other's next prefetch until it ends,
/// and a flag whose file is closed (its process gone) holds nothing.
#[test]
fn prefetch_waits_for_foreground_fetches_of_other_processes() {
    use obd_remote::cache::{BlockCache, CacheOptions};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let cache = BlockCache::open(CacheOptions::new(dir.path())).unwrap();
    let worker = Scheduler::new(8).with_host_flag(cache.foreground_flag().unwrap(), true);
    let ahead = Arc::new(Scheduler::new(8).with_host_flag(cache.foreground_flag().unwrap(), false));
    // Nothing runs in the worker: the prefetch goes at once.
    drop(ahead.acquire(Priority::Prefetch));
    let fg = worker.acquire(Priority::Foreground);
    let fg2 = worker.acquire(Priority::Foreground);
    let (rx, t) = prefetch_in_thread(&ahead);
    ahead.wait_queued_at(Priority::Prefetch, 1);
    drop(fg);
    // One of the worker's foreground fetches still runs.
    assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
    assert_eq!(ahead.queued_at(Priority::Prefetch), 1);
    drop(fg2);
    rx.recv().unwrap();
    t.join().unwrap();
    // A flag raised by a scheduler that is gone (file closed) holds nothing.
    let gone = Scheduler::new(2).with_host_flag(cache.foreground_flag().unwrap(), true);
    let held = gone.acquire(Priority::Foreground);
    std::mem::forget(held);
    drop(gone);
    drop(ahead.acquire(Priority::Prefetch));
    // The snapshotter's own foreground fetches (layer opens) hold nothing
    // elsewhere: they do not raise the flag.
    let opens = ahead.acquire(Priority::Foreground);
    drop(worker.acquire(Priority::Prefetch));
    drop(opens);
    assert_eq!(ahead.granted(Priority::Prefetch), 3);
}

/// The last slot is kept for foreground reads: prefetch fills all but one,
/// a foreground read still gets in at once, and the next prefetch waits.
#[test]
fn last_slot_is_kept_for_foreground() {
    let s = Arc::new(Scheduler::new(3));
    let p1 = s.acquire(Priority::Prefetch);
    let p2 = s.acquire(Priority::Prefetch);
    let t = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || drop(s.acquire(Priority::Prefetch)))
    };
    s.wait_queued_at(Priority::Prefetch, 1);
    assert_eq!(s.running(), 2);
    let fg = s.acquire(Priority::Foreground);
    assert_eq!(s.running(), 3);
    assert_eq!(s.queued_at(Priority::Prefetch), 1);
    drop(fg);
    // Still two prefetches running: the third keeps waiting.
    assert_eq!(s.queued_at(Priority::Prefetch), 1);
    drop(p1);
    t.join().unwrap();
    drop(p2);
    assert_eq!(s.granted(Priority::Prefetch), 3);
    // A limit of 1 keeps nothing back.
    let one = Scheduler::new(1);
    drop(one.acquire(Priority::Prefetch));
}
