//! The listener: reads requests on the server's socket (udp 69 in
//! production, any address in tests) and runs each read transfer as a task
//! on its own ephemeral socket. Writes are refused.
//!
//! Robustness: the listener never waits on a client. Malformed datagrams are
//! answered with one ERROR 4 (without blocking: the answer is dropped when
//! the socket buffer is full) or dropped if they are ERRORs themselves.
//! Requests from one address and port:
//! - a transfer that the client has answered (ACK or ERROR) is over from its
//!   side once it sends a new request from the same port: that transfer is
//!   cancelled (after reading what the client sent before, e.g. its final
//!   ACK), so clients that reuse their port, like a Raspberry Pi probing
//!   tsize then fetching, are never kept waiting;
//! - a request while earlier ones are still unanswered is a retransmission
//!   or a new wish: it gets its own transfer, as in tftp-hpa (the client
//!   keeps the first answer and ends the others with ERROR 5), up to
//!   4 such transfers; more are ignored, so an RRQ flood from one socket
//!   costs 4 transfers.
//!
//! At most `max_transfers` run at once, further requests get
//! ERROR 0 "server busy".

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::files::{FileSource, TftpError, TftpFile};
use super::options::{negotiate, Limits};
use super::packet::{self, ErrorCode, Mode, Packet, Request};
use super::transfer::{netascii_len, Control, Outcome, Transfer};

/// Server settings.
#[derive(Debug, Clone)]
pub struct TftpConfig {
    /// Transfers running at once; more requests get ERROR 0 "server busy".
    pub max_transfers: usize,
    /// What option negotiation may grant (blksize ceiling, window bounds).
    pub limits: Limits,
    /// Retransmission timeout when the client sends no timeout option.
    pub timeout: Duration,
    /// Resends of the same packet before a transfer is given up.
    pub max_retries: u32,
    /// Bytes read from a file at a time.
    pub read_chunk: usize,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            max_transfers: 256,
            limits: Limits::default(),
            timeout: Duration::from_secs(1),
            max_retries: 5,
            read_chunk: 256 * 1024,
        }
    }
}

/// Counters for /metrics. Every finished transfer counts once in
/// completed, failed or aborted; `started - completed - failed - aborted`
/// are running (also in `active`).
#[derive(Debug, Default)]
pub struct TftpStats {
    /// Read and write requests received.
    pub requests: AtomicU64,
    /// Requests answered with an ERROR before any data: not found, access
    /// violation, writes, unsupported mode, server busy.
    pub requests_refused: AtomicU64,
    pub transfers_started: AtomicU64,
    pub transfers_completed: AtomicU64,
    /// Timed out, I/O or protocol errors, server shutdown.
    pub transfers_failed: AtomicU64,
    /// Ended by the client: an ERROR, or a new request from its address and
    /// port (it has moved on).
    pub transfers_aborted: AtomicU64,
    /// Transfers running now (a gauge).
    pub active: AtomicU64,
    /// File bytes sent in DATA packets, retransmissions included.
    pub bytes_sent: AtomicU64,
    pub blocks_retransmitted: AtomicU64,
    /// Datagrams to the server's socket that were not valid requests.
    pub malformed_packets: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TftpStatsSnapshot {
    pub requests: u64,
    pub requests_refused: u64,
    pub transfers_started: u64,
    pub transfers_completed: u64,
    pub transfers_failed: u64,
    pub transfers_aborted: u64,
    pub active: u64,
    pub bytes_sent: u64,
    pub blocks_retransmitted: u64,
    pub malformed_packets: u64,
}

impl TftpStats {
    pub fn snapshot(&self) -> TftpStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TftpStatsSnapshot {
            requests: g(&self.requests),
            requests_refused: g(&self.requests_refused),
            transfers_started: g(&self.transfers_started),
            transfers_completed: g(&self.transfers_completed),
            transfers_failed: g(&self.transfers_failed),
            transfers_aborted: g(&self.transfers_aborted),
            active: g(&self.active),
            bytes_sent: g(&self.bytes_sent),
            blocks_retransmitted: g(&self.blocks_retransmitted),
            malformed_packets: g(&self.malformed_packets),
        }
    }

    fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A read-only TFTP server on one socket.
pub struct TftpServer {
    socket: UdpSocket,
    source: Arc<dyn FileSource>,
    stats: Arc<TftpStats>,
    config: TftpConfig,
}

struct Shared {
    source: Arc<dyn FileSource>,
    stats: Arc<TftpStats>,
    config: TftpConfig,
    /// Clients (address and port) with a transfer running.
    busy: Mutex<HashMap<SocketAddr, Vec<Running>>>,
    next_id: AtomicU64,
    /// Transfers bind their sockets on this address.
    local_ip: IpAddr,
}

impl TftpServer {
    /// A server on `socket` (bound by the caller, on any address and port).
    pub fn new(socket: UdpSocket, source: Arc<dyn FileSource>) -> TftpServer {
        TftpServer {
            socket,
            source,
            stats: Arc::default(),
            config: TftpConfig::default(),
        }
    }

    /// Binds `addr` (port 69 in production) and makes a server on it.
    pub async fn bind(addr: SocketAddr, source: Arc<dyn FileSource>) -> io::Result<TftpServer> {
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("binding TFTP socket {addr}: {e}")))?;
        Ok(TftpServer::new(socket, source))
    }

    pub fn with_config(mut self, config: TftpConfig) -> TftpServer {
        self.config = config;
        self
    }

    /// Counts into `stats` (shared with the metrics endpoint).
    pub fn with_stats(mut self, stats: Arc<TftpStats>) -> TftpServer {
        self.stats = stats;
        self
    }

    pub fn stats(&self) -> Arc<TftpStats> {
        self.stats.clone()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Serves until `shutdown` resolves; then running transfers are told
    /// (ERROR 0 to their clients) and awaited.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let local = self.socket.local_addr()?;
        let shared = Arc::new(Shared {
            source: self.source,
            stats: self.stats,
            busy: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            local_ip: local.ip(),
            config: self.config,
        });
        let permits = Arc::new(Semaphore::new(shared.config.max_transfers.max(1)));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut buf = vec![0u8; 65536];
        tracing::info!(address = %local, "tftp: serving");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = res {
                        tracing::error!(error = %e, "tftp: transfer task failed");
                    }
                }
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, peer)) => {
                        if let Some(task) = handle_datagram(&self.socket, &shared, &permits, &buf[..n], peer) {
                            tasks.spawn(task.run(shared.clone(), stop_rx.clone()));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "tftp: receiving");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
        let _ = stop_tx.send(true);
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res {
                tracing::error!(error = %e, "tftp: transfer task failed");
            }
        }
        tracing::info!(address = %local, "tftp: stopped");
        Ok(())
    }
}

/// Answers without ever waiting: dropped if the socket buffer is full.
fn reply_error(socket: &UdpSocket, peer: SocketAddr, code: ErrorCode, message: &str) {
    let _ = socket.try_send_to(&packet::error_packet(code, message), peer);
}

/// What the listener does with one datagram; `Some` starts a transfer task.
fn handle_datagram(
    socket: &UdpSocket,
    shared: &Arc<Shared>,
    permits: &Arc<Semaphore>,
    buf: &[u8],
    peer: SocketAddr,
) -> Option<PendingTransfer> {
    let stats = &shared.stats;
    if peer.port() == 0 {
        TftpStats::inc(&stats.malformed_packets);
        return None;
    }
    let pkt = match Packet::parse(buf) {
        Ok(p) => p,
        Err(e) => {
            TftpStats::inc(&stats.malformed_packets);
            tracing::debug!(client = %peer, error = %e, "tftp: malformed packet");
            if packet::opcode_of(buf) != Some(packet::Opcode::Error as u16) {
                reply_error(socket, peer, e.error_code(), &e.to_string());
            }
            return None;
        }
    };
    match pkt {
        Packet::Rrq(req) => {
            TftpStats::inc(&stats.requests);
            if req.mode == Mode::Mail {
                TftpStats::inc(&stats.requests_refused);
                reply_error(
                    socket,
                    peer,
                    ErrorCode::IllegalOperation,
                    "mail mode is not supported",
                );
                return None;
            }
            let mut busy = shared.busy.lock().unwrap_or_else(|e| e.into_inner());
            let running = busy.entry(peer).or_default();
            // Transfers the client has answered are over from its side, now
            // that it asks again from the same port: dropping them cancels them.
            running.retain(|r| !r.heard.load(Ordering::Relaxed));
            if running.len() >= MAX_UNANSWERED_PER_CLIENT {
                tracing::debug!(client = %peer, file = %req.filename.escape_debug(), "tftp: repeated request ignored");
                return None;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                TftpStats::inc(&stats.requests_refused);
                tracing::warn!(client = %peer, file = %req.filename.escape_debug(), "tftp: too many transfers, refused");
                reply_error(
                    socket,
                    peer,
                    ErrorCode::NotDefined,
                    "server busy, try again later",
                );
                return None;
            };
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            let heard = Arc::new(AtomicBool::new(false));
            let (cancel_tx, cancel) = watch::channel(());
            running.push(Running {
                id,
                heard: heard.clone(),
                _cancel: cancel_tx,
            });
            Some(PendingTransfer {
                peer,
                req,
                heard,
                cancel,
                _permit: permit,
                _guard: BusyGuard {
                    shared: shared.clone(),
                    peer,
                    id,
                },
            })
        }
        Packet::Wrq(req) => {
            TftpStats::inc(&stats.requests);
            TftpStats::inc(&stats.requests_refused);
            tracing::info!(client = %peer, file = %req.filename.escape_debug(), "tftp: write refused");
            reply_error(
                socket,
                peer,
                ErrorCode::AccessViolation,
                "access violation: this server is read-only",
            );
            None
        }
        Packet::Data { .. } | Packet::Ack { .. } | Packet::Oack { .. } => {
            TftpStats::inc(&stats.malformed_packets);
            reply_error(socket, peer, ErrorCode::UnknownTid, "unknown transfer ID");
            None
        }
        Packet::Error { .. } => {
            TftpStats::inc(&stats.malformed_packets);
            None
        }
    }
}

/// Transfers one client address and port may have that it has not answered
/// yet (retransmitted requests start new ones, as in tftp-hpa; the client
/// keeps the first answer and ends the others with ERROR 5).
const MAX_UNANSWERED_PER_CLIENT: usize = 4;

/// A transfer running for a client address and port.
struct Running {
    id: u64,
    heard: Arc<AtomicBool>,
    /// Dropped to cancel the transfer.
    _cancel: watch::Sender<()>,
}

/// Removes a client's entry when its transfer ends (unless a newer
/// request has replaced it meanwhile).
struct BusyGuard {
    shared: Arc<Shared>,
    peer: SocketAddr,
    id: u64,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut busy = self.shared.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = busy.get_mut(&self.peer) {
            running.retain(|r| r.id != self.id);
            if running.is_empty() {
                busy.remove(&self.peer);
            }
        }
    }
}

struct PendingTransfer {
    peer: SocketAddr,
    req: Request,
    heard: Arc<AtomicBool>,
    cancel: watch::Receiver<()>,
    _permit: OwnedSemaphorePermit,
    _guard: BusyGuard,
}

impl PendingTransfer {
    async fn run(self, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
        let PendingTransfer {
            peer,
            req,
            heard,
            cancel,
            ..
        } = &self;
        let stats = &*shared.stats;
        let cfg = &shared.config;
        let file_name = req.filename.escape_debug().to_string();
        let started = Instant::now();
        let sock = match UdpSocket::bind(SocketAddr::new(shared.local_ip, 0)).await {
            Ok(s) => s,
            Err(e) => {
                TftpStats::inc(&stats.requests_refused);
                tracing::error!(client = %peer, file = %file_name, error = %e, "tftp: cannot bind a transfer socket");
                return;
            }
        };
        let source = shared.source.clone();
        let (client, name) = (*peer, req.filename.clone());
        let opened = tokio::task::spawn_blocking(move || source.open(client, &name))
            .await
            .unwrap_or_else(|e| {
                tracing::error!(client = %peer, error = %e, "tftp: file source panicked");
                Err(TftpError::other("internal error"))
            });
        let mut transfer = Transfer::new(
            sock,
            *peer,
            stats,
            cfg.timeout,
            cfg.max_retries,
            cfg.read_chunk,
            Control {
                shutdown: stop,
                cancel: cancel.clone(),
                heard: heard.clone(),
            },
        );
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                TftpStats::inc(&stats.requests_refused);
                tracing::info!(client = %peer, file = %file_name, code = e.code.as_u16(), error = %e.message, "tftp: request refused");
                // Not if a newer request replaced this one: the client would
                // take the answer for the new one.
                if cancel.has_changed().is_ok() {
                    transfer.send_error(e.code, &e.message).await;
                }
                return;
            }
        };
        let size = file.size();
        let announced = match (&file, req.mode) {
            (_, Mode::Octet) => Some(size),
            (TftpFile::Memory(b), _) => Some(netascii_len(b)),
            // Would need a pass over the file; tsize is left out instead.
            (TftpFile::File { .. }, _) => None,
        };
        let neg = negotiate(&req.options, announced, &cfg.limits);
        if let Some(t) = neg.timeout {
            transfer.timeout = t;
        }
        TftpStats::inc(&stats.transfers_started);
        stats.active.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(client = %peer, file = %file_name, size, mode = req.mode.as_str(), options = ?req.options, "tftp: transfer starting");
        let outcome = transfer.run(file, req.mode, &neg).await;
        stats.active.fetch_sub(1, Ordering::Relaxed);
        let ms = started.elapsed().as_millis() as u64;
        let (sent, resent) = (transfer.bytes_sent, transfer.retransmitted);
        let (blksize, windowsize) = (neg.blksize, neg.windowsize);
        let timeout_s = transfer.timeout.as_secs();
        let mode = req.mode.as_str();
        match outcome {
            Outcome::Completed => {
                TftpStats::inc(&stats.transfers_completed);
                tracing::info!(client = %peer, file = %file_name, size, mode, blksize, windowsize, timeout_s, tsize = ?neg.tsize, bytes_sent = sent, retransmitted = resent, duration_ms = ms, result = "completed", "tftp transfer");
            }
            Outcome::ClientError { code, message } => {
                TftpStats::inc(&stats.transfers_aborted);
                tracing::info!(client = %peer, file = %file_name, size, mode, blksize, windowsize, timeout_s, tsize = ?neg.tsize, bytes_sent = sent, retransmitted = resent, duration_ms = ms, result = "aborted by client", code, message = %message.escape_debug(), "tftp transfer");
            }
            Outcome::Superseded => {
                TftpStats::inc(&stats.transfers_aborted);
                tracing::info!(client = %peer, file = %file_name, size, mode, blksize, windowsize, timeout_s, tsize = ?neg.tsize, bytes_sent = sent, retransmitted = resent, duration_ms = ms, result = "superseded by a new request", "tftp transfer");
            }
            Outcome::Failed(why) => {
                TftpStats::inc(&stats.transfers_failed);
                tracing::warn!(client = %peer, file = %file_name, size, mode, blksize, windowsize, timeout_s, tsize = ?neg.tsize, bytes_sent = sent, retransmitted = resent, duration_ms = ms, result = "failed", error = %why, "tftp transfer");
            }
        }
    }
}
