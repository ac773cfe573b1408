//! The TFTP server against real clients (tftp-hpa, atftp, curl) and a raw
//! socket, all on 127.0.0.1 only.
//!
//! Clients come from Debian packages: `apt-get install tftp-hpa atftp curl`.
//! A test whose client is missing prints `SKIP` and passes.
//!
//! The throughput measurement against dnsmasq is `#[ignore]`d:
//! `cargo test --release -p kiln-netboot-server --test tftp_interop -- --ignored --nocapture bench`

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_netboot_server::tftp::{
    Chain, ErrorCode, FileSource, FnSource, Mode, Packet, Request, RootDir, TftpConfig, TftpError,
    TftpFile, TftpServer, TftpStats, VirtualFiles,
};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

// ---------------------------------------------------------------- fixtures

/// Sizes around the block boundaries of 512 and 1468 (and a 16-block window).
const SIZES: &[usize] = &[
    0,
    1,
    511,
    512,
    513,
    1467,
    1468,
    1469,
    1468 * 16,
    1468 * 16 + 1,
    100_000,
];
/// Over 32 MiB: more than 65535 blocks of 512 bytes, so block numbers wrap.
const BIG: usize = 33 * 1024 * 1024 + 1234;

struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    /// A TFTP root with `f<SIZE>` files, a text file, and symlinks that lead out.
    fn new() -> Root {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for &n in SIZES {
            std::fs::write(p.join(format!("f{n}")), prng_bytes(n, n as u64 + 1)).unwrap();
        }
        std::fs::write(p.join("text.txt"), b"one\ntwo\r\nthree\rfour\n\n\r\r\nend").unwrap();
        std::fs::create_dir(p.join("sub")).unwrap();
        std::fs::write(p.join("sub/inner"), b"inner file").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", p.join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc", p.join("escdir")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../../etc/passwd", p.join("relescape"))
            .unwrap();
        Root { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn add_big(&self) -> Vec<u8> {
        let data = prng_bytes(BIG, 42);
        std::fs::write(self.path().join("big"), &data).unwrap();
        data
    }

    fn content(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path().join(name)).unwrap()
    }
}

struct Server {
    addr: SocketAddr,
    stats: Arc<TftpStats>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(source: impl FileSource, config: TftpConfig) -> Server {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = TftpServer::new(socket, Arc::new(source)).with_config(config);
        let addr = server.local_addr().unwrap();
        let stats = server.stats();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Server {
            addr,
            stats,
            stop: Some(tx),
            task,
        }
    }

    async fn root(root: &Root) -> Server {
        Server::start(RootDir::new(root.path()).unwrap(), TftpConfig::default()).await
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }

    /// Waits until no transfer is running (the client may exit before the
    /// server has counted the final ACK).
    async fn idle(&self) {
        let t = Instant::now();
        while self.stats.active.load(Ordering::Relaxed) != 0 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "transfers still active"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// The client's binary, or prints the SKIP line.
fn client(test: &str, bin: &str, package: &str) -> Option<PathBuf> {
    let found = which(bin);
    if found.is_none() {
        println!("SKIP {test}: {bin} not installed (apt-get install {package})");
    }
    found
}

async fn run(cmd: &Path, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(180), child)
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} timed out", cmd.display()))
        .unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "status {}, stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

type Args = Vec<String>;

/// tftp-hpa: `tftp [-m mode] host port -c get remote local` (no options support).
fn tftp_hpa_args(mode: &str, port: &str, remote: &str, local: &str) -> Args {
    ["-m", mode, "127.0.0.1", port, "-c", "get", remote, local]
        .map(String::from)
        .to_vec()
}

fn atftp_args(opts: &[&str], port: &str, remote: &str, local: &str) -> Args {
    let mut a: Args = Vec::new();
    for o in opts {
        a.push("--option".into());
        a.push(o.to_string());
    }
    a.extend(["-g", "-r", remote, "-l", local, "127.0.0.1", port].map(String::from));
    a
}

fn curl_args(opts: &[&str], port: &str, remote: &str, local: &str) -> Args {
    let mut a: Args = ["-sS", "--path-as-is", "-o", local]
        .map(String::from)
        .to_vec();
    a.extend(opts.iter().map(|s| s.to_string()));
    a.push(format!("tftp://127.0.0.1:{port}/{remote}"));
    a
}

fn strs(a: &Args) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------- raw client

struct Raw {
    sock: UdpSocket,
    server: SocketAddr,
}

impl Raw {
    async fn new(server: SocketAddr) -> Raw {
        Raw {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
        }
    }

    async fn send(&self, bytes: &[u8], to: SocketAddr) {
        self.sock.send_to(bytes, to).await.unwrap();
    }

    async fn rrq(&self, name: &str, options: &[(&str, &str)]) {
        let pkt = Packet::Rrq(Request {
            filename: name.into(),
            mode: Mode::Octet,
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
        self.send(&pkt.to_vec(), self.server).await;
    }

    async fn ack(&self, block: u16, to: SocketAddr) {
        self.send(&Packet::Ack { block }.to_vec(), to).await;
    }

    async fn recv(&self, wait: Duration) -> Option<(Packet, SocketAddr)> {
        let mut buf = vec![0u8; 70_000];
        let (n, from) = tokio::time::timeout(wait, self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .unwrap();
        Some((
            Packet::parse(&buf[..n]).expect("server sends valid packets"),
            from,
        ))
    }

    async fn expect(&self) -> (Packet, SocketAddr) {
        self.recv(Duration::from_secs(5)).await.expect("a reply")
    }

    async fn expect_error(&self, code: ErrorCode) -> String {
        match self.expect().await {
            (Packet::Error { code: c, message }, _) if c == code => message,
            other => panic!("want ERROR {code:?}, got {other:?}"),
        }
    }

    async fn expect_data(&self, want: u16) -> (Bytes, SocketAddr) {
        match self.expect().await {
            (Packet::Data { block, data }, from) if block == want => (data, from),
            other => panic!("want DATA {want}, got {other:?}"),
        }
    }

    /// A lock-step download that checks every wire block number, including
    /// the rollover from 65535 to 0.
    async fn fetch(&self, name: &str, options: &[(&str, &str)]) -> Result<Vec<u8>, String> {
        self.rrq(name, options).await;
        let mut blksize = 512usize;
        let mut out = Vec::new();
        let mut expected: u16 = 1;
        let mut tid = None;
        loop {
            let (pkt, from) = self
                .recv(Duration::from_secs(5))
                .await
                .ok_or("no reply in 5 s")?;
            if let Some(t) = tid {
                assert_eq!(from, t, "the server's TID changed");
            }
            tid = Some(from);
            match pkt {
                Packet::Oack { options } => {
                    for (k, v) in options {
                        if k.eq_ignore_ascii_case("blksize") {
                            blksize = v.parse().unwrap();
                        }
                    }
                    self.ack(0, from).await;
                }
                Packet::Data { block, data } => {
                    assert_eq!(block, expected, "block number after {} bytes", out.len());
                    out.extend_from_slice(&data);
                    self.ack(block, from).await;
                    if data.len() < blksize {
                        return Ok(out);
                    }
                    expected = expected.wrapping_add(1);
                }
                Packet::Error { code, message } => return Err(format!("{code:?}: {message}")),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn rt_test() -> TftpConfig {
    TftpConfig {
        max_retries: 2,
        ..TftpConfig::default()
    }
}

// ---------------------------------------------------------------- real clients

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tftp_hpa_fetches_byte_exact() {
    let Some(tftp) = client("tftp_hpa_fetches_byte_exact", "tftp", "tftp-hpa") else {
        return;
    };
    let root = Root::new();
    let server = Server::root(&root).await;
    let out = tempfile::tempdir().unwrap();
    let mut names: Vec<String> = SIZES.iter().map(|n| format!("f{n}")).collect();
    names.push("text.txt".into());
    names.push("sub/inner".into());
    // tftp-hpa's client has no options; its modes are binary and ascii
    // (netascii, which it converts back, so the result is byte-exact too).
    for mode in ["binary", "netascii"] {
        for name in &names {
            let local = out
                .path()
                .join(format!("{mode}-{}", name.replace('/', "_")));
            let local = local.to_str().unwrap();
            let o = run(
                &tftp,
                &strs(&tftp_hpa_args(mode, &server.port(), name, local)),
            )
            .await;
            let got = std::fs::read(local)
                .unwrap_or_else(|e| panic!("{mode} {name}: {e}; {}", describe(&o)));
            assert_same(
                &got,
                &root.content(name),
                &format!("tftp-hpa {mode} {name}"),
            );
        }
    }
    server.idle().await;
    let s = server.stats.snapshot();
    assert_eq!(s.transfers_completed, 2 * names.len() as u64, "{s:?}");
    assert_eq!(s.transfers_failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atftp_fetches_byte_exact_with_options() {
    let Some(atftp) = client("atftp_fetches_byte_exact_with_options", "atftp", "atftp") else {
        return;
    };
    let root = Root::new();
    let server = Server::root(&root).await;
    let out = tempfile::tempdir().unwrap();
    let option_sets: &[&[&str]] = &[
        &[],
        &["tsize enable"],
        &["blksize 1468"],
        &["blksize 1468", "tsize enable"],
        &["blksize 1468", "windowsize 16", "tsize enable"],
        &["blksize 512", "windowsize 4"],
        &["blksize 8", "windowsize 3", "timeout 2"],
        &["blksize 65464", "windowsize 2"],
        &["timeout 1", "tsize enable"],
    ];
    let mut n = 0;
    for (i, opts) in option_sets.iter().enumerate() {
        for &size in SIZES {
            let name = format!("f{size}");
            let local = out.path().join(format!("{i}-{name}"));
            let local = local.to_str().unwrap();
            let o = run(
                &atftp,
                &strs(&atftp_args(opts, &server.port(), &name, local)),
            )
            .await;
            assert!(
                o.status.success(),
                "atftp {opts:?} {name}: {}",
                describe(&o)
            );
            let got = std::fs::read(local).unwrap();
            assert_same(
                &got,
                &root.content(&name),
                &format!("atftp {opts:?} {name}"),
            );
            n += 1;
        }
    }
    server.idle().await;
    let s = server.stats.snapshot();
    assert_eq!(s.transfers_completed, n, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_byte_exact_with_options() {
    let Some(curl) = client("curl_fetches_byte_exact_with_options", "curl", "curl") else {
        return;
    };
    let root = Root::new();
    let server = Server::root(&root).await;
    let out = tempfile::tempdir().unwrap();
    let option_sets: &[&[&str]] = &[
        &[],
        &["--tftp-no-options"],
        &["--tftp-blksize", "1468"],
        &["--tftp-blksize", "65464"],
        &["--tftp-blksize", "8"],
    ];
    let mut n = 0;
    for (i, opts) in option_sets.iter().enumerate() {
        for &size in SIZES {
            if size == 0 && i != 1 {
                // curl 7.88 fails an empty file when it sent options
                // ("getpeername() failed", exit 71), against dnsmasq too.
                continue;
            }
            let name = format!("f{size}");
            let local = out.path().join(format!("{i}-{name}"));
            let local = local.to_str().unwrap();
            let o = run(&curl, &strs(&curl_args(opts, &server.port(), &name, local))).await;
            assert!(o.status.success(), "curl {opts:?} {name}: {}", describe(&o));
            let got = std::fs::read(local).unwrap_or_default();
            assert_same(&got, &root.content(&name), &format!("curl {opts:?} {name}"));
            n += 1;
        }
    }
    // An absolute name is taken relative to the root.
    let local = out.path().join("abs");
    let o = run(
        &curl,
        &strs(&curl_args(
            &[],
            &server.port(),
            "/sub/inner",
            local.to_str().unwrap(),
        )),
    )
    .await;
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(std::fs::read(&local).unwrap(), b"inner file");
    server.idle().await;
    let s = server.stats.snapshot();
    assert_eq!(s.transfers_completed, n + 1, "{s:?}");
}

/// Over 32 MiB at 512-byte blocks: the block number wraps past 65535.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_file_rolls_over_with_every_client() {
    let root = Root::new();
    let big = root.add_big();
    let server = Server::root(&root).await;
    let out = tempfile::tempdir().unwrap();
    let port = server.port();
    let local = |n: &str| out.path().join(n).to_str().unwrap().to_string();

    // The raw client checks each wire number: ..., 65535, 0, 1, ...
    let raw = Raw::new(server.addr).await;
    assert_same(&raw.fetch("big", &[]).await.unwrap(), &big, "raw lock-step");

    let mut runs: Vec<(PathBuf, Args, String)> = Vec::new();
    if let Some(tftp) = client("big_file_rolls_over(tftp-hpa)", "tftp", "tftp-hpa") {
        let l = local("hpa");
        runs.push((tftp, tftp_hpa_args("binary", &port, "big", &l), l));
    }
    if let Some(atftp) = client("big_file_rolls_over(atftp)", "atftp", "atftp") {
        let l = local("atftp");
        runs.push((
            atftp.clone(),
            atftp_args(&["tsize enable"], &port, "big", &l),
            l,
        ));
        let l = local("atftp-w16");
        let opts = ["blksize 512", "windowsize 16"];
        runs.push((atftp, atftp_args(&opts, &port, "big", &l), l));
    }
    if let Some(curl) = client("big_file_rolls_over(curl)", "curl", "curl") {
        let l = local("curl");
        runs.push((
            curl.clone(),
            curl_args(&["--tftp-no-options"], &port, "big", &l),
            l,
        ));
        let l = local("curl-512");
        runs.push((
            curl,
            curl_args(&["--tftp-blksize", "512"], &port, "big", &l),
            l,
        ));
    }
    // All at once: also shows concurrent transfers.
    let outputs = futures_join(runs.iter().map(|(bin, args, _)| {
        let (bin, args) = (bin.clone(), args.clone());
        async move { run(&bin, &strs(&args)).await }
    }))
    .await;
    for ((bin, args, l), o) in runs.iter().zip(outputs) {
        assert!(
            o.status.success(),
            "{} {args:?}: {}",
            bin.display(),
            describe(&o)
        );
        let got = std::fs::read(l).unwrap();
        assert_same(&got, &big, &format!("{} {args:?}", bin.display()));
    }
}

async fn futures_join<F: std::future::Future<Output = Output> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<Output> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

const TRAVERSALS: &[&str] = &[
    "../etc/passwd",
    "../../../../../../../../etc/passwd",
    "/etc/passwd",
    "/../etc/passwd",
    "sub/../../etc/passwd",
    "..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "..\\..\\..\\..\\etc\\passwd",
    "escape",
    "escdir/passwd",
    "relescape",
];

/// Every traversal attempt through every client gets an error and no data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_is_refused_through_every_client() {
    assert!(std::fs::metadata("/etc/passwd").unwrap().len() > 0);
    let root = Root::new();
    let server = Server::root(&root).await;
    let out = tempfile::tempdir().unwrap();
    let port = server.port();
    let mut tried = 0;
    for (bin, package) in [("tftp", "tftp-hpa"), ("atftp", "atftp"), ("curl", "curl")] {
        let Some(path) = client(&format!("traversal_is_refused({bin})"), bin, package) else {
            continue;
        };
        for (i, name) in TRAVERSALS.iter().enumerate() {
            let local = out.path().join(format!("{bin}-{i}"));
            let l = local.to_str().unwrap();
            let args = match bin {
                "tftp" => tftp_hpa_args("binary", &port, name, l),
                "atftp" => atftp_args(&["tsize enable"], &port, name, l),
                _ => curl_args(&[], &port, name, l),
            };
            let o = run(&path, &strs(&args)).await;
            let got = std::fs::read(&local).unwrap_or_default();
            assert!(got.is_empty(), "{bin} {name}: got {} bytes", got.len());
            // tftp-hpa's exit status does not tell errors; it prints them.
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                !o.status.success() || said.to_lowercase().contains("error"),
                "{bin} {name}: no error reported: {}",
                describe(&o)
            );
            tried += 1;
        }
    }
    // Also the raw client, with the codes.
    let raw = Raw::new(server.addr).await;
    for name in TRAVERSALS {
        let err = raw.fetch(name, &[("tsize", "0")]).await.unwrap_err();
        assert!(
            err.starts_with("AccessViolation") || err.starts_with("FileNotFound"),
            "{name}: {err}"
        );
    }
    for name in [
        "../etc/passwd",
        "escape",
        "escdir/passwd",
        "..\\..\\etc\\passwd",
    ] {
        let err = raw.fetch(name, &[]).await.unwrap_err();
        assert!(err.starts_with("AccessViolation"), "{name}: {err}");
    }
    let s = server.stats.snapshot();
    assert_eq!(s.bytes_sent, 0, "{s:?}");
    assert_eq!(s.transfers_started, 0, "{s:?}");
    assert!(s.requests_refused >= tried, "{s:?}");
}

// ---------------------------------------------------------------- protocol

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_are_acknowledged() {
    let root = Root::new();
    let server = Server::root(&root).await;
    let raw = Raw::new(server.addr).await;
    raw.rrq(
        "f100000",
        &[
            ("blksize", "1468"),
            ("tsize", "0"),
            ("windowsize", "16"),
            ("timeout", "2"),
            ("multicast", ""),
        ],
    )
    .await;
    let (p, tid) = raw.expect().await;
    assert_ne!(tid, server.addr, "the transfer has its own port");
    let want: Vec<(String, String)> = [
        ("blksize", "1468"),
        ("tsize", "100000"),
        ("windowsize", "16"),
        ("timeout", "2"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(p, Packet::Oack { options: want });
    raw.send(
        &Packet::Error {
            code: ErrorCode::NotDefined,
            message: "bye".into(),
        }
        .to_vec(),
        tid,
    )
    .await;

    // Huge or invalid values: clamped or left out.
    let raw = Raw::new(server.addr).await;
    raw.rrq(
        "f100000",
        &[
            ("blksize", "999999999999999999999999999999"),
            ("windowsize", "99999999"),
            ("timeout", "0"),
            ("tsize", "lots"),
        ],
    )
    .await;
    let (p, tid) = raw.expect().await;
    let want = vec![("blksize".to_string(), "65464".to_string())];
    assert_eq!(p, Packet::Oack { options: want });
    raw.ack(0, tid).await;
    let (data, _) = raw.expect_data(1).await;
    assert_eq!(data.len(), 65464);
    raw.send(
        &Packet::Error {
            code: ErrorCode::NotDefined,
            message: "bye".into(),
        }
        .to_vec(),
        tid,
    )
    .await;

    // Nothing valid: no OACK, straight to DATA 1.
    let raw = Raw::new(server.addr).await;
    raw.rrq("f1", &[("blksize", "7"), ("foo", "bar")]).await;
    let (data, tid) = raw.expect_data(1).await;
    assert_eq!(data.len(), 1);
    raw.ack(1, tid).await;
    server.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tid_gets_error_5_and_the_transfer_goes_on() {
    let root = Root::new();
    let server = Server::root(&root).await;
    let raw = Raw::new(server.addr).await;
    let stranger = Raw::new(server.addr).await;
    raw.rrq("f1469", &[]).await;
    let (d1, tid) = raw.expect_data(1).await;
    stranger.ack(1, tid).await;
    stranger.expect_error(ErrorCode::UnknownTid).await;
    stranger.send(b"garbage", tid).await;
    stranger.expect_error(ErrorCode::UnknownTid).await;
    // The stranger's ACK moved nothing: the client still gets block 2 after its own ACK.
    raw.ack(1, tid).await;
    let (d2, _) = raw.expect_data(2).await;
    raw.ack(2, tid).await;
    let (d3, _) = raw.expect_data(3).await;
    raw.ack(3, tid).await;
    assert_same(&[d1, d2, d3].concat(), &root.content("f1469"), "f1469");
    server.idle().await;
    assert_eq!(server.stats.snapshot().transfers_completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_error_ends_the_transfer_at_once() {
    let root = Root::new();
    let server = Server::root(&root).await;
    let raw = Raw::new(server.addr).await;
    // The Raspberry Pi way: ask for tsize, then end with an ERROR.
    raw.rrq("f100000", &[("tsize", "0")]).await;
    let (p, tid) = raw.expect().await;
    assert!(matches!(p, Packet::Oack { .. }), "{p:?}");
    let err = Packet::Error {
        code: ErrorCode::NotDefined,
        message: "early terminate".into(),
    };
    raw.send(&err.to_vec(), tid).await;
    // No retransmission of the OACK, nothing at all (the timeout is 1 s).
    assert_eq!(raw.recv(Duration::from_millis(2500)).await, None);
    server.idle().await;
    let s = server.stats.snapshot();
    assert_eq!(
        (s.transfers_aborted, s.transfers_failed, s.bytes_sent),
        (1, 0, 0),
        "{s:?}"
    );

    // Mid-transfer too.
    raw.rrq("f100000", &[]).await;
    let (_, tid) = raw.expect_data(1).await;
    raw.ack(1, tid).await;
    raw.expect_data(2).await;
    raw.send(&err.to_vec(), tid).await;
    assert_eq!(raw.recv(Duration::from_millis(2500)).await, None);
    server.idle().await;
    assert_eq!(server.stats.snapshot().transfers_aborted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmits_on_timeout_then_gives_up() {
    let root = Root::new();
    let server = Server::start(RootDir::new(root.path()).unwrap(), rt_test()).await;
    let raw = Raw::new(server.addr).await;
    raw.rrq("f513", &[("timeout", "1")]).await;
    let (_, tid) = raw.expect().await;
    raw.ack(0, tid).await;
    let t = Instant::now();
    // The first DATA 1 and two resends (max_retries 2), then silence.
    for _ in 0..3 {
        raw.expect_data(1).await;
    }
    assert!(
        t.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(raw.recv(Duration::from_millis(1500)).await, None);
    server.idle().await;
    let s = server.stats.snapshot();
    assert_eq!(
        (s.transfers_failed, s.blocks_retransmitted),
        (1, 2),
        "{s:?}"
    );

    // A lost ACK is recovered: DATA 1 comes again, the client ACKs it late.
    raw.rrq("f513", &[]).await;
    let (_, tid) = raw.expect_data(1).await;
    let (_, tid2) = raw.expect_data(1).await;
    assert_eq!(tid, tid2);
    raw.ack(1, tid).await;
    raw.expect_data(2).await;
    raw.ack(2, tid).await;
    server.idle().await;
    assert_eq!(server.stats.snapshot().transfers_completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_acks_do_not_cause_resends() {
    let root = Root::new();
    let server = Server::root(&root).await;
    let raw = Raw::new(server.addr).await;
    // A 3 s timeout, so that no retransmission comes during the check.
    raw.rrq("f1469", &[("timeout", "3")]).await;
    let (p, tid) = raw.expect().await;
    assert!(matches!(p, Packet::Oack { .. }), "{p:?}");
    raw.ack(0, tid).await;
    raw.expect_data(1).await;
    raw.ack(0, tid).await;
    raw.ack(1, tid).await;
    raw.ack(1, tid).await;
    raw.ack(1, tid).await;
    raw.expect_data(2).await;
    // One DATA 2 only (Sorcerer's Apprentice), until the timeout.
    assert_eq!(raw.recv(Duration::from_millis(1000)).await, None);
    raw.ack(2, tid).await;
    raw.expect_data(3).await;
    raw.ack(3, tid).await;
    server.idle().await;
    let s = server.stats.snapshot();
    assert_eq!(
        (s.transfers_completed, s.blocks_retransmitted),
        (1, 0),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_resends_from_the_block_after_an_early_ack() {
    let root = Root::new();
    let server = Server::root(&root).await;
    let raw = Raw::new(server.addr).await;
    // Blocks of 300: four full ones and a last of 268.
    let want = root.content("f1468");
    raw.rrq("f1468", &[("windowsize", "4"), ("blksize", "300")])
        .await;
    let (p, tid) = raw.expect().await;
    assert!(matches!(p, Packet::Oack { .. }));
    raw.ack(0, tid).await;
    for b in 1..=4 {
        raw.expect_data(b).await;
    }
    // "Block 3 got lost": ACK 2, the server goes on from 3.
    raw.ack(2, tid).await;
    let mut got = Vec::new();
    for b in 3..=5u16 {
        let (d, _) = raw.expect_data(b).await;
        got.push(d);
    }
    assert_eq!(got.concat(), want[600..]);
    // 1468 = 4 * 300 + 268: block 5 is the last; ACK it.
    raw.ack(5, tid).await;
    assert_eq!(raw.recv(Duration::from_millis(300)).await, None);
    server.idle().await;
    let s = server.stats.snapshot();
    assert_eq!(
        (s.transfers_completed, s.blocks_retransmitted),
        (1, 2),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_refused() {
    let root = Root::new();
    let server = Server::root(&root).await;
    let raw = Raw::new(server.addr).await;
    let wrq = Packet::Wrq(Request {
        filename: "new".into(),
        mode: Mode::Octet,
        options: vec![],
    });
    raw.send(&wrq.to_vec(), server.addr).await;
    let msg = raw.expect_error(ErrorCode::AccessViolation).await;
    assert!(msg.contains("access violation"), "{msg}");
    assert!(!root.path().join("new").exists());
    if let Some(curl) = client("writes_are_refused(curl)", "curl", "curl") {
        let src = root.path().join("f512");
        let url = format!("tftp://127.0.0.1:{}/upload", server.port());
        let o = run(&curl, &["-sS", "-T", src.to_str().unwrap(), &url]).await;
        assert!(!o.status.success(), "{}", describe(&o));
        assert!(!root.path().join("upload").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_and_per_client_files() {
    let root = Root::new();
    let virt = Arc::new(VirtualFiles::new());
    virt.insert("ipxe.efi", Bytes::from(prng_bytes(70_000, 9)))
        .unwrap();
    virt.insert("f512", Bytes::from_static(b"shadowed"))
        .unwrap();
    let per_client = FnSource(|client: SocketAddr, path: &str| {
        // A later change serves Raspberry Pi files under <serial>/.
        if path == "whoami" {
            Ok(TftpFile::Memory(Bytes::from(client.ip().to_string())))
        } else {
            Err(TftpError::not_found("file not found"))
        }
    });
    let chain = Chain::new()
        .then(per_client)
        .then(virt.clone())
        .then(RootDir::new(root.path()).unwrap());
    let server = Server::start(chain, TftpConfig::default()).await;
    let raw = Raw::new(server.addr).await;
    assert_eq!(raw.fetch("/whoami", &[]).await.unwrap(), b"127.0.0.1");
    assert_same(
        &raw.fetch("ipxe.efi", &[("blksize", "1468"), ("tsize", "0")])
            .await
            .unwrap(),
        &prng_bytes(70_000, 9),
        "virtual",
    );
    assert_eq!(raw.fetch("f512", &[]).await.unwrap(), b"shadowed");
    assert_same(
        &raw.fetch("f513", &[]).await.unwrap(),
        &root.content("f513"),
        "disk",
    );
    virt.remove("f512");
    assert_same(
        &raw.fetch("f512", &[]).await.unwrap(),
        &root.content("f512"),
        "disk",
    );
    // Netascii of an in-memory file: tsize is the converted size.
    virt.insert("t", Bytes::from_static(b"a\nb")).unwrap();
    let nraw = Raw::new(server.addr).await;
    let pkt = Packet::Rrq(Request {
        filename: "t".into(),
        mode: Mode::Netascii,
        options: vec![("tsize".into(), "0".into())],
    });
    nraw.send(&pkt.to_vec(), server.addr).await;
    let (p, tid) = nraw.expect().await;
    assert_eq!(
        p,
        Packet::Oack {
            options: vec![("tsize".into(), "4".into())]
        }
    );
    nraw.ack(0, tid).await;
    let (d, _) = nraw.expect_data(1).await;
    assert_eq!(&d[..], b"a\r\nb");
    nraw.ack(1, tid).await;
    server.idle().await;
    // Six downloads, the first five one after the other from one port: each
    // final ACK was counted although the next request came right after it.
    let s = server.stats.snapshot();
    assert_eq!(
        (s.transfers_completed, s.transfers_aborted),
        (6, 0),
        "{s:?}"
    );
}

/// Requests from one address and port while a transfer for it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_requests_from_one_port() {
    let root = Root::new();
    let server = Server::root(&root).await;
    let bye = |code| {
        Packet::Error {
            code,
            message: "bye".into(),
        }
        .to_vec()
    };

    // Raspberry Pi style: tsize probe, ERROR, the same request again at
    // once. The new request is answered at once, not after a timeout.
    let pi = Raw::new(server.addr).await;
    pi.rrq("f100000", &[("tsize", "0"), ("blksize", "1468")])
        .await;
    let (p, tid) = pi.expect().await;
    assert!(matches!(p, Packet::Oack { .. }), "{p:?}");
    pi.send(&bye(ErrorCode::NotDefined), tid).await;
    pi.rrq("f100000", &[("tsize", "0"), ("blksize", "1468")])
        .await;
    let (p, tid2) = pi
        .recv(Duration::from_millis(800))
        .await
        .expect("an answer at once");
    assert!(matches!(p, Packet::Oack { .. }), "{p:?}");
    assert_ne!(tid, tid2);
    pi.send(&bye(ErrorCode::NotDefined), tid2).await;
    server.idle().await;

    // A retransmitted request gets a second transfer; the client keeps the
    // first and ends the other with ERROR 5, as tftp-hpa's client does.
    let c = Raw::new(server.addr).await;
    c.rrq("f1469", &[]).await;
    c.rrq("f1469", &[]).await;
    let (_, t1) = c.expect_data(1).await;
    let (_, t2) = c.expect_data(1).await;
    assert_ne!(t1, t2);
    c.send(&bye(ErrorCode::UnknownTid), t2).await;
    let mut data = Vec::new();
    let mut block = 1u16;
    let mut tid = t1;
    loop {
        c.ack(block, tid).await;
        block += 1;
        let (d, from) = c.expect_data(block).await;
        tid = from;
        assert_eq!(from, t1);
        data.extend_from_slice(&d);
        if d.len() < 512 {
            c.ack(block, tid).await;
            break;
        }
    }
    assert_eq!(data, root.content("f1469")[512..]);
    server.idle().await;
    let s = server.stats.snapshot();
    assert_eq!(s.transfers_completed, 1, "{s:?}");
    assert_eq!(s.transfers_aborted, 3, "{s:?}");

    // A flood of one request from one socket: a few transfers, not one each.
    let flood = Raw::new(server.addr).await;
    for _ in 0..300 {
        flood.rrq("f100000", &[]).await;
    }
    let mut tids = std::collections::HashSet::new();
    while let Some((p, from)) = flood.recv(Duration::from_millis(600)).await {
        assert!(matches!(p, Packet::Data { block: 1, .. }), "{p:?}");
        tids.insert(from);
    }
    assert_eq!(tids.len(), 4, "{tids:?}");
    assert_eq!(server.stats.active.load(Ordering::Relaxed), 4);
    for t in tids {
        flood.send(&bye(ErrorCode::UnknownTid), t).await;
    }
    server.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_limit_answers_busy() {
    let root = Root::new();
    let config = TftpConfig {
        max_transfers: 2,
        ..TftpConfig::default()
    };
    let server = Server::start(RootDir::new(root.path()).unwrap(), config).await;
    let a = Raw::new(server.addr).await;
    let b = Raw::new(server.addr).await;
    let c = Raw::new(server.addr).await;
    a.rrq("f100000", &[]).await;
    let (_, ta) = a.expect_data(1).await;
    b.rrq("f100000", &[]).await;
    let (_, tb) = b.expect_data(1).await;
    c.rrq("f100000", &[]).await;
    let msg = c.expect_error(ErrorCode::NotDefined).await;
    assert!(msg.contains("busy"), "{msg}");
    let bye = Packet::Error {
        code: ErrorCode::NotDefined,
        message: "bye".into(),
    }
    .to_vec();
    a.send(&bye, ta).await;
    b.send(&bye, tb).await;
    server.idle().await;
    assert_same(
        &c.fetch("f100000", &[]).await.unwrap(),
        &root.content("f100000"),
        "after busy",
    );
}

/// Malformed datagrams and a flood of requests; the server answers what
/// deserves an answer, keeps serving, and a normal download works after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_and_floods_do_not_stop_the_server() {
    let root = Root::new();
    let server = Server::start(RootDir::new(root.path()).unwrap(), rt_test()).await;
    let raw = Raw::new(server.addr).await;
    let to = server.addr;
    let illegal: &[&[u8]] = &[
        b"",
        b"\x00",
        b"\x00\x00",
        b"\x00\x09junk",
        b"\xff\xff\xff\xff",
        b"\x00\x01f512",
        b"\x00\x01f512\x00octet",
        b"\x00\x01\x00octet\x00",
        b"\x00\x01f512\x00binary\x00",
        b"\x00\x01f512\x00mail\x00",
        b"\x00\x02",
        b"\x00\x04\x00",
    ];
    for pkt in illegal {
        raw.send(pkt, to).await;
        raw.expect_error(ErrorCode::IllegalOperation).await;
    }
    raw.send(&vec![0x55u8; 65_000], to).await;
    raw.expect_error(ErrorCode::IllegalOperation).await;
    raw.send(b"\x00\x01\xff\xfe\x00octet\x00", to).await;
    raw.expect_error(ErrorCode::FileNotFound).await;
    raw.send(b"\x00\x04\x00\x01", to).await; // ACK to the listening port
    raw.expect_error(ErrorCode::UnknownTid).await;
    raw.send(b"\x00\x03\x00\x01abc", to).await; // DATA to the listening port
    raw.expect_error(ErrorCode::UnknownTid).await;
    raw.send(b"\x00\x05\x00\x00x\x00", to).await; // ERROR: never answered
    raw.send(b"\x00\x05", to).await;
    assert_eq!(raw.recv(Duration::from_millis(300)).await, None);

    // A request with absurd options and a long file name.
    let long = "a/".repeat(30_000);
    raw.rrq(&long, &[]).await;
    raw.expect_error(ErrorCode::FileNotFound).await;
    let mut opts = vec![];
    let big = "9".repeat(5000);
    for name in ["blksize", "windowsize", "timeout", "tsize", "BLKSIZE", "x"] {
        opts.push((name, big.as_str()));
    }
    raw.rrq("f512", &opts).await;
    let (p, tid) = raw.expect().await;
    assert_eq!(
        p,
        Packet::Oack {
            // Clamped, and the real size whatever the client's tsize says;
            // windowsize and timeout out of range are left out.
            options: vec![
                ("blksize".into(), "65464".into()),
                ("tsize".into(), "512".into())
            ]
        }
    );
    raw.send(
        &Packet::Error {
            code: ErrorCode::NotDefined,
            message: "bye".into(),
        }
        .to_vec(),
        tid,
    )
    .await;

    // The flood: 2000 datagrams from one socket (requests for a real file,
    // for a missing one, garbage), and 64 sockets asking for a missing file.
    let flood = Raw::new(server.addr).await;
    let t = Instant::now();
    for i in 0..2000u32 {
        let pkt: Vec<u8> = match i % 4 {
            0 => Packet::Rrq(Request {
                filename: "f100000".into(),
                mode: Mode::Octet,
                options: vec![],
            })
            .to_vec(),
            1 => Packet::Rrq(Request {
                filename: format!("missing{i}"),
                mode: Mode::Octet,
                options: vec![("tsize".into(), "0".into())],
            })
            .to_vec(),
            2 => prng_bytes((i as usize * 37) % 600, i as u64),
            _ => b"\x00\x01no-terminator".to_vec(),
        };
        flood.send(&pkt, to).await;
        if i % 200 == 199 {
            tokio::task::yield_now().await;
        }
    }
    let mut others = Vec::new();
    for i in 0..64 {
        let r = Raw::new(server.addr).await;
        r.rrq(&format!("missing-{i}"), &[]).await;
        others.push(r);
    }
    for (i, r) in others.iter().enumerate() {
        // Like a real client, ask again if the request was lost (the
        // server's socket buffer overflows during the flood).
        let mut tries = 0;
        let reply = loop {
            if let Some(reply) = r.recv(Duration::from_secs(2)).await {
                break reply;
            }
            tries += 1;
            assert!(tries < 5, "no answer to missing-{i}");
            r.rrq(&format!("missing-{i}"), &[]).await;
        };
        assert!(
            matches!(
                reply.0,
                Packet::Error {
                    code: ErrorCode::FileNotFound,
                    ..
                }
            ),
            "{reply:?}"
        );
    }
    println!("flood sent in {:?}", t.elapsed());

    // Still serving, at once.
    let fresh = Raw::new(server.addr).await;
    let t = Instant::now();
    assert_same(
        &fresh.fetch("f100000", &[]).await.unwrap(),
        &root.content("f100000"),
        "after flood",
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "download took {:?}",
        t.elapsed()
    );
    if let Some(curl) = client("malformed_packets_and_floods(curl)", "curl", "curl") {
        let out = tempfile::tempdir().unwrap();
        let l = out.path().join("x");
        let o = run(
            &curl,
            &strs(&curl_args(
                &["--tftp-blksize", "1468"],
                &server.port(),
                "f100000",
                l.to_str().unwrap(),
            )),
        )
        .await;
        assert!(o.status.success(), "{}", describe(&o));
        assert_same(
            &std::fs::read(&l).unwrap(),
            &root.content("f100000"),
            "curl after flood",
        );
    }
    let s = server.stats.snapshot();
    println!("after the flood: {s:?}");
    // About 1000 of the flood are malformed; UDP may drop some under load.
    assert!(s.malformed_packets >= 50, "{s:?}");
    assert!(s.transfers_completed >= 1, "{s:?}");
    // The flood socket's transfers of f100000 (at most 4 unanswered ones
    // for its port) time out; nothing else is left running.
    server.idle().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_running_transfers() {
    let root = Root::new();
    let server = Server::root(&root).await;
    let raw = Raw::new(server.addr).await;
    raw.rrq("f100000", &[]).await;
    let (_, _tid) = raw.expect_data(1).await;
    let stats = server.stats.clone();
    server.shutdown().await;
    // The client is told.
    loop {
        match raw.expect().await {
            (Packet::Data { block: 1, .. }, _) => continue,
            (Packet::Error { code, message }, _) => {
                assert_eq!(code, ErrorCode::NotDefined);
                assert!(message.contains("shutting down"), "{message}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(stats.snapshot().transfers_failed, 1);
}

// ---------------------------------------------------------------- measurement

/// 64 MiB to atftp at blksize 1468: windowsize 16 and lock-step, against
/// dnsmasq's TFTP (lock-step; it has no windowsize). Prints the figures.
/// dnsmasq listens on 127.0.0.1:69 only (it has no TFTP port option).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture, in release"]
async fn bench_atftp_64mib_vs_dnsmasq() {
    let Some(atftp) = client("bench", "atftp", "atftp") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tftproot = dir.path().join("root");
    std::fs::create_dir(&tftproot).unwrap();
    const SIZE: usize = 64 << 20;
    let data = prng_bytes(SIZE, 64);
    std::fs::write(tftproot.join("big"), &data).unwrap();
    let out = dir.path().join("out");
    let l = out.to_str().unwrap();
    // BENCH_CLIENT_CPU=N runs atftp on that CPU only (with `taskset -c`
    // on the test too, e.g. server on CPU 0 and client on CPU 1).
    let client_cpu = std::env::var("BENCH_CLIENT_CPU").ok();
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);

    let time = |port: String, opts: Vec<&'static str>| {
        let atftp = atftp.clone();
        let data = &data;
        let client_cpu = client_cpu.clone();
        async move {
            let mut best = f64::MAX;
            for _ in 0..runs {
                let _ = std::fs::remove_file(l);
                let t = Instant::now();
                let args = atftp_args(&opts, &port, "big", l);
                let o = match &client_cpu {
                    // taskset -c CPU atftp ...
                    Some(cpu) => {
                        let mut a =
                            vec!["-c".to_string(), cpu.clone(), atftp.display().to_string()];
                        a.extend(args);
                        run(Path::new("taskset"), &strs(&a)).await
                    }
                    None => run(&atftp, &strs(&args)).await,
                };
                let secs = t.elapsed().as_secs_f64();
                assert!(o.status.success(), "{opts:?}: {}", describe(&o));
                assert_same(&std::fs::read(l).unwrap(), data, "bench");
                best = best.min(secs);
            }
            best
        }
    };
    let report = |what: &str, secs: f64| {
        println!(
            "BENCH {what}: {secs:.3} s, {:.1} MB/s (best of {runs})",
            SIZE as f64 / secs / 1e6
        );
    };

    // BENCH_CASES picks some of: w16, w1, dnsmasq (default: all).
    let cases = std::env::var("BENCH_CASES").unwrap_or_else(|_| "w16,w1,dnsmasq".into());
    let server = Server::start(RootDir::new(&tftproot).unwrap(), TftpConfig::default()).await;
    let mut w16 = f64::NAN;
    if cases.contains("w16") {
        let opts = vec!["blksize 1468", "windowsize 16", "tsize enable"];
        w16 = time(server.port(), opts).await;
        report("kiln windowsize 16", w16);
    }
    let mut w1 = f64::NAN;
    if cases.contains("w1,") || cases.ends_with("w1") {
        w1 = time(server.port(), vec!["blksize 1468", "tsize enable"]).await;
        report("kiln lock-step", w1);
    }
    server.shutdown().await;
    if !cases.contains("dnsmasq") {
        return;
    }

    let Some(dnsmasq) = client("bench(dnsmasq)", "dnsmasq", "dnsmasq-base") else {
        return;
    };
    // dnsmasq drops privileges; let it read the file.
    use std::os::unix::fs::PermissionsExt;
    for p in [dir.path(), tftproot.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(tftproot.join("big"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let pid = dir.path().join("dnsmasq.pid");
    let mut child = tokio::process::Command::new(dnsmasq)
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--port=0",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--enable-tftp",
            &format!("--tftp-root={}", tftproot.display()),
            &format!("--pid-file={}", pid.display()),
            "--log-facility=-",
        ])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Ok(Some(status)) = child.try_wait() {
        let out = child.wait_with_output().await.unwrap();
        println!(
            "SKIP bench(dnsmasq): dnsmasq exited ({status}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let d = time("69".into(), vec!["blksize 1468", "tsize enable"]).await;
    report("dnsmasq lock-step", d);
    child.kill().await.unwrap();
    println!(
        "BENCH ratios: windowsize 16 / dnsmasq = {:.1}x, lock-step / dnsmasq = {:.2}x",
        d / w16,
        d / w1
    );
}
