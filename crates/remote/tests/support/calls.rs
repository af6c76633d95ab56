//! What an in-memory fake fetcher was asked for.

use std::sync::Mutex;

use obd_remote::Priority;

/// The requests a fake fetcher received, in order: (offset, length, priority).
#[derive(Default)]
pub struct Calls(Mutex<Vec<(u64, u64, Priority)>>);

impl Calls {
    /// Records one request.
    pub fn record(&self, offset: u64, len: u64, prio: Priority) {
        self.0.lock().unwrap().push((offset, len, prio));
    }

    /// Every request so far.
    pub fn all(&self) -> Vec<(u64, u64, Priority)> {
        self.0.lock().unwrap().clone()
    }

    /// How many requests so far.
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Forgets the requests so far.
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}
