//! A held origin: a handler reports "called" and waits until the test
//! releases it, so tests synchronise on signals instead of sleeps.
//!
//! ```ignore
//! let gate = Gate::new();                 // held
//! let req = tokio::spawn(app.get("/x"));  // reaches the origin and waits
//! gate.called(1).await;                   // the fill reached the origin
//! gate.release();                         // let every held call answer
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// The longest a test waits for a signal before it fails: a hang guard, not
/// a timing assumption.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

/// Counts calls and holds them until released. Clones share one gate.
#[derive(Clone)]
pub struct Gate {
    calls: Arc<watch::Sender<usize>>,
    open: Arc<watch::Sender<bool>>,
}

impl Gate {
    /// A gate that holds every call until [`release`](Self::release).
    pub fn new() -> Self {
        Self {
            calls: Arc::new(watch::channel(0).0),
            open: Arc::new(watch::channel(false).0),
        }
    }

    /// A gate that lets calls through at once (but still counts them).
    pub fn open() -> Self {
        let gate = Self::new();
        gate.release();
        gate
    }

    /// Called by the origin: counts the call, then waits while held.
    /// Returns the call's number (1 for the first).
    pub async fn enter(&self) -> usize {
        let mut n = 0;
        self.calls.send_modify(|c| {
            *c += 1;
            n = *c;
        });
        let mut open = self.open.subscribe();
        // The sender lives in `self`, so this only ends when opened.
        let _ = open.wait_for(|&o| o).await;
        n
    }

    /// Calls so far.
    pub fn calls(&self) -> usize {
        *self.calls.borrow()
    }

    /// Waits until at least `n` calls have entered (panics after
    /// [`HANG_GUARD`]).
    pub async fn called(&self, n: usize) {
        let mut calls = self.calls.subscribe();
        tokio::time::timeout(HANG_GUARD, calls.wait_for(|&c| c >= n))
            .await
            .unwrap_or_else(|_| panic!("the origin was called {} times, not {n}", self.calls()))
            .expect("gate alive");
    }

    /// Lets every held call (and every later one) through.
    pub fn release(&self) {
        self.open.send_replace(true);
    }

    /// Holds calls from now on.
    pub fn hold(&self) {
        self.open.send_replace(false);
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits until `cond` holds, re-checking every few milliseconds; panics
/// after [`HANG_GUARD`] naming `what`. For conditions with no signal of
/// their own (a Redis key appearing, a counter reaching a value).
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
