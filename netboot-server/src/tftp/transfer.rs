//! One read transfer on its own UDP socket (its TID): optional OACK, then
//! DATA in windows of `windowsize` blocks (RFC 7440; 1 is RFC 1350's
//! lock-step), with retransmission on timeout.
//!
//! Acknowledgements, with blocks numbered from 1 without wrapping inside the
//! server and `acked` the highest block acknowledged so far:
//! - an ACK of a block after `acked` and at most the last block sent moves
//!   the window; if it is short of the last block sent (the client reports a
//!   gap, RFC 7440), sending resumes from the block after it;
//! - an ACK of `acked` or earlier is a duplicate and is ignored: answering
//!   duplicates is what makes the Sorcerer's Apprentice syndrome (RFC 1123
//!   4.2.3.1). Lost packets are recovered by the timeout, which resends the
//!   window from `acked + 1`;
//! - block numbers on the wire are the low 16 bits: after 65535 comes 0, as
//!   tftp-hpa, atftp and curl expect.
//!
//! A client ERROR ends the transfer at once. A packet from any other address
//! or port is answered with ERROR 5 and changes nothing.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;

use super::files::TftpFile;
use super::options::Negotiated;
use super::packet::{self, ErrorCode, Mode, Packet};
use super::server::TftpStats;

/// How a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Every block was acknowledged.
    Completed,
    /// The client sent an ERROR (e.g. a Raspberry Pi's early-terminate probe
    /// after reading tsize).
    ClientError { code: u16, message: String },
    /// The client sent a new request from the same port: it has moved on.
    Superseded,
    /// Timed out, I/O error, protocol error or server shutdown.
    Failed(String),
}

/// How long a superseded transfer still listens for its client's last packets.
const SUPERSEDED_GRACE: Duration = Duration::from_millis(50);

/// Converts to netascii: LF becomes CR LF, CR becomes CR NUL (RFC 764).
/// Byte by byte, so chunks convert independently.
pub fn netascii_encode(input: &[u8], out: &mut BytesMut) {
    out.reserve(input.len() + input.len() / 16);
    let mut rest = input;
    while let Some(i) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(if rest[i] == b'\n' { b"\r\n" } else { b"\r\0" });
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
}

/// Length of `input` once converted to netascii.
pub fn netascii_len(input: &[u8]) -> u64 {
    input.len() as u64 + input.iter().filter(|&&b| b == b'\n' || b == b'\r').count() as u64
}

/// Maps an ACK's 16-bit block number to the absolute block it acknowledges,
/// when that is one of `acked..=highest_sent`; `None` for anything else
/// (a stale number from an earlier wrap, or a block never sent).
pub fn ack_position(wire: u16, acked: u64, highest_sent: u64) -> Option<u64> {
    let ahead = u64::from(wire.wrapping_sub(acked as u16));
    let abs = acked + ahead;
    (abs <= highest_sent).then_some(abs)
}

/// The 16-bit number of absolute block `n` on the wire.
pub fn wire_block(n: u64) -> u16 {
    n as u16
}

enum Source {
    Memory(Bytes),
    File {
        file: Arc<std::fs::File>,
        offset: u64,
        size: u64,
    },
}

/// Cuts a file into blocks, converting to netascii if asked, reading files in
/// chunks on the blocking pool (never the whole file at once).
pub(crate) struct BlockReader {
    source: Source,
    netascii: bool,
    blksize: usize,
    chunk: usize,
    buf: BytesMut,
    eof: bool,
}

impl BlockReader {
    pub fn new(file: TftpFile, mode: Mode, blksize: u16, chunk: usize) -> BlockReader {
        let source = match file {
            TftpFile::Memory(b) => Source::Memory(b),
            TftpFile::File { file, size } => Source::File {
                file: Arc::new(file),
                offset: 0,
                size,
            },
        };
        BlockReader {
            source,
            netascii: mode == Mode::Netascii,
            blksize: usize::from(blksize),
            // Whole blocks per chunk, so that octet blocks are slices of it.
            chunk: (chunk / usize::from(blksize)).max(1) * usize::from(blksize),
            buf: BytesMut::new(),
            eof: false,
        }
    }

    /// The next raw chunk; empty at the end.
    async fn read_chunk(&mut self) -> io::Result<Bytes> {
        match &mut self.source {
            Source::Memory(b) => {
                let n = b.len().min(self.chunk);
                Ok(b.split_to(n))
            }
            Source::File { file, offset, size } => {
                // Never past the size announced at open: a file that grows
                // meanwhile is served as it was.
                let want = (*size - *offset).min(self.chunk as u64) as usize;
                if want == 0 {
                    return Ok(Bytes::new());
                }
                let (file2, at) = (file.clone(), *offset);
                let data = tokio::task::spawn_blocking(move || read_at_most(&file2, at, want))
                    .await
                    .map_err(io::Error::other)??;
                *offset += data.len() as u64;
                if data.is_empty() {
                    // The file shrank: end here.
                    *size = *offset;
                }
                Ok(Bytes::from(data))
            }
        }
    }

    /// The next block: `blksize` bytes, or fewer for the last one (possibly
    /// none, when the size is a multiple of `blksize`).
    pub async fn next_block(&mut self) -> io::Result<Bytes> {
        if let (Source::Memory(b), false) = (&mut self.source, self.netascii) {
            // In memory: blocks are slices of it.
            return Ok(b.split_to(b.len().min(self.blksize)));
        }
        while self.buf.len() < self.blksize && !self.eof {
            let raw = self.read_chunk().await?;
            if raw.is_empty() {
                self.eof = true;
            } else if self.netascii {
                netascii_encode(&raw, &mut self.buf);
            } else if self.buf.is_empty() && raw.len() % self.blksize == 0 {
                // Whole blocks: keep the chunk and slice it without copying.
                self.buf = BytesMut::from(raw);
            } else {
                self.buf.extend_from_slice(&raw);
            }
        }
        let n = self.buf.len().min(self.blksize);
        Ok(self.buf.split_to(n).freeze())
    }
}

fn read_at_most(file: &std::fs::File, mut at: u64, want: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut v = vec![0u8; want];
    let mut filled = 0;
    while filled < want {
        match file.read_at(&mut v[filled..], at) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                at += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    v.truncate(filled);
    Ok(v)
}

/// Most datagrams handed to one sendmmsg call.
#[cfg(target_os = "linux")]
const MAX_BATCH: usize = 64;

/// DATA packets to send: the 4-byte headers and the blocks, sent as two
/// pieces each, without copying the blocks.
#[derive(Default)]
struct Batch {
    headers: Vec<[u8; packet::HEADER_LEN]>,
    blocks: Vec<Bytes>,
}

impl Batch {
    fn clear(&mut self) {
        self.headers.clear();
        self.blocks.clear();
    }

    fn push(&mut self, block: u16, data: Bytes) {
        let op = (packet::Opcode::Data as u16).to_be_bytes();
        let nr = block.to_be_bytes();
        self.headers.push([op[0], op[1], nr[0], nr[1]]);
        self.blocks.push(data);
    }
}

/// UDP generic segmentation offload (Linux 4.18+): a window of equal-size
/// DATA packets goes down the stack as one buffer that the kernel (or the
/// NIC) cuts into datagrams of `segment` bytes; the last may be shorter.
/// Used when every packet the socket sends outside of DATA (OACK is sent
/// before, ERROR messages are short) fits in one segment.
#[derive(Debug, Clone, Copy)]
struct Gso {
    segment: usize,
    /// Packets per send: at most 64 segments and 64 KiB.
    max_segments: usize,
}

/// Smallest segment GSO is used with (ERROR packets must fit in one).
const GSO_MIN_SEGMENT: usize = 516;

impl Gso {
    #[cfg(target_os = "linux")]
    fn enable(sock: &UdpSocket, blksize: u16) -> Option<Gso> {
        let segment = packet::HEADER_LEN + usize::from(blksize);
        let max_segments = (60_000 / segment).min(64);
        if segment < GSO_MIN_SEGMENT || max_segments < 2 {
            return None;
        }
        set_udp_segment(sock, segment).ok()?;
        Some(Gso {
            segment,
            max_segments,
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn enable(_sock: &UdpSocket, _blksize: u16) -> Option<Gso> {
        None
    }
}

#[cfg(target_os = "linux")]
fn set_udp_segment(sock: &UdpSocket, segment: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const UDP_SEGMENT: libc::c_int = 103; // linux/udp.h
    let val = segment as libc::c_int;
    // SAFETY: a valid socket descriptor and a c_int option value of the
    // size given.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends every packet of `batch` to `to`, by GSO while `gso` is set (it is
/// cleared, and the rest sent one by one, if the route refuses it).
async fn send_batch(
    sock: &UdpSocket,
    to: SocketAddr,
    batch: &Batch,
    gso: &mut Option<Gso>,
) -> io::Result<()> {
    let mut done = 0;
    while done < batch.blocks.len() {
        let (headers, blocks) = (&batch.headers[done..], &batch.blocks[done..]);
        #[cfg(target_os = "linux")]
        if let Some(g) = *gso {
            if blocks.len() > 1 {
                match send_gso(sock, to, headers, blocks, g).await {
                    Ok(n) => {
                        done += n;
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(client = %to, error = %e, "tftp: GSO refused, sending datagrams one by one");
                        *gso = None;
                        let _ = set_udp_segment(sock, 0);
                    }
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = &gso;
        done += send_some(sock, to, headers, blocks).await?;
    }
    Ok(())
}

/// One GSO send of up to `max_segments` packets; returns how many.
#[cfg(target_os = "linux")]
async fn send_gso(
    sock: &UdpSocket,
    to: SocketAddr,
    headers: &[[u8; packet::HEADER_LEN]],
    blocks: &[Bytes],
    gso: Gso,
) -> io::Result<usize> {
    use rustix::net::{sendmsg_addr, SendAncillaryBuffer, SendFlags, SocketAddrAny};
    use std::io::IoSlice;
    let mut n = blocks.len().min(gso.max_segments);
    // Only the last segment may be short.
    if let Some(short) = blocks[..n]
        .iter()
        .position(|b| packet::HEADER_LEN + b.len() != gso.segment)
    {
        n = short + 1;
    }
    if n == 1 {
        return send_some(sock, to, headers, blocks).await;
    }
    let addr = SocketAddrAny::from(to);
    loop {
        sock.writable().await?;
        let sent = sock.try_io(tokio::io::Interest::WRITABLE, || {
            let iovs: Vec<IoSlice<'_>> = (0..n)
                .flat_map(|i| [IoSlice::new(&headers[i]), IoSlice::new(&blocks[i])])
                .collect();
            let mut control = SendAncillaryBuffer::default();
            sendmsg_addr(sock, &addr, &iovs, &mut control, SendFlags::empty())
                .map_err(io::Error::from)
        });
        match sent {
            Ok(_) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends some of the packets (at least one); returns how many.
#[cfg(target_os = "linux")]
async fn send_some(
    sock: &UdpSocket,
    to: SocketAddr,
    headers: &[[u8; packet::HEADER_LEN]],
    blocks: &[Bytes],
) -> io::Result<usize> {
    use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};
    use std::io::IoSlice;
    let n = blocks.len().min(MAX_BATCH);
    if n == 1 {
        return send_one(sock, to, &headers[0], &blocks[0]).await;
    }
    let addr = SocketAddrAny::from(to);
    loop {
        sock.writable().await?;
        // The message headers hold raw pointers: made and used inside the
        // closure, never across an await.
        let sent = sock.try_io(tokio::io::Interest::WRITABLE, || {
            let iovs: Vec<[IoSlice<'_>; 2]> = (0..n)
                .map(|i| [IoSlice::new(&headers[i]), IoSlice::new(&blocks[i])])
                .collect();
            let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
                (0..n).map(|_| SendAncillaryBuffer::default()).collect();
            let mut msgs: Vec<MMsgHdr<'_>> = iovs
                .iter()
                .zip(controls.iter_mut())
                .map(|(iov, control)| MMsgHdr::new_with_addr(&addr, iov, control))
                .collect();
            sendmmsg(sock, &mut msgs, SendFlags::empty()).map_err(io::Error::from)
        });
        match sent {
            Ok(0) => return Err(io::Error::other("sendmmsg sent nothing")),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends one DATA packet, the lock-step case.
async fn send_one(
    sock: &UdpSocket,
    to: SocketAddr,
    header: &[u8; packet::HEADER_LEN],
    block: &Bytes,
) -> io::Result<usize> {
    let mut pkt = Vec::with_capacity(packet::HEADER_LEN + block.len());
    pkt.extend_from_slice(header);
    pkt.extend_from_slice(block);
    sock.send_to(&pkt, to).await.map(|_| 1)
}

#[cfg(not(target_os = "linux"))]
async fn send_some(
    sock: &UdpSocket,
    to: SocketAddr,
    headers: &[[u8; packet::HEADER_LEN]],
    blocks: &[Bytes],
) -> io::Result<usize> {
    send_one(sock, to, &headers[0], &blocks[0]).await
}

enum Event {
    Ack(u16),
    ClientError(u16, String),
    Timeout,
    Illegal(String),
    Shutdown,
    Superseded,
    Io(io::Error),
}

/// How the server steers a running transfer.
pub(crate) struct Control {
    /// Becomes true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Its sender is dropped when a new request from the same client address
    /// and port supersedes this transfer (the client has moved on).
    pub cancel: watch::Receiver<()>,
    /// Set once the client has sent anything valid to this transfer's TID.
    pub heard: Arc<AtomicBool>,
}

/// A transfer in progress.
pub(crate) struct Transfer<'a> {
    pub sock: UdpSocket,
    pub client: SocketAddr,
    pub stats: &'a TftpStats,
    pub timeout: Duration,
    pub max_retries: u32,
    pub read_chunk: usize,
    pub control: Control,
    /// Set when superseded: until then, packets the client sent before its
    /// new request (its final ACK, usually) are still read.
    superseded_until: Option<Instant>,
    /// Data bytes sent, retransmissions included.
    pub bytes_sent: u64,
    /// Blocks sent more than once.
    pub retransmitted: u64,
    rbuf: Vec<u8>,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// OACK and ERROR packets.
    sbuf: Vec<u8>,
    batch: Batch,
}

impl<'a> Transfer<'a> {
    pub fn new(
        sock: UdpSocket,
        client: SocketAddr,
        stats: &'a TftpStats,
        timeout: Duration,
        max_retries: u32,
        read_chunk: usize,
        control: Control,
    ) -> Self {
        Transfer {
            sock,
            client,
            stats,
            timeout,
            max_retries,
            read_chunk,
            control,
            superseded_until: None,
            bytes_sent: 0,
            retransmitted: 0,
            rbuf: vec![0u8; 2048],
            timer: Box::pin(tokio::time::sleep(timeout)),
            sbuf: Vec::with_capacity(packet::HEADER_LEN + usize::from(packet::MAX_BLKSIZE)),
            batch: Batch::default(),
        }
    }

    async fn send(&mut self) -> io::Result<()> {
        self.sock.send_to(&self.sbuf, self.client).await.map(|_| ())
    }

    /// Sends an ERROR to the client (best effort).
    pub async fn send_error(&mut self, code: ErrorCode, message: &str) {
        self.sbuf.clear();
        packet::encode_error(&mut self.sbuf, code, message);
        let _ = self.send().await;
    }

    /// Waits for the client's next ACK or ERROR until `deadline`; answers
    /// strangers with ERROR 5 on the way.
    async fn next_event(&mut self, deadline: Instant) -> Event {
        loop {
            if *self.control.shutdown.borrow() {
                return Event::Shutdown;
            }
            let received = if let Some(until) = self.superseded_until {
                tokio::select! {
                    r = self.sock.recv_from(&mut self.rbuf) => r,
                    _ = tokio::time::sleep_until(until) => return Event::Superseded,
                }
            } else {
                // The timer is lazy: it is moved earlier when needed, never
                // later, and when it fires before the deadline it is set
                // again. So it is registered about once per timeout period,
                // not once per ACK.
                if self.timer.deadline() > deadline {
                    self.timer.as_mut().reset(deadline);
                }
                tokio::select! {
                    r = self.sock.recv_from(&mut self.rbuf) => r,
                    _ = &mut self.timer => {
                        if Instant::now() >= deadline {
                            return Event::Timeout;
                        }
                        self.timer.as_mut().reset(deadline);
                        continue;
                    }
                    _ = self.control.shutdown.changed() => return Event::Shutdown,
                    _ = self.control.cancel.changed() => {
                        self.superseded_until = Some(Instant::now() + SUPERSEDED_GRACE);
                        continue;
                    }
                }
            };
            let (n, from) = match received {
                Ok(r) => r,
                // ICMP errors reported on the socket: keep waiting.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    continue
                }
                Err(e) => return Event::Io(e),
            };
            let pkt = &self.rbuf[..n];
            if from != self.client {
                // RFC 1350: answer with ERROR 5, do not disturb the transfer;
                // never answer an ERROR (no loops between two servers).
                if packet::opcode_of(pkt) != Some(packet::Opcode::Error as u16) {
                    let err = packet::error_packet(ErrorCode::UnknownTid, "unknown transfer ID");
                    let _ = self.sock.try_send_to(&err, from);
                }
                tracing::debug!(client = %self.client, stranger = %from, "tftp: packet from an unknown TID");
                continue;
            }
            let parsed = Packet::parse(pkt);
            if matches!(parsed, Ok(Packet::Ack { .. } | Packet::Error { .. })) {
                self.control.heard.store(true, Ordering::Relaxed);
            }
            return match parsed {
                Ok(Packet::Ack { block }) => Event::Ack(block),
                Ok(Packet::Error { code, message }) => Event::ClientError(code.as_u16(), message),
                Ok(Packet::Rrq(_) | Packet::Wrq(_)) => {
                    Event::Illegal("request on a transfer TID".into())
                }
                Ok(Packet::Data { .. } | Packet::Oack { .. }) => {
                    Event::Illegal("DATA or OACK sent to a reading server".into())
                }
                Err(e) => Event::Illegal(e.to_string()),
            };
        }
    }

    /// Ends on an event that is neither an ACK nor a timeout.
    async fn end_on(&mut self, ev: Event) -> Outcome {
        match ev {
            Event::ClientError(code, message) => Outcome::ClientError { code, message },
            Event::Illegal(why) => {
                self.send_error(ErrorCode::IllegalOperation, "illegal TFTP operation")
                    .await;
                Outcome::Failed(format!("illegal packet from client: {why}"))
            }
            Event::Shutdown => {
                self.send_error(ErrorCode::NotDefined, "server shutting down")
                    .await;
                Outcome::Failed("server shutting down".into())
            }
            Event::Superseded => Outcome::Superseded,
            Event::Io(e) => Outcome::Failed(format!("receiving: {e}")),
            Event::Ack(_) | Event::Timeout => Outcome::Failed("unexpected event".into()),
        }
    }

    /// Runs the transfer of `file` with the negotiated options.
    pub async fn run(&mut self, file: TftpFile, mode: Mode, neg: &Negotiated) -> Outcome {
        if !neg.oack.is_empty() {
            if let Some(end) = self.send_oack(neg).await {
                return end;
            }
        }
        self.send_data(file, mode, neg).await
    }

    /// Sends the OACK until ACK 0; `Some` if the transfer ends there.
    async fn send_oack(&mut self, neg: &Negotiated) -> Option<Outcome> {
        let mut tries = 0;
        loop {
            self.sbuf.clear();
            packet::encode_oack(&mut self.sbuf, &neg.oack);
            if let Err(e) = self.send().await {
                return Some(Outcome::Failed(format!("sending OACK: {e}")));
            }
            let deadline = Instant::now() + self.timeout;
            loop {
                match self.next_event(deadline).await {
                    Event::Ack(0) if self.superseded_until.is_some() => {
                        return Some(Outcome::Superseded)
                    }
                    Event::Ack(0) => return None,
                    Event::Ack(_) => {} // not for this stage
                    Event::Timeout => break,
                    ev => return Some(self.end_on(ev).await),
                }
            }
            tries += 1;
            if tries > self.max_retries {
                return Some(Outcome::Failed(format!(
                    "no ACK of the OACK after {tries} tries"
                )));
            }
        }
    }

    async fn send_data(&mut self, file: TftpFile, mode: Mode, neg: &Negotiated) -> Outcome {
        let blksize = usize::from(neg.blksize);
        let window = u64::from(neg.windowsize.max(1));
        let mut reader = BlockReader::new(file, mode, neg.blksize, self.read_chunk);
        // Blocks acked+1 ..= acked+pending.len(), kept for retransmission.
        let mut pending: VecDeque<Bytes> = VecDeque::new();
        let mut acked: u64 = 0;
        let mut next: u64 = 1;
        let mut highest_sent: u64 = 0;
        let mut last: Option<u64> = None;
        let mut retries = 0u32;
        let mut gso = if window > 1 {
            Gso::enable(&self.sock, neg.blksize)
        } else {
            None
        };
        loop {
            // The blocks due now go out in one batch (one sendmmsg on Linux).
            self.batch.clear();
            let first = next;
            while next <= acked + window && last.is_none_or(|l| next <= l) {
                let idx = (next - acked - 1) as usize;
                if idx == pending.len() {
                    let block = match reader.next_block().await {
                        Ok(b) => b,
                        Err(e) => {
                            self.send_error(ErrorCode::NotDefined, "read error").await;
                            return Outcome::Failed(format!("reading the file: {e}"));
                        }
                    };
                    if block.len() < blksize {
                        last = Some(next);
                    }
                    pending.push_back(block);
                }
                let data = pending[idx].clone();
                let len = data.len() as u64;
                self.batch.push(wire_block(next), data);
                self.bytes_sent += len;
                self.stats.bytes_sent.fetch_add(len, Ordering::Relaxed);
                if next <= highest_sent {
                    self.retransmitted += 1;
                    self.stats
                        .blocks_retransmitted
                        .fetch_add(1, Ordering::Relaxed);
                } else {
                    highest_sent = next;
                }
                next += 1;
            }
            if let Err(e) = send_batch(&self.sock, self.client, &self.batch, &mut gso).await {
                return Outcome::Failed(format!("sending blocks {first}..{next}: {e}"));
            }

            let deadline = Instant::now() + self.timeout;
            loop {
                match self.next_event(deadline).await {
                    Event::Ack(wire) => {
                        let Some(a) = ack_position(wire, acked, highest_sent) else {
                            continue;
                        };
                        if a == acked {
                            continue; // duplicate
                        }
                        pending.drain(..(a - acked) as usize);
                        acked = a;
                        retries = 0;
                        if last == Some(acked) {
                            return Outcome::Completed;
                        }
                        if self.superseded_until.is_some() {
                            return Outcome::Superseded;
                        }
                        if a + 1 < next {
                            // The client reports a gap: go back to it.
                            next = a + 1;
                        }
                        break;
                    }
                    Event::Timeout => {
                        retries += 1;
                        if retries > self.max_retries {
                            return Outcome::Failed(format!(
                                "timed out waiting for the ACK of block {} ({} tries)",
                                acked + 1,
                                retries
                            ));
                        }
                        next = acked + 1;
                        break;
                    }
                    ev => return self.end_on(ev).await,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netascii() {
        let mut out = BytesMut::new();
        netascii_encode(b"a\nb\r\nc\rd", &mut out);
        assert_eq!(&out[..], b"a\r\nb\r\0\r\nc\r\0d");
        assert_eq!(netascii_len(b"a\nb\r\nc\rd"), out.len() as u64);
        let mut out = BytesMut::new();
        netascii_encode(b"", &mut out);
        netascii_encode(b"plain", &mut out);
        netascii_encode(b"\n", &mut out);
        assert_eq!(&out[..], b"plain\r\n");
    }

    #[test]
    fn ack_positions() {
        // In the window.
        assert_eq!(ack_position(5, 0, 16), Some(5));
        assert_eq!(ack_position(0, 0, 16), Some(0));
        assert_eq!(ack_position(16, 0, 16), Some(16));
        // Not yet sent, or from long ago.
        assert_eq!(ack_position(17, 0, 16), None);
        assert_eq!(ack_position(65535, 0, 16), None);
        // Across the rollover: block 65536 is 0 on the wire, 65537 is 1.
        assert_eq!(ack_position(65535, 65530, 65540), Some(65535));
        assert_eq!(ack_position(0, 65530, 65540), Some(65536));
        assert_eq!(ack_position(4, 65530, 65540), Some(65540));
        assert_eq!(ack_position(5, 65530, 65540), None);
        // Second wrap.
        assert_eq!(ack_position(3, 131_070, 131_075), Some(131_075));
        assert_eq!(wire_block(65535), 65535);
        assert_eq!(wire_block(65536), 0);
        assert_eq!(wire_block(65537), 1);
        assert_eq!(wire_block(131_072), 0);
    }

    async fn blocks(file: TftpFile, mode: Mode, blksize: u16, chunk: usize) -> Vec<Bytes> {
        let mut r = BlockReader::new(file, mode, blksize, chunk);
        let mut out = Vec::new();
        loop {
            let b = r.next_block().await.unwrap();
            let short = b.len() < usize::from(blksize);
            out.push(b);
            if short {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn block_reader_sizes() {
        let data: Vec<u8> = (0..2000u32).map(|i| (i * 7) as u8).collect();
        let tmp = tempfile::tempdir().unwrap();
        for len in [0usize, 1, 511, 512, 513, 1024, 1999] {
            let path = tmp.path().join(format!("f{len}"));
            std::fs::write(&path, &data[..len]).unwrap();
            for chunk in [1usize, 100, 512, 700, 4096] {
                let mem = blocks(
                    TftpFile::Memory(Bytes::copy_from_slice(&data[..len])),
                    Mode::Octet,
                    512,
                    chunk,
                )
                .await;
                let file = TftpFile::from_file(std::fs::File::open(&path).unwrap()).unwrap();
                let disk = blocks(file, Mode::Octet, 512, chunk).await;
                assert_eq!(mem, disk);
                assert_eq!(mem.len(), len / 512 + 1, "len {len}");
                assert!(mem[..mem.len() - 1].iter().all(|b| b.len() == 512));
                assert_eq!(mem.concat(), &data[..len]);
            }
        }
    }

    /// The batch arrives as separate datagrams, by GSO, by sendmmsg, and by
    /// the fallback when the kernel refuses a GSO send (here: more segments
    /// than fit in one UDP datagram).
    #[tokio::test]
    async fn batches_arrive_as_datagrams() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        for (count, forced) in [
            (16, None),
            (80, None),
            (1, None),
            // 130 * 516 bytes: more than one datagram can carry.
            (130, Some(300)),
            (3, Some(100)),
        ] {
            let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut gso = Gso::enable(&tx, 512);
            if cfg!(target_os = "linux") {
                assert!(gso.is_some());
            }
            if let (Some(g), Some(max)) = (gso.as_mut(), forced) {
                g.max_segments = max;
            }
            let mut batch = Batch::default();
            for i in 0..count {
                let len = if i + 1 == count { 100 } else { 512 };
                batch.push(i as u16, Bytes::from(vec![i as u8; len]));
            }
            send_batch(&tx, to, &batch, &mut gso).await.unwrap();
            let mut buf = vec![0u8; 70_000];
            for i in 0..count {
                let (n, _) = rx.recv_from(&mut buf).await.unwrap();
                let len = if i + 1 == count { 100 } else { 512 };
                assert_eq!(n, 4 + len, "packet {i} of {count}");
                assert_eq!(&buf[..4], &[0, 3, 0, i as u8]);
                assert!(buf[4..n].iter().all(|&b| b == i as u8));
            }
            if forced.is_some() && count > 128 && cfg!(target_os = "linux") {
                assert!(gso.is_none(), "the refused GSO is switched off");
            }
        }
    }

    #[tokio::test]
    async fn block_reader_netascii() {
        let text = b"line\n".repeat(200); // 1000 bytes, 1200 in netascii
        let b = blocks(
            TftpFile::Memory(Bytes::from(text.clone())),
            Mode::Netascii,
            512,
            64,
        )
        .await;
        let all = b.concat();
        assert_eq!(all.len(), 1200);
        assert_eq!(all, b"line\r\n".repeat(200));
        assert_eq!(b.len(), 3);
    }
}
