//! The DHCP sockets end to end.
//!
//! - over loopback (no root): a PXE DISCOVER gets its proxy OFFER, a port-4011
//!   REQUEST its ACK, and after a flood of malformed datagrams the server
//!   still answers;
//! - in a network namespace (root; prints SKIP otherwise): busybox udhcpc
//!   gets an address from the range in full mode and nothing in proxy mode,
//!   where the captured OVMF DISCOVER, sent over a real interface, gets its
//!   proxy OFFER by broadcast.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Message, MessageType};
use kiln_netboot_server::config::Admission;
use kiln_netboot_server::dhcp::packet::{encode, parse};
use kiln_netboot_server::dhcp::server::SharedLeases;
use kiln_netboot_server::dhcp::{
    BootFiles, DhcpConfig, DhcpMetrics, DhcpServer, MacAddr, MachineInfo, MemoryLeaseStore, Mode,
    Pool, ServerOptions,
};

fn server(config: DhcpConfig) -> (Arc<DhcpServer>, SharedLeases) {
    let leases: SharedLeases = Arc::new(Mutex::new(Box::new(MemoryLeaseStore::new())));
    let inventory: BTreeMap<MacAddr, MachineInfo> = BTreeMap::new();
    let s = DhcpServer::new(
        config,
        Admission::Auto,
        Arc::new(inventory),
        leases.clone(),
        Arc::new(DhcpMetrics::new()),
    );
    (Arc::new(s), leases)
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Receives datagrams until one parses as a reply with `xid`, or the deadline.
fn recv_reply(sock: &UdpSocket, xid: u32, deadline: Instant) -> Option<Message> {
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Ok(m) = parse(&buf[..n]) {
            if m.xid() == xid && m.opcode() == dhcproto::v4::Opcode::BootReply {
                return Some(m);
            }
        }
    }
    None
}

fn file(m: &Message) -> String {
    String::from_utf8_lossy(m.fname().unwrap_or_default())
        .trim_end_matches('\0')
        .to_string()
}

#[test]
fn loopback_proxy_offer_pxe_ack_and_flood() {
    let lo = Ipv4Addr::LOCALHOST;
    let client = UdpSocket::bind((lo, 0)).unwrap();
    let client_addr = match client.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        _ => unreachable!(),
    };
    let (dhcp_port, pxe_port) = (free_port(), free_port());
    let (srv, _) = server(DhcpConfig {
        mode: Mode::Proxy,
        server_addr: lo,
        boot: BootFiles::default(),
    });
    let metrics = srv.metrics().clone();
    let opts = ServerOptions {
        interface: None,
        bind_addr: lo,
        dhcp_port,
        pxe_port: Some(pxe_port),
        // "Broadcast" replies come to the test's socket.
        broadcast: client_addr,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let task = rt.spawn(srv.run(opts, async {
        let _ = stopped.await;
    }));
    std::thread::sleep(Duration::from_millis(200));

    // DISCOVER -> OFFER.
    let disc = fixture("ovmf-x64-discover.bin");
    let xid = parse(&disc).unwrap().xid();
    client.send_to(&disc, (lo, dhcp_port)).unwrap();
    let offer =
        recv_reply(&client, xid, Instant::now() + Duration::from_secs(5)).expect("no OFFER");
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(file(&offer), "snponly.efi");

    // REQUEST on the PXE port -> ACK to the sender.
    let mut req = parse(&disc).unwrap();
    req.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Request));
    req.set_ciaddr(lo);
    client
        .send_to(&encode(&req).unwrap(), (lo, pxe_port))
        .unwrap();
    let ack = recv_reply(&client, xid, Instant::now() + Duration::from_secs(5)).expect("no ACK");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(file(&ack), "snponly.efi");

    // A flood of malformed datagrams: truncations and corruptions of real
    // packets, empty and oversized ones, on both ports.
    let flooder = UdpSocket::bind((lo, 0)).unwrap();
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut sent = 0u64;
    for i in 0..20_000usize {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut b = disc.clone();
        match i % 4 {
            0 => b.truncate((seed as usize) % b.len()),
            1 => {
                let at = 240 + (seed as usize) % (b.len() - 240);
                b[at] = (seed >> 8) as u8;
                b[2] = 200; // a chaddr length over 16
            }
            2 => b = vec![(seed & 0xff) as u8; (seed as usize) % 1500],
            _ => {
                // Option 94 of the wrong length, which dhcproto asserts on.
                b.truncate(240);
                b.extend_from_slice(&[53, 1, 1, 94, 2, 1, 2, 255]);
            }
        }
        let port = if i % 2 == 0 { dhcp_port } else { pxe_port };
        if flooder.send_to(&b, (lo, port)).is_ok() {
            sent += 1;
        }
    }
    assert!(sent > 10_000);

    // Still serving: the same DISCOVER is answered (retried, as a client
    // would, in case the flood filled the socket buffer).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered = None;
    while answered.is_none() && Instant::now() < deadline {
        client.send_to(&disc, (lo, dhcp_port)).unwrap();
        answered = recv_reply(&client, xid, Instant::now() + Duration::from_millis(500));
    }
    assert!(answered.is_some(), "no OFFER after the flood");
    assert!(metrics.malformed.load(Ordering::Relaxed) > 1000);
    assert!(metrics.received(MessageType::Discover) >= 2);
    assert!(metrics.sent(MessageType::Offer) >= 2);
    assert!(!task.is_finished(), "the server stopped");
    stop.send(()).unwrap();
    rt.block_on(task).unwrap().unwrap();
}

// ---- in a network namespace, with busybox udhcpc

/// Two network namespaces joined by a veth pair: the server's, with `vs`
/// (10.77.0.1/24), and the client's, with `vc` (no address); removed on drop.
struct Netns {
    server: String,
    client: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let base = format!("kiln-dhcp-{tag}-{}", std::process::id());
        let ns = Netns {
            server: format!("{base}-s"),
            client: format!("{base}-c"),
        };
        let (s, c) = (ns.server.as_str(), ns.client.as_str());
        sh(&["ip", "netns", "add", s]);
        sh(&["ip", "netns", "add", c]);
        sh(&["ip", "-n", s, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", c, "link", "set", "lo", "up"]);
        sh(&[
            "ip", "-n", s, "link", "add", "vs", "type", "veth", "peer", "name", "vc", "netns", c,
        ]);
        sh(&["ip", "-n", s, "addr", "add", "10.77.0.1/24", "dev", "vs"]);
        sh(&["ip", "-n", s, "link", "set", "vs", "up"]);
        sh(&[
            "ip",
            "-n",
            c,
            "link",
            "set",
            "vc",
            "address",
            "52:54:00:77:00:02",
        ]);
        sh(&["ip", "-n", c, "link", "set", "vc", "up"]);
        ns
    }

    /// Moves the calling thread into a namespace.
    fn enter(name: &str) {
        let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        use std::os::fd::AsRawFd;
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in [&self.server, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Runs the server in its own thread inside the namespace until the returned
/// sender is dropped or sent to.
fn serve_in(
    ns: &Netns,
    srv: Arc<DhcpServer>,
    mode: &Mode,
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let opts = ServerOptions::standard(Some("vs".into()), mode);
    let name = ns.server.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        Netns::enter(&name);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let _ = ready_tx.send(());
            srv.run(opts, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
    });
    ready_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    (stop, handle)
}

/// Runs busybox udhcpc on `vc`; returns (success, what its script printed).
fn udhcpc(ns: &Netns, tries: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"event=$1 ip=$ip mask=$mask router=$router\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.client, "busybox", "udhcpc"])
        .args(["-f", "-q", "-n", "-t", tries, "-T", "1", "-i", "vc", "-s"])
        .arg(&script)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn netns_prerequisites(test: &str) -> bool {
    if !is_root() {
        eprintln!("SKIP {test}: needs root (network namespaces)");
        return false;
    }
    for cmd in ["ip", "busybox"] {
        if !have(cmd) {
            eprintln!("SKIP {test}: no {cmd}");
            return false;
        }
    }
    true
}

#[test]
fn netns_full_mode_udhcpc_gets_an_address() {
    if !netns_prerequisites("netns_full_mode_udhcpc_gets_an_address") {
        return;
    }
    let ns = Netns::new("full");
    let mut pool = Pool::new(
        "10.77.0.100".parse().unwrap(),
        "10.77.0.150".parse().unwrap(),
        "255.255.255.0".parse().unwrap(),
    );
    pool.router = Some("10.77.0.1".parse().unwrap());
    let mode = Mode::Full(pool);
    let (srv, leases) = server(DhcpConfig {
        mode: mode.clone(),
        server_addr: "10.77.0.1".parse().unwrap(),
        boot: BootFiles::default(),
    });
    let metrics = srv.metrics().clone();
    let (stop, handle) = serve_in(&ns, srv, &mode);
    let (ok, out) = udhcpc(&ns, "5");
    let _ = stop.send(());
    handle.join().unwrap();
    assert!(ok, "udhcpc failed:\n{out}");
    assert!(
        out.contains("event=bound ip=10.77.0.100 mask=24 router=10.77.0.1")
            || out.contains("event=bound ip=10.77.0.100 mask=255.255.255.0 router=10.77.0.1"),
        "{out}"
    );
    let mac: MacAddr = "52:54:00:77:00:02".parse().unwrap();
    let lease = leases.lock().unwrap().by_mac(mac).unwrap().unwrap();
    assert_eq!(lease.addr, "10.77.0.100".parse::<Ipv4Addr>().unwrap());
    assert_eq!(metrics.sent(MessageType::Offer), 1);
    assert_eq!(metrics.sent(MessageType::Ack), 1);
}

#[test]
fn netns_proxy_mode_answers_pxe_and_not_udhcpc() {
    if !netns_prerequisites("netns_proxy_mode_answers_pxe_and_not_udhcpc") {
        return;
    }
    let ns = Netns::new("proxy");
    let (srv, _) = server(DhcpConfig {
        mode: Mode::Proxy,
        server_addr: "10.77.0.1".parse().unwrap(),
        boot: BootFiles::default(),
    });
    let metrics = srv.metrics().clone();
    let (stop, handle) = serve_in(&ns, srv, &Mode::Proxy);

    // udhcpc: nothing.
    let (ok, out) = udhcpc(&ns, "2");
    assert!(!ok, "udhcpc got a lease from a proxyDHCP server:\n{out}");
    assert!(!out.contains("event=bound"), "{out}");
    assert!(metrics.received(MessageType::Discover) >= 1);
    assert_eq!(metrics.sent(MessageType::Offer), 0);

    // The captured OVMF DISCOVER, broadcast from the client's namespace
    // (from an address there: a UDP socket needs one), gets the proxy OFFER
    // by broadcast on port 68.
    sh(&[
        "ip",
        "-n",
        &ns.client,
        "addr",
        "add",
        "10.77.0.2/24",
        "dev",
        "vc",
    ]);
    let name = ns.client.clone();
    let reply = std::thread::spawn(move || {
        Netns::enter(&name);
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        s.set_reuse_address(true).unwrap();
        s.set_broadcast(true).unwrap();
        s.bind_device(Some(b"vc")).unwrap();
        s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68).into())
            .unwrap();
        let sock: UdpSocket = s.into();
        let disc = fixture("ovmf-x64-discover.bin");
        let xid = parse(&disc).unwrap().xid();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = None;
        while got.is_none() && Instant::now() < deadline {
            sock.send_to(&disc, (Ipv4Addr::BROADCAST, 67)).unwrap();
            got = recv_reply(&sock, xid, Instant::now() + Duration::from_secs(1));
        }
        got
    })
    .join()
    .unwrap()
    .expect("no proxy OFFER for the OVMF DISCOVER");
    let _ = stop.send(());
    handle.join().unwrap();
    assert_eq!(reply.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(reply.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(reply.siaddr(), "10.77.0.1".parse::<Ipv4Addr>().unwrap());
    assert_eq!(file(&reply), "snponly.efi");
}
