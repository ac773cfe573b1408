//! The DHCP sockets: one tokio task per socket (port 67; port 4011 for PXE
//! clients' proxyDHCP requests), each a loop of receive -> [`DhcpServer::handle`]
//! (parse, decide, apply the lease change) -> send. Malformed datagrams are
//! counted and dropped; a flood costs at most the socket's receive buffer.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use dhcproto::v4::MessageType;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

use crate::config::Admission;
use crate::dhcp::client::{classify, client_mac};
use crate::dhcp::config::{DhcpConfig, Mode};
use crate::dhcp::decide::{
    decide, Decision, DhcpContext, Ignored, Inventory, Port, ReplyTo, Request, DHCP_CLIENT_PORT,
    DHCP_SERVER_PORT, PXE_PORT,
};
use crate::dhcp::lease::{apply, LeaseStore};
use crate::dhcp::metrics::DhcpMetrics;
use crate::dhcp::packet::{encode, parse, request_type};
use crate::unix_now;

/// Where the sockets listen.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The interface to serve (SO_BINDTODEVICE); `None` serves every one.
    pub interface: Option<String>,
    /// The address to bind; 0.0.0.0 to receive broadcasts.
    pub bind_addr: Ipv4Addr,
    /// The DHCP server port (67).
    pub dhcp_port: u16,
    /// The PXE port (4011); `None` for no PXE socket. Proxy mode needs it.
    pub pxe_port: Option<u16>,
    /// Where broadcast replies go (255.255.255.255:68).
    pub broadcast: SocketAddrV4,
}

impl ServerOptions {
    /// The standard ports, on an interface (or all), with the PXE port in
    /// proxy mode.
    pub fn standard(interface: Option<String>, mode: &Mode) -> ServerOptions {
        ServerOptions {
            interface,
            bind_addr: Ipv4Addr::UNSPECIFIED,
            dhcp_port: DHCP_SERVER_PORT,
            pxe_port: matches!(mode, Mode::Proxy).then_some(PXE_PORT),
            broadcast: SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_CLIENT_PORT),
        }
    }
}

/// The lease store as the server shares it between tasks.
pub type SharedLeases = Arc<Mutex<Box<dyn LeaseStore + Send>>>;

/// The DHCP server: configuration, inventory, leases and counters.
pub struct DhcpServer {
    config: DhcpConfig,
    admission: Admission,
    inventory: Arc<dyn Inventory + Send + Sync>,
    leases: SharedLeases,
    metrics: Arc<DhcpMetrics>,
    /// Where the identity of boot clients (kind, serial, UUID) is recorded.
    state: Option<Arc<crate::state::State>>,
    /// What was last recorded per MAC: a client's retransmissions and its
    /// iPXE's requests write nothing new.
    recorded: Mutex<std::collections::HashMap<String, Identity>>,
}

/// A boot client's kind, serial and UUID as last recorded.
type Identity = (&'static str, Option<String>, Option<String>);

impl DhcpServer {
    pub fn new(
        config: DhcpConfig,
        admission: Admission,
        inventory: Arc<dyn Inventory + Send + Sync>,
        leases: SharedLeases,
        metrics: Arc<DhcpMetrics>,
    ) -> DhcpServer {
        DhcpServer {
            config,
            admission,
            inventory,
            leases,
            metrics,
            state: None,
            recorded: Mutex::default(),
        }
    }

    /// Records each answered boot client's kind, serial and UUID in `state`
    /// (when they change), so HTTP and TFTP find its inventory entry by them.
    pub fn with_state(mut self, state: Arc<crate::state::State>) -> Self {
        self.state = Some(state);
        self
    }

    pub fn metrics(&self) -> &Arc<DhcpMetrics> {
        &self.metrics
    }

    /// Handles one datagram that arrived on the `port` socket from `src` at `now`:
    /// parses it, decides, applies the lease change, and returns the encoded
    /// reply with its destination (a broadcast reply goes to `broadcast`).
    /// Never panics on what arrives.
    pub fn handle(
        &self,
        bytes: &[u8],
        port: Port,
        src: SocketAddrV4,
        now: i64,
        broadcast: SocketAddrV4,
    ) -> Option<(Vec<u8>, SocketAddrV4)> {
        let msg = match parse(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.metrics.malformed.fetch_add(1, Relaxed);
                tracing::debug!(%src, ?port, len = bytes.len(), "not a DHCP message: {e}");
                return None;
            }
        };
        let Some(ty) = request_type(&msg) else {
            self.metrics.malformed.fetch_add(1, Relaxed);
            tracing::debug!(%src, ?port, "not a DHCP request (no message type, or a reply)");
            return None;
        };
        self.metrics.count_received(ty);
        let mac = client_mac(&msg);
        let client = classify(&msg, mac);
        let kind = client.kind;
        let req = Request { msg, port, src };

        let mut leases = match self.leases.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        let decision = {
            let ctx = DhcpContext {
                config: &self.config,
                admission: self.admission,
                inventory: self.inventory.as_ref(),
                leases: leases.as_ref(),
                now,
            };
            decide(&req, &ctx)
        };
        let mac = mac.map(|m| m.to_string()).unwrap_or_default();
        let (reply, op) = match decision {
            Decision::Ignore(why) => {
                self.metrics.ignored.fetch_add(1, Relaxed);
                match why {
                    Ignored::NotNetboot | Ignored::OtherServer(_) | Ignored::NotHandled(_) => {
                        tracing::trace!(%mac, ?ty, kind = kind.name(), ?why, "ignored")
                    }
                    Ignored::Store(ref e) => {
                        self.metrics.errors.fetch_add(1, Relaxed);
                        tracing::error!(%mac, ?ty, "lease store: {e}")
                    }
                    _ => tracing::info!(%mac, ?ty, kind = kind.name(), ?why, "ignored"),
                }
                return None;
            }
            Decision::Record(op) => (None, Some(op)),
            Decision::Reply(r) => {
                let r = *r;
                (Some((r.msg, r.to)), r.lease)
            }
        };
        if let Some(op) = &op {
            if let Err(e) = apply(leases.as_mut(), op) {
                self.metrics.errors.fetch_add(1, Relaxed);
                tracing::error!(%mac, ?op, "lease store: {e:#}");
                return None;
            }
            tracing::debug!(%mac, ?op, "lease");
        }
        drop(leases);
        if let (Some(state), true) = (&self.state, kind.is_netboot() && reply.is_some()) {
            let id: Identity = (kind.name(), client.serial.clone(), client.uuid.clone());
            let mut recorded = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
            if recorded.get(&mac) != Some(&id) {
                match state.record_identity(&mac, id.0, id.1.as_deref(), id.2.as_deref(), now) {
                    Ok(()) => {
                        recorded.insert(mac.clone(), id);
                    }
                    Err(e) => {
                        self.metrics.errors.fetch_add(1, Relaxed);
                        tracing::error!(%mac, "recording the machine: {e:#}");
                    }
                }
            }
        }
        let (msg, to) = reply?;
        let out_ty = msg.opts().msg_type().unwrap_or(MessageType::Unknown(0));
        let bytes = match encode(&msg) {
            Ok(b) => b,
            Err(e) => {
                self.metrics.errors.fetch_add(1, Relaxed);
                tracing::error!(%mac, "encoding the reply: {e}");
                return None;
            }
        };
        let dest = match to {
            ReplyTo::Broadcast => broadcast,
            ReplyTo::Unicast(a) => a,
        };
        let file = msg.fname_str().and_then(|r| r.ok()).unwrap_or("");
        tracing::info!(
            %mac, kind = kind.name(), request = ?ty, reply = ?out_ty,
            yiaddr = %msg.yiaddr(), file, %dest, "DHCP reply"
        );
        self.metrics.count_sent(out_ty);
        Some((bytes, dest))
    }

    /// Serves until `shutdown` completes; errors if a socket cannot be bound.
    pub async fn run(
        self: Arc<Self>,
        opts: ServerOptions,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let mut ports = vec![(Port::Dhcp, opts.dhcp_port)];
        ports.extend(opts.pxe_port.map(|p| (Port::Pxe, p)));
        let mut tasks = JoinSet::new();
        for (role, port) in ports {
            let sock = bind_udp(
                SocketAddrV4::new(opts.bind_addr, port),
                opts.interface.as_deref(),
            )?;
            tracing::info!(
                port,
                interface = opts.interface.as_deref().unwrap_or("*"),
                "DHCP listening"
            );
            let me = self.clone();
            let broadcast = opts.broadcast;
            tasks.spawn(async move { me.serve_socket(sock, role, broadcast).await });
        }
        if matches!(self.config.mode, Mode::Full(_)) {
            let me = self.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    let mut l = me.leases.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = l.expire(unix_now()) {
                        tracing::error!("expiring leases: {e:#}");
                    }
                }
            });
        }
        tokio::select! {
            _ = shutdown => {}
            Some(res) = tasks.join_next() => {
                // A socket loop only ends on an error.
                tasks.abort_all();
                return match res {
                    Ok(r) => r,
                    Err(e) => Err(anyhow::anyhow!("a DHCP task failed: {e}")),
                };
            }
        }
        tasks.abort_all();
        Ok(())
    }

    async fn serve_socket(
        &self,
        sock: UdpSocket,
        port: Port,
        broadcast: SocketAddrV4,
    ) -> Result<()> {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, src) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors of earlier sends and the like: not fatal,
                    // but no busy loop if one persists.
                    tracing::debug!(?port, "receive: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let SocketAddr::V4(src) = src else { continue };
            let Some((reply, dest)) = self.handle(&buf[..n], port, src, unix_now(), broadcast)
            else {
                continue;
            };
            if let Err(e) = sock.send_to(&reply, dest).await {
                self.metrics.errors.fetch_add(1, Relaxed);
                tracing::warn!(%dest, "sending the DHCP reply: {e}");
            }
        }
    }
}

/// A UDP socket for DHCP: address reuse, broadcast allowed, bound to the
/// interface if one is given, a receive buffer for bursts.
pub fn bind_udp(addr: SocketAddrV4, interface: Option<&str>) -> Result<UdpSocket> {
    let what = || format!("binding the DHCP socket {addr}");
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).with_context(what)?;
    s.set_reuse_address(true).with_context(what)?;
    s.set_broadcast(true).with_context(what)?;
    if let Some(i) = interface {
        s.bind_device(Some(i.as_bytes()))
            .with_context(|| format!("binding the DHCP socket {addr} to interface {i}"))?;
    }
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = s.set_recv_buffer_size(1 << 20);
    s.set_nonblocking(true).with_context(what)?;
    s.bind(&SocketAddr::V4(addr).into()).with_context(what)?;
    UdpSocket::from_std(s.into()).with_context(what)
}
