//! A TCP proxy in front of a server (Redis) that can stall connections
//! without closing them: a half-open hop, as a NAT or firewall that drops a
//! flow, or a network partition, makes one. A stalled connection neither
//! forwards nor closes; the client sees its requests go unanswered.
//!
//! `stall_existing` stalls every connection open now and lets new ones
//! through (the connection a client had is dead, a fresh one works);
//! `stall_all` stalls new ones too; `resume` forwards again on every
//! connection that is still open; `close_all` closes every connection
//! (a FIN, as when the hop closes instead).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Default)]
struct State {
    /// Connections numbered from 1 in the order they were accepted.
    accepted: AtomicU64,
    /// Connections numbered up to this one are stalled.
    stalled_up_to: AtomicU64,
    /// New connections are stalled too.
    stall_new: AtomicBool,
    open: AtomicUsize,
}

/// A stallable TCP proxy on `127.0.0.1`; runs until dropped.
#[derive(Debug)]
pub struct StallProxy {
    addr: SocketAddr,
    state: Arc<State>,
    /// Bumped on every change of the stall settings, and on `close_all`.
    changed: watch::Sender<u64>,
    closed: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    /// Starts a proxy forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State::default());
        let (changed, _) = watch::channel(0u64);
        let (closed, _) = watch::channel(0u64);
        let task = {
            let state = state.clone();
            let changed = changed.clone();
            let closed = closed.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let n = state.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                    if state.stall_new.load(Ordering::SeqCst) {
                        state.stalled_up_to.fetch_max(n, Ordering::SeqCst);
                    }
                    let Ok(server) = TcpStream::connect(target).await else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let state = state.clone();
                    let changed = changed.subscribe();
                    let closed = closed.subscribe();
                    tokio::spawn(pipe(n, client, server, state, changed, closed));
                }
            })
        };
        Self {
            addr,
            state,
            changed,
            closed,
            task,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Stalls every connection open now; new ones are forwarded.
    pub fn stall_existing(&self) {
        let n = self.state.accepted.load(Ordering::SeqCst);
        self.state.stalled_up_to.fetch_max(n, Ordering::SeqCst);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Stalls every connection, those opened from now on too.
    pub fn stall_all(&self) {
        self.state.stall_new.store(true, Ordering::SeqCst);
        self.stall_existing();
    }

    /// Forwards again on every connection still open, and on new ones.
    pub fn resume(&self) {
        self.state.stall_new.store(false, Ordering::SeqCst);
        self.state.stalled_up_to.store(0, Ordering::SeqCst);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Closes every connection open now.
    pub fn close_all(&self) {
        self.closed.send_modify(|v| *v += 1);
    }

    /// How many connections the proxy accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// How many connections are open now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.closed.send_modify(|v| *v += 1);
    }
}

async fn pipe(
    n: u64,
    client: TcpStream,
    server: TcpStream,
    state: Arc<State>,
    changed: watch::Receiver<u64>,
    mut closed: watch::Receiver<u64>,
) {
    state.open.fetch_add(1, Ordering::SeqCst);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = copy(n, cr, sw, state.clone(), changed.clone());
    let down = copy(n, sr, cw, state.clone(), changed);
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = closed.changed() => {}
    }
    state.open.fetch_sub(1, Ordering::SeqCst);
}

/// Copies one direction; while the connection is stalled, holds what it
/// read (and reads nothing more) until it is resumed.
async fn copy(
    n: u64,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
    mut changed: watch::Receiver<u64>,
) {
    let stalled = |state: &State| n <= state.stalled_up_to.load(Ordering::SeqCst);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while stalled(&state) {
            if changed.changed().await.is_err() {
                return;
            }
        }
        let read = tokio::select! {
            r = from.read(&mut buf) => r,
            // Re-check the stall before reading on.
            r = changed.changed() => {
                if r.is_err() { return; }
                continue;
            }
        };
        let Ok(len) = read else { return };
        if len == 0 {
            return;
        }
        while stalled(&state) {
            if changed.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..len]).await.is_err() {
            return;
        }
    }
}
