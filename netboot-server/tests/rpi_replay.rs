//! Raspberry Pi network boot replayed over real sockets (root: network
//! namespaces; prints SKIP otherwise).
//!
//! The test makes a server namespace with a bridge (10.78.0.1/24) and one
//! client namespace per machine, each joined to the bridge by a veth pair
//! whose client end has the machine's MAC. In the server namespace it runs
//! the DHCP server (full mode, then proxy mode) and the TFTP server with the
//! Raspberry Pi file source, wired as `kiln serve` wires them, from a config
//! file with an allowlist: a Pi 4 listed by serial (image `rpi-a`, its boot
//! files in a `boot/` directory) and a Pi 5 listed by MAC (image `rpi-b`,
//! only `sdcard.img` and `manifest.json`, as `kiln build` writes them: its
//! boot files come from the card's FAT partition once the card matches the
//! manifest). From sockets inside the client namespaces
//! it sends what the bootloaders send and checks the replies byte by byte
//! where the protocol fixes them:
//!
//! - DHCP: the Pi 4 DISCOVER of `fixtures/dhcp/rpi4-discover.bin` (and a
//!   Pi 5 one derived from it: FourCC "RPi5", a MAC outside the Pi OUIs) from
//!   port 68, then the REQUEST; OFFER and ACK carry option 43 equal to the
//!   documented "Raspberry Pi Boot" bytes, option 60 "PXEClient", option 66
//!   the server's address as text, siaddr, option 97 echoed, no boot file,
//!   and an address from the range (full mode) or none (proxy mode). A Pi
//!   outside the inventory gets an address and no boot options.
//! - TFTP: the Pi 4 bootloader's `<serial>/start4.elf` probe (tsize and
//!   blksize 1024, ended by ERROR 0 after the OACK, and once after the first
//!   block), then full reads of config.txt, start4.elf, fixup4.dat, the DTB,
//!   cmdline.txt, the kernel and the initramfs; files byte-equal to the
//!   image's `boot/`, config.txt and cmdline.txt rendered per machine. Ended
//!   transfers are never retransmitted. Reads without the serial prefix work
//!   (the server finds the machine by its neighbour entry). The Pi 5 reads its
//!   own image's files (bcm2712-rpi-5-b.dtb, an overlay) byte-equal to what
//!   went into its card, and the card's config.txt and cmdline.txt (its
//!   `kiln.root=PARTUUID=` dropped) rendered; the stranger gets ERROR 2.

mod common;

use common::*;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_builder::sdcard;
use kiln_netboot_server::config::{Flags, ServeConfig};
use kiln_netboot_server::dhcp::{
    server::SharedLeases, BootFiles, DhcpConfig, DhcpMetrics, DhcpServer, Mode, Pool, ServerOptions,
};
use kiln_netboot_server::leases::SqlLeaseStore;
use kiln_netboot_server::rpi::{mac_in_arp_table, PiFiles};
use kiln_netboot_server::state::State;
use kiln_netboot_server::tftp::{TftpServer, TftpStats};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const HTTP_PORT: u16 = 8080;
const RANGE: (Ipv4Addr, Ipv4Addr) = (Ipv4Addr::new(10, 78, 0, 100), Ipv4Addr::new(10, 78, 0, 150));

const PI4_MAC: &str = "dc:a6:32:a7:ed:89";
const PI4_SERIAL: &str = "e5ef6e9d";
const PI5_MAC: &str = "06:00:00:00:50:05";
const PI5_SERIAL: &str = "c0ffee05";
const STRANGER_MAC: &str = "dc:a6:32:00:0b:ad";
const STRANGER_SERIAL: &str = "0badc0de";

/// Option 43 of a working reply as the Raspberry Pi network boot
/// documentation shows it (tcpdump -v): PXE discovery control 3, menu prompt
/// "PXE" with timeout 0, one boot menu item "Raspberry Pi Boot", end.
const DOCUMENTED_OPTION_43: &str =
    "6.1.3.10.4.0.80.88.69.9.20.0.0.17.82.97.115.112.98.101.114.114.121.32.80.105.32.66.111.111.116.255";

// ---------------------------------------------------------------- namespaces

/// The server's namespace with bridge `br0` (10.78.0.1/24) and one client
/// namespace per machine, its `eth0` (with the machine's MAC and a
/// link-local address to send from before DHCP) on the bridge; all removed
/// on drop.
struct Net {
    server: String,
    clients: Vec<String>,
}

impl Net {
    fn new() -> Net {
        let server = format!("kiln-rpi-{}-s", std::process::id());
        sh(&["ip", "netns", "add", &server]);
        let net = Net {
            server,
            clients: Vec::new(),
        };
        let s = net.server.as_str();
        sh(&["ip", "-n", s, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", s, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", s, "addr", "add", "10.78.0.1/24", "dev", "br0"]);
        sh(&["ip", "-n", s, "link", "set", "br0", "up"]);
        net
    }

    /// Adds a client namespace for the machine with `mac`; returns its name.
    fn client(&mut self, tag: &str, mac: &str, link_local: &str) -> String {
        let name = format!("kiln-rpi-{}-{tag}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        self.clients.push(name.clone());
        let (s, c) = (self.server.as_str(), name.as_str());
        let port = format!("v{tag}");
        sh(&["ip", "-n", c, "link", "set", "lo", "up"]);
        sh(&[
            "ip", "-n", s, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", c,
        ]);
        sh(&["ip", "-n", s, "link", "set", &port, "master", "br0"]);
        sh(&["ip", "-n", s, "link", "set", &port, "up"]);
        sh(&["ip", "-n", c, "link", "set", "eth0", "address", mac]);
        sh(&[
            "ip",
            "-n",
            c,
            "addr",
            "add",
            &format!("{link_local}/16"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", c, "link", "set", "eth0", "up"]);
        name
    }

    /// Gives a client the address its DHCP ACK named.
    fn configure(&self, client: &str, addr: Ipv4Addr) {
        sh(&[
            "ip",
            "-n",
            client,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
    }

    /// Moves the calling thread into a namespace.
    fn enter(name: &str) {
        let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        use std::os::fd::AsRawFd;
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in self.clients.iter().chain([&self.server]) {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            Net::enter(ns);
            f()
        })
        .join()
        .unwrap()
    })
}

// ---------------------------------------------------------------- images

/// Boot files and their sizes: start4.elf is over 100 blocks of 1024 bytes,
/// fixup4.dat exactly 7 (so its transfer ends with an empty block).
const BOOT_FILES: &[(&str, usize)] = &[
    ("start4.elf", 100 * 1024 + 7),
    ("fixup4.dat", 7 * 1024),
    ("bcm2711-rpi-4-b.dtb", 52_593),
    ("bcm2712-rpi-5-b.dtb", 77_801),
    ("vmlinuz", 300_001),
    ("initrd.img", 500_003),
];

const IMAGE_CMDLINE: &str = "console=serial0,115200 console=tty1\n";
const RPI_A_CONFIG: &str =
    "arm_64bit=1\nkernel=vmlinuz\ninitramfs initrd.img followkernel\ndtoverlay=disable-bt\n";

/// The content of an image's boot file.
fn boot_file(image: &str, name: &str) -> Vec<u8> {
    let len = BOOT_FILES.iter().find(|(n, _)| *n == name).unwrap().1;
    let seed = image
        .bytes()
        .chain(name.bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    prng_bytes(len, seed)
}

fn root_sha(image: &str) -> String {
    match image {
        "rpi-a" => "aa".repeat(32),
        _ => "bb".repeat(32),
    }
}

/// A firmware overlay on the Pi 5's card.
const RPI_B_OVERLAY: &str = "overlays/vc4-kms-v3d-pi5.dtbo";

/// Where an image's boot partition files are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PiBoot {
    /// None (a PC image).
    None,
    /// `<image>/boot/`.
    Dir,
    /// `<image>/sdcard.img`, listed in the manifest, and nothing else.
    Card,
}

/// The boot partition of `image`'s card: the boot files, an overlay, the
/// builder's config.txt and the console settings with the card's own root
/// (`kiln.root=PARTUUID=...`, which the server drops).
fn card_files(image: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files: std::collections::BTreeMap<String, Vec<u8>> = BOOT_FILES
        .iter()
        .map(|(name, _)| (name.to_string(), boot_file(image, name)))
        .collect();
    files.insert(RPI_B_OVERLAY.into(), prng_bytes(4099, 5));
    files.insert("config.txt".into(), sdcard::config_txt().into_bytes());
    let root = sdcard::partuuid(sdcard::disk_id(image), 2);
    files.insert(
        "cmdline.txt".into(),
        format!("{} kiln.root=PARTUUID={root}\n", IMAGE_CMDLINE.trim_end()).into_bytes(),
    );
    files
}

/// Writes `<dir>/<image>/sdcard.img` with `kiln_builder::sdcard::write` (a
/// small stand-in root in partitions 2 and 3, removed afterwards, as a build
/// with only the sdcard output does); returns its manifest entry.
fn write_card(d: &Path, image: &str) -> serde_json::Value {
    let boot = card_files(image)
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect();
    let rootfs = d.join("rootfs.squashfs");
    std::fs::write(&rootfs, prng_bytes(65_536, 7)).unwrap();
    let card = d.join("sdcard.img");
    sdcard::write(
        &card,
        &sdcard::Card {
            disk_id: sdcard::disk_id(image),
            volume_id: sdcard::volume_id(image),
            epoch: 1_735_689_600,
            boot: &boot,
            rootfs: &rootfs,
        },
    )
    .unwrap();
    std::fs::remove_file(&rootfs).unwrap();
    let (sha256, size) = kiln_builder::hash_file(&card).unwrap();
    serde_json::json!({"name": "sdcard.img", "sha256": sha256, "size": size})
}

/// `<dir>/<image>/manifest.json` and the boot partition's files where
/// `files` says (`config.txt`, in `boot/`, when given).
fn fabricate(dir: &Path, image: &str, files: PiBoot, config: Option<&str>) {
    let d = dir.join(image);
    std::fs::create_dir_all(&d).unwrap();
    // The server takes the root's URL and sha256 from the manifest (a Pi
    // image for network boot is built with the pxe output too).
    let mut artifacts =
        vec![serde_json::json!({"name": "rootfs.squashfs", "sha256": root_sha(image), "size": 1})];
    if files == PiBoot::Card {
        artifacts.push(write_card(&d, image));
    }
    let m = serde_json::json!({
        "name": image, "arch": "aarch64", "kiln_version": "0", "spec_sha256": "00",
        "source_date_epoch": 0,
        "kernel": {"package": "linux-image-arm64", "version": "6.12.0"}, "k3s": null,
        "artifacts": artifacts,
        "packages": []
    });
    std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
    if files != PiBoot::Dir {
        return;
    }
    let b = d.join("boot");
    std::fs::create_dir_all(&b).unwrap();
    for (name, _) in BOOT_FILES {
        std::fs::write(b.join(name), boot_file(image, name)).unwrap();
    }
    std::fs::write(b.join("cmdline.txt"), IMAGE_CMDLINE).unwrap();
    if let Some(c) = config {
        std::fs::write(b.join("config.txt"), c).unwrap();
    }
}

/// The cmdline.txt a machine booting `image` should get.
fn expected_cmdline(image: &str, extra: &str) -> String {
    let base = format!("http://{SERVER}:{HTTP_PORT}");
    format!(
        "console=serial0,115200 console=tty1 kiln.root={base}/images/{image}/rootfs.squashfs \
         kiln.root_sha256={} kiln.server={base}{extra}\n",
        root_sha(image)
    )
}

fn config(dir: &Path, full: bool) -> ServeConfig {
    let dhcp = if full {
        format!(
            "[dhcp]\nmode = \"full\"\nrange = \"{}-{}\"\n",
            RANGE.0, RANGE.1
        )
    } else {
        "[dhcp]\nmode = \"proxy\"\n".to_string()
    };
    let text = format!(
        r#"interface = "br0"
images = "{images}"
default_image = "rpi-default"
state = "{state}"
http = "{SERVER}:{HTTP_PORT}"
{dhcp}
[admission]
policy = "allowlist"

[image.rpi-a]
kernel_args = "quiet"

[[machine]]
serial = "{PI4_SERIAL}"
image = "rpi-a"

[[machine]]
mac = "{PI5_MAC}"
image = "rpi-b"
"#,
        images = dir.display(),
        state = dir.join("state.db").display(),
    );
    let path = dir.join(if full { "full.toml" } else { "proxy.toml" });
    std::fs::write(&path, text).unwrap();
    ServeConfig::load(&Flags {
        config: Some(path),
        ..Flags::default()
    })
    .unwrap()
}

// ---------------------------------------------------------------- servers

/// The MAC of a client address, from the neighbour table of the calling
/// thread's namespace (the servers run on threads that entered the server's
/// namespace, so `/proc/net/arp`, the process's, is not theirs).
fn thread_neighbour(ip: IpAddr) -> Option<String> {
    mac_in_arp_table(
        &std::fs::read_to_string("/proc/thread-self/net/arp").ok()?,
        ip,
    )
}

struct Servers {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    tftp: Arc<TftpStats>,
    dhcp: Arc<DhcpMetrics>,
}

/// Starts the DHCP and TFTP servers in the server namespace, wired as
/// `kiln serve` wires them (its HTTP server and iPXE binaries aside).
fn start(ns: &str, cfg: ServeConfig, state: Arc<State>) -> Servers {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let name = ns.to_string();
    let dhcp_metrics = Arc::new(DhcpMetrics::new());
    let metrics = dhcp_metrics.clone();
    let thread = std::thread::spawn(move || {
        Net::enter(&name);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (ip, mask) =
                kiln_netboot_server::serve::interface_ipv4(cfg.interface.as_deref().unwrap())
                    .unwrap();
            let public_url = format!("http://{ip}:{}", cfg.http.port());
            let mode = match &cfg.full {
                Some(f) => Mode::Full(Pool::from_settings(f, Some(mask), ip).unwrap()),
                None => Mode::Proxy,
            };
            let pi = PiFiles::from_config(&cfg, state.clone(), &public_url, thread_neighbour);
            let tftp = TftpServer::bind(SocketAddr::new(ip.into(), 69), Arc::new(pi))
                .await
                .unwrap();
            let tftp_stats = tftp.stats();
            let leases: SharedLeases = Arc::new(std::sync::Mutex::new(Box::new(
                SqlLeaseStore::new(state.clone()).unwrap(),
            )));
            let opts = ServerOptions::standard(cfg.interface.clone(), &mode);
            let dhcp = Arc::new(
                DhcpServer::new(
                    DhcpConfig {
                        mode,
                        server_addr: ip,
                        boot: BootFiles::with_http_base(&public_url),
                    },
                    cfg.admission,
                    Arc::new(cfg.clone()),
                    leases,
                    metrics,
                )
                .with_state(state),
            );
            let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            let t = tokio::spawn(tftp.run(wait(stopped.clone())));
            let d = tokio::spawn(dhcp.run(opts, wait(stopped.clone())));
            // Both sockets are bound once the tasks have started.
            tokio::time::sleep(Duration::from_millis(200)).await;
            ready_tx.send(tftp_stats).unwrap();
            t.await.unwrap().unwrap();
            d.await.unwrap().unwrap();
        });
    });
    let tftp = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the servers start");
    Servers {
        stop,
        thread: Some(thread),
        tftp,
        dhcp: dhcp_metrics,
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !std::thread::panicking() {
                r.expect("the servers stop cleanly");
            }
        }
    }
}

// ---------------------------------------------------------------- DHCP client

fn mac_bytes(mac: &str) -> [u8; 6] {
    let v: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// The options of a BOOTP message (after the magic cookie), in order.
fn options(p: &[u8]) -> Vec<(u8, Vec<u8>)> {
    assert!(p.len() >= 240, "short message ({} bytes)", p.len());
    assert_eq!(p[236..240], [99, 130, 83, 99], "magic cookie");
    let mut out = Vec::new();
    let mut i = 240;
    while i < p.len() {
        match p[i] {
            0 => i += 1,
            255 => return out,
            code => {
                let len = p[i + 1] as usize;
                out.push((code, p[i + 2..i + 2 + len].to_vec()));
                i += 2 + len;
            }
        }
    }
    panic!("no end option");
}

fn build(header: &[u8], opts: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut p = header[..240].to_vec();
    for (code, data) in opts {
        p.push(*code);
        p.push(data.len() as u8);
        p.extend_from_slice(data);
    }
    p.push(255);
    p
}

fn opt(opts: &[(u8, Vec<u8>)], code: u8) -> Option<&[u8]> {
    let mut found = opts.iter().filter(|(c, _)| *c == code);
    let first = found.next().map(|(_, d)| d.as_slice());
    assert!(found.next().is_none(), "option {code} appears twice");
    first
}

/// A Raspberry Pi bootloader's DISCOVER: the Pi 4 fixture with this MAC,
/// xid, FourCC and serial (option 97: type 0, FourCC, board revision, the
/// MAC's four low bytes, the serial, little-endian).
fn pi_discover(mac: &str, xid: u32, fourcc: &[u8; 4], serial: &str) -> Vec<u8> {
    let mut p = fixture("rpi4-discover.bin");
    let mac = mac_bytes(mac);
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[28..34].copy_from_slice(&mac);
    let mut opts = options(&p);
    let serial = u32::from_str_radix(serial, 16).unwrap().to_le_bytes();
    for (code, data) in &mut opts {
        if *code == 97 {
            data[1..5].copy_from_slice(fourcc);
            if fourcc == b"RPi5" {
                data[5..9].copy_from_slice(&0x00d0_4170u32.to_le_bytes());
            }
            data[9..13].copy_from_slice(&mac[2..]);
            data[13..17].copy_from_slice(&serial);
        }
    }
    build(&p, &opts)
}

/// The REQUEST a client sends for an offer: the DISCOVER with message type
/// 3, the requested address (50) and the server identifier (54).
fn request_for(discover: &[u8], offer: &[u8]) -> Vec<u8> {
    let yiaddr = offer[16..20].to_vec();
    let mut opts = Vec::new();
    for (code, data) in options(discover) {
        if code == 53 {
            opts.push((53, vec![3]));
            opts.push((50, yiaddr.clone()));
            opts.push((54, SERVER.octets().to_vec()));
        } else {
            opts.push((code, data));
        }
    }
    build(discover, &opts)
}

/// A DHCP client socket on port 68 of `eth0`, allowed to broadcast.
fn dhcp_socket() -> UdpSocket {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_broadcast(true).unwrap();
    s.bind_device(Some(b"eth0")).unwrap();
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68).into())
        .unwrap();
    s.into()
}

/// Broadcasts `msg` to port 67 (once a second, as a client retries) until a
/// BOOTREPLY with its xid arrives; `None` after `within`.
fn exchange(sock: &UdpSocket, msg: &[u8], within: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        sock.send_to(msg, (Ipv4Addr::BROADCAST, 67)).unwrap();
        let resend = (Instant::now() + Duration::from_secs(1)).min(deadline);
        while Instant::now() < resend {
            sock.set_read_timeout(Some(resend - Instant::now() + Duration::from_millis(1)))
                .unwrap();
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                continue;
            };
            if n >= 240 && buf[0] == 2 && buf[4..8] == msg[4..8] {
                return Some(buf[..n].to_vec());
            }
        }
    }
    None
}

/// Checks a reply to a Raspberry Pi bootloader where the protocol fixes its
/// bytes. `full`: with an address from the range (else none, proxy mode).
/// Returns yiaddr.
fn check_pi_reply(reply: &[u8], request: &[u8], msg_type: u8, full: bool) -> Ipv4Addr {
    let what = format!("reply type {msg_type}");
    assert_eq!(reply[0], 2, "{what}: op BOOTREPLY");
    assert_eq!((reply[1], reply[2]), (1, 6), "{what}: htype, hlen");
    assert_eq!(reply[4..8], request[4..8], "{what}: xid");
    assert_eq!(reply[28..44], request[28..44], "{what}: chaddr");
    let yiaddr = Ipv4Addr::new(reply[16], reply[17], reply[18], reply[19]);
    let siaddr = Ipv4Addr::new(reply[20], reply[21], reply[22], reply[23]);
    assert_eq!(siaddr, SERVER, "{what}: siaddr");
    assert!(
        reply[108..236].iter().all(|b| *b == 0),
        "{what}: a boot file (the Pi fetches fixed names)"
    );
    let opts = options(reply);
    let req = options(request);
    assert_eq!(opt(&opts, 53), Some(&[msg_type][..]), "{what}: option 53");
    assert_eq!(
        opt(&opts, 54),
        Some(&SERVER.octets()[..]),
        "{what}: option 54"
    );
    let documented: Vec<u8> = DOCUMENTED_OPTION_43
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(
        opt(&opts, 43),
        Some(&documented[..]),
        "{what}: option 43, the Raspberry Pi Boot menu"
    );
    assert_eq!(opt(&opts, 60), Some(&b"PXEClient"[..]), "{what}: option 60");
    assert_eq!(
        opt(&opts, 66),
        Some(SERVER.to_string().as_bytes()),
        "{what}: option 66"
    );
    assert_eq!(
        opt(&opts, 97),
        opt(&req, 97),
        "{what}: option 97 echoed byte for byte"
    );
    assert_eq!(opt(&opts, 67), None, "{what}: option 67");
    assert_eq!(opt(&opts, 52), None, "{what}: option overload");
    if full {
        assert!(
            (u32::from(RANGE.0)..=u32::from(RANGE.1)).contains(&u32::from(yiaddr)),
            "{what}: yiaddr {yiaddr} outside the range"
        );
        assert_eq!(opt(&opts, 1), Some(&[255, 255, 255, 0][..]), "{what}: mask");
        assert_eq!(
            opt(&opts, 51),
            Some(&3600u32.to_be_bytes()[..]),
            "{what}: lease time"
        );
    } else {
        assert_eq!(yiaddr, Ipv4Addr::UNSPECIFIED, "{what}: proxy yiaddr");
        assert_eq!(opt(&opts, 51), None, "{what}: proxy lease time");
    }
    yiaddr
}

/// DISCOVER -> OFFER -> REQUEST -> ACK in full mode, every reply checked;
/// returns the address.
fn pi_dhcp_full(discover: &[u8]) -> Ipv4Addr {
    let sock = dhcp_socket();
    let offer = exchange(&sock, discover, Duration::from_secs(5)).expect("no OFFER");
    let offered = check_pi_reply(&offer, discover, 2, true);
    let request = request_for(discover, &offer);
    let ack = exchange(&sock, &request, Duration::from_secs(5)).expect("no ACK");
    let acked = check_pi_reply(&ack, &request, 5, true);
    assert_eq!(acked, offered);
    acked
}

// ---------------------------------------------------------------- TFTP client

#[derive(Debug, PartialEq, Eq)]
enum Tftp {
    Data(u16, Vec<u8>),
    Oack(Vec<(String, String)>),
    Error(u16, String),
}

fn parse_tftp(b: &[u8]) -> Tftp {
    let op = u16::from_be_bytes([b[0], b[1]]);
    match op {
        3 => Tftp::Data(u16::from_be_bytes([b[2], b[3]]), b[4..].to_vec()),
        5 => {
            let msg = &b[4..];
            assert_eq!(msg.last(), Some(&0), "ERROR message not NUL-terminated");
            Tftp::Error(
                u16::from_be_bytes([b[2], b[3]]),
                String::from_utf8_lossy(&msg[..msg.len() - 1]).into_owned(),
            )
        }
        6 => {
            assert_eq!(b.last(), Some(&0), "OACK not NUL-terminated");
            let f: Vec<String> = b[2..b.len() - 1]
                .split(|c| *c == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            assert_eq!(f.len() % 2, 0, "OACK {f:?}");
            Tftp::Oack(
                f.chunks(2)
                    .map(|kv| (kv[0].to_ascii_lowercase(), kv[1].clone()))
                    .collect(),
            )
        }
        _ => panic!("the server sent opcode {op}: {b:?}"),
    }
}

/// How the Pi 4 bootloader asks: octet, tsize and blksize 1024.
const PI_OPTIONS: &[(&str, &str)] = &[("tsize", "0"), ("blksize", "1024")];

/// A bootloader's TFTP client: one socket, lock-step reads. Transfers it has
/// ended must stay silent: a packet from one fails the test.
struct Client {
    sock: UdpSocket,
    server: SocketAddr,
    ended: std::cell::RefCell<Vec<SocketAddr>>,
}

impl Client {
    fn new() -> Client {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        Client {
            sock,
            server: SocketAddr::new(SERVER.into(), 69),
            ended: Default::default(),
        }
    }

    fn rrq(&self, name: &str, opts: &[(&str, &str)]) {
        let mut p = vec![0, 1];
        for s in [name, "octet"]
            .into_iter()
            .chain(opts.iter().flat_map(|(k, v)| [*k, *v]))
        {
            p.extend_from_slice(s.as_bytes());
            p.push(0);
        }
        self.sock.send_to(&p, self.server).unwrap();
    }

    fn ack(&self, block: u16, to: SocketAddr) {
        let [a, b] = block.to_be_bytes();
        self.sock.send_to(&[0, 4, a, b], to).unwrap();
    }

    fn error(&self, code: u16, msg: &str, to: SocketAddr) {
        let mut p = vec![0, 5];
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(msg.as_bytes());
        p.push(0);
        self.sock.send_to(&p, to).unwrap();
        self.ended.borrow_mut().push(to);
    }

    fn recv(&self, wait: Duration) -> Option<(Tftp, SocketAddr)> {
        let mut buf = vec![0u8; 70_000];
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let (n, from) = self.sock.recv_from(&mut buf).ok()?;
        let p = parse_tftp(&buf[..n]);
        assert!(
            !self.ended.borrow().contains(&from),
            "a transfer the client ended ({from}) sent {p:?}"
        );
        Some((p, from))
    }

    fn expect(&self) -> (Tftp, SocketAddr) {
        self.recv(Duration::from_secs(5))
            .expect("no TFTP reply in 5 s")
    }

    /// A whole file, read as the bootloader does; checks the OACK (blksize
    /// as asked, tsize the file's size), every block number and size.
    fn fetch(&self, name: &str) -> Result<Vec<u8>, (u16, String)> {
        self.rrq(name, PI_OPTIONS);
        let mut out = Vec::new();
        let mut tsize = None;
        let mut next = 1u16;
        let mut tid = None;
        loop {
            let (p, from) = self.expect();
            assert_ne!(from.port(), 69, "{name}: replies come from a transfer port");
            if let Some(t) = tid {
                assert_eq!(from, t, "{name}: the server's TID changed");
            }
            tid = Some(from);
            match p {
                Tftp::Oack(o) => {
                    assert_eq!(next, 1, "{name}: OACK mid-transfer");
                    let get = |k: &str| o.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                    assert_eq!(get("blksize").as_deref(), Some("1024"), "{name}: {o:?}");
                    tsize = Some(get("tsize").expect("tsize in the OACK"));
                    self.ack(0, from);
                }
                Tftp::Data(block, data) => {
                    assert_eq!(block, next, "{name}: block after {} bytes", out.len());
                    assert!(data.len() <= 1024, "{name}: block {block} too big");
                    out.extend_from_slice(&data);
                    self.ack(block, from);
                    if data.len() < 1024 {
                        assert_eq!(
                            tsize.as_deref(),
                            Some(out.len().to_string().as_str()),
                            "{name}: tsize"
                        );
                        self.ended.borrow_mut().push(from);
                        return Ok(out);
                    }
                    next = next.wrapping_add(1);
                }
                Tftp::Error(code, msg) => return Err((code, msg)),
            }
        }
    }

    fn fetch_ok(&self, name: &str) -> Vec<u8> {
        self.fetch(name)
            .unwrap_or_else(|e| panic!("{name}: ERROR {e:?}"))
    }
}

// ---------------------------------------------------------------- the replay

/// The Pi 4 bootloader after DHCP: the start4.elf probes, then its files.
fn pi4_tftp(stats: &TftpStats) {
    let c = Client::new();
    let prefixed = |f: &str| format!("{PI4_SERIAL}/{f}");
    let file = |f: &str| boot_file("rpi-a", f);

    // The probe: tsize and blksize, then ERROR 0 once the OACK is in.
    let before = stats.snapshot();
    c.rrq(&prefixed("start4.elf"), PI_OPTIONS);
    let (p, tid) = c.expect();
    let size = BOOT_FILES[0].1.to_string();
    assert_eq!(
        p,
        Tftp::Oack(vec![
            ("tsize".into(), size),
            ("blksize".into(), "1024".into())
        ]),
        "the probe's OACK"
    );
    c.error(0, "Early terminate", tid);
    let probe_ended = Instant::now();
    // The same probe ended after the first block, from another port.
    let c2 = Client::new();
    c2.rrq(&prefixed("start4.elf"), PI_OPTIONS);
    let (p, tid2) = c2.expect();
    assert!(matches!(p, Tftp::Oack(_)), "{p:?}");
    c2.ack(0, tid2);
    match c2.expect() {
        (Tftp::Data(1, d), from) if from == tid2 => {
            assert_same(&d, &file("start4.elf")[..1024], "block 1")
        }
        other => panic!("want DATA 1, got {other:?}"),
    }
    c2.error(0, "Early terminate", tid2);

    // At once the next requests, from the probe's port: answered normally.
    let config = String::from_utf8(c.fetch_ok(&prefixed("config.txt"))).unwrap();
    assert_eq!(
        config,
        format!("# kiln: serial {PI4_SERIAL} mac {PI4_MAC} boots rpi-a\n{RPI_A_CONFIG}")
    );
    for f in [
        "start4.elf",
        "fixup4.dat",
        "bcm2711-rpi-4-b.dtb",
        "vmlinuz",
        "initrd.img",
    ] {
        assert_same(&c.fetch_ok(&prefixed(f)), &file(f), &prefixed(f));
    }
    let cmdline = String::from_utf8(c.fetch_ok(&prefixed("cmdline.txt"))).unwrap();
    assert_eq!(cmdline, expected_cmdline("rpi-a", " quiet"));
    // A file the image lacks.
    let e = c.fetch(&prefixed("recovery.elf")).unwrap_err();
    assert_eq!(e.0, 1, "{e:?}");

    // Without the prefix: the machine is found by its address's MAC.
    assert_same(&c.fetch_ok("start4.elf"), &file("start4.elf"), "start4.elf");
    assert_eq!(
        String::from_utf8(c.fetch_ok("cmdline.txt")).unwrap(),
        expected_cmdline("rpi-a", " quiet")
    );

    // The ended transfers stay silent past two retransmission timeouts (1 s).
    let quiet_until = probe_ended + Duration::from_millis(2500);
    let left = quiet_until.saturating_duration_since(Instant::now());
    let wait = left.max(Duration::from_millis(100));
    assert_eq!(c.recv(wait), None, "a packet after the transfers ended");
    assert_eq!(c2.recv(Duration::from_millis(100)), None);
    let after = stats.snapshot();
    assert_eq!(
        after.transfers_aborted - before.transfers_aborted,
        2,
        "{after:?}"
    );
    assert_eq!(after.transfers_failed, before.transfers_failed, "{after:?}");
    assert_eq!(after.blocks_retransmitted, 0, "{after:?}");
}

/// The Pi 5 (listed by MAC): its own image's files under its serial, read
/// from the image's sdcard.img.
fn pi5_tftp() {
    let c = Client::new();
    let prefixed = |f: &str| format!("{PI5_SERIAL}/{f}");
    let config = String::from_utf8(c.fetch_ok(&prefixed("config.txt"))).unwrap();
    assert_eq!(
        config,
        format!(
            "# kiln: serial {PI5_SERIAL} mac {PI5_MAC} boots rpi-b\n{}",
            sdcard::config_txt()
        )
    );
    let card = card_files("rpi-b");
    for f in [
        "bcm2712-rpi-5-b.dtb",
        RPI_B_OVERLAY,
        "vmlinuz",
        "initrd.img",
    ] {
        assert_same(&c.fetch_ok(&prefixed(f)), &card[f], &prefixed(f));
    }
    assert_eq!(
        String::from_utf8(c.fetch_ok(&prefixed("cmdline.txt"))).unwrap(),
        expected_cmdline("rpi-b", "")
    );
    assert_same(
        &c.fetch_ok("bcm2712-rpi-5-b.dtb"),
        &boot_file("rpi-b", "bcm2712-rpi-5-b.dtb"),
        "bcm2712-rpi-5-b.dtb",
    );
}

/// A Pi outside the inventory: ERROR 2 and no data, with and without its
/// serial prefix.
fn stranger_tftp() {
    let c = Client::new();
    for name in [
        format!("{STRANGER_SERIAL}/start4.elf"),
        format!("{STRANGER_SERIAL}/cmdline.txt"),
        "start4.elf".to_string(),
    ] {
        let e = c.fetch(&name).unwrap_err();
        assert_eq!(e.0, 2, "{name}: {e:?}");
    }
}

#[test]
fn raspberry_pi_4_and_5_boot_replayed_over_the_wire() {
    let test = "raspberry_pi_4_and_5_boot_replayed_over_the_wire";
    if !is_root() {
        eprintln!("SKIP {test}: needs root (network namespaces)");
        return;
    }
    if !have("ip") {
        eprintln!("SKIP {test}: no ip (iproute2)");
        return;
    }
    let started = Instant::now();
    // Make sure the fixture is the documented Pi 4 request.
    let pi4_discover = fixture("rpi4-discover.bin");
    assert_eq!(pi4_discover[28..34], mac_bytes(PI4_MAC));
    let o97 = options(&pi4_discover)
        .into_iter()
        .find(|(c, _)| *c == 97)
        .unwrap()
        .1;
    assert_eq!(&o97[1..5], b"RPi4");
    assert_eq!(
        o97[13..17],
        u32::from_str_radix(PI4_SERIAL, 16).unwrap().to_le_bytes()
    );
    let pi5_discover = pi_discover(PI5_MAC, 0x5005_0001, b"RPi5", PI5_SERIAL);
    let stranger_discover = pi_discover(STRANGER_MAC, 0x0bad_0001, b"RPi4", STRANGER_SERIAL);

    let dir = tempfile::tempdir().unwrap();
    fabricate(dir.path(), "rpi-a", PiBoot::Dir, Some(RPI_A_CONFIG));
    fabricate(dir.path(), "rpi-b", PiBoot::Card, None);
    fabricate(dir.path(), "rpi-default", PiBoot::None, None);
    assert_eq!(
        std::fs::read_dir(dir.path().join("rpi-b"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect::<std::collections::BTreeSet<_>>(),
        ["manifest.json", "sdcard.img"].map(String::from).into(),
        "the Pi 5's image is what kiln build writes, nothing by hand"
    );
    let full = config(dir.path(), true);
    let state = Arc::new(State::open(&full.state).unwrap());

    let mut net = Net::new();
    let pi4 = net.client("p4", PI4_MAC, "169.254.0.4");
    let pi5 = net.client("p5", PI5_MAC, "169.254.0.5");
    let stranger = net.client("st", STRANGER_MAC, "169.254.0.6");

    // ---- full DHCP
    let servers = start(&net.server, full, state.clone());
    let addr = in_ns(&pi4, || pi_dhcp_full(&pi4_discover));
    net.configure(&pi4, addr);
    // The server recorded the Pi's serial and MAC from option 97.
    assert_eq!(
        state.mac_of_serial(PI4_SERIAL).unwrap().as_deref(),
        Some(PI4_MAC)
    );
    in_ns(&pi4, || pi4_tftp(&servers.tftp));

    let addr5 = in_ns(&pi5, || pi_dhcp_full(&pi5_discover));
    assert_ne!(addr5, addr);
    net.configure(&pi5, addr5);
    in_ns(&pi5, pi5_tftp);

    // The stranger (allowlist): an address, no boot options.
    let addr_s = in_ns(&stranger, || {
        let sock = dhcp_socket();
        let offer = exchange(&sock, &stranger_discover, Duration::from_secs(5)).expect("no OFFER");
        let opts = options(&offer);
        for code in [43, 60, 66, 97] {
            assert_eq!(opt(&opts, code), None, "option {code} to a stranger");
        }
        assert_eq!(offer[20..24], [0, 0, 0, 0], "siaddr to a stranger");
        let request = request_for(&stranger_discover, &offer);
        let ack = exchange(&sock, &request, Duration::from_secs(5)).expect("no ACK");
        assert_eq!(opt(&options(&ack), 53), Some(&[5u8][..]));
        Ipv4Addr::new(ack[16], ack[17], ack[18], ack[19])
    });
    net.configure(&stranger, addr_s);
    in_ns(&stranger, stranger_tftp);
    let s = servers.tftp.snapshot();
    assert_eq!(s.transfers_failed, 0, "{s:?}");
    let dhcp = servers.dhcp.clone();
    drop(servers);
    use dhcproto::v4::MessageType;
    assert!(dhcp.sent(MessageType::Offer) >= 3);
    assert!(dhcp.sent(MessageType::Ack) >= 3);

    // ---- proxy DHCP: the same boot options, no address; nothing for the
    // stranger.
    let proxy = config(dir.path(), false);
    let servers = start(&net.server, proxy, state.clone());
    for (ns, discover) in [(&pi4, &pi4_discover), (&pi5, &pi5_discover)] {
        in_ns(ns, || {
            let sock = dhcp_socket();
            let offer = exchange(&sock, discover, Duration::from_secs(5)).expect("no proxy OFFER");
            check_pi_reply(&offer, discover, 2, false);
        });
    }
    in_ns(&stranger, || {
        let sock = dhcp_socket();
        let got = exchange(&sock, &stranger_discover, Duration::from_millis(1500));
        assert_eq!(got, None, "a proxy OFFER to a stranger");
    });
    // TFTP still serves the Pi 5 (found by serial, recorded at DHCP).
    in_ns(&pi5, pi5_tftp);
    drop(servers);
    eprintln!(
        "raspberry pi replay: Pi 4 (by serial), Pi 5 (by MAC) and a stranger, full and proxy DHCP, TFTP: ok in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
