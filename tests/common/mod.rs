//! Test support shared by kiln's integration tests: a loopback HTTP server, a
//! local k3s release layout with the stand-in k3s, builds through the real
//! `kiln` binary, and QEMU boots with the serial console captured.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const K3S_VERSION: &str = "v1.33.5+k3s1";

/// The stages of a normal boot, in order.
pub const BOOT_STAGES: &[&str] = &[
    "initramfs",
    "network",
    "rootfs",
    "config",
    "k3s-started",
    "k3s-ready",
];

/// Fetches (and verifies) the iPXE binaries into the shared cache, so that
/// `kiln serve` in a namespace with no route out can start offline.
pub fn prefetch_ipxe() {
    let fetcher =
        kiln_builder::fetch::Fetcher::new(kiln_builder::cache::Cache::new(shared_cache()), false)
            .unwrap();
    kiln_netboot_server::ipxe::fetch(
        &fetcher,
        kiln_netboot_server::serve::IPXE_SUITE,
        Path::new(kiln_builder::spec::DEFAULT_KEYRING),
    )
    .expect("fetching iPXE from Debian");
}

/// The workspace root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// True when `prog` is on PATH.
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {prog}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Prints a clear skip line (CI installs everything, so it runs there).
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIP {test}: {why}");
}

pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A download cache kept across test runs (in target/), so only the first run
/// fetches packages.
pub fn shared_cache() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kiln-cache");
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// A tiny HTTP/1.1 server on 127.0.0.1 serving a directory (GET, HEAD) and
/// recording POST and PUT bodies by path (answered 204, or with the status
/// and body set for that path in `answers`). Paths are percent-decoded, as a real web
/// server does for `%2B` in k3s tags.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub root: PathBuf,
    pub posts: Arc<Mutex<Vec<(String, String)>>>,
    /// Answers to POSTs by path: (status, body).
    pub answers: Arc<Mutex<BTreeMap<String, (u16, String)>>>,
}

impl HttpServer {
    pub fn start(root: &Path) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let posts = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(BTreeMap::new()));
        let (r, p, a) = (root.to_path_buf(), posts.clone(), answers.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (r, p, a) = (r.clone(), p.clone(), a.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &r, &p, &a);
                });
            }
        });
        HttpServer {
            addr,
            root: root.to_path_buf(),
            posts,
            answers,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// The URL a QEMU user-mode guest uses for the same path (10.0.2.2 is the
    /// host's loopback as seen from the guest).
    pub fn guest_url(&self, path: &str) -> String {
        format!(
            "http://10.0.2.2:{}/{}",
            self.addr.port(),
            path.trim_start_matches('/')
        )
    }
}

fn decode(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&p[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(
    conn: TcpStream,
    root: &Path,
    posts: &Mutex<Vec<(String, String)>>,
    answers: &Mutex<BTreeMap<String, (u16, String)>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("/").to_string(),
        );
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let path = decode(target.split('?').next().unwrap_or("/"));
        let close = headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || line.contains("HTTP/1.0");
        // EC2-style metadata: GETs carrying an IMDSv2 token are recorded
        // too, as (path, "token=<token>").
        if let Some(t) = headers.get("x-aws-ec2-metadata-token") {
            posts
                .lock()
                .unwrap()
                .push((path.clone(), format!("token={t}")));
        }
        if method == "POST" || method == "PUT" {
            let len: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body)?;
            let answer = answers.lock().unwrap().get(&path).cloned();
            posts
                .lock()
                .unwrap()
                .push((path, String::from_utf8_lossy(&body).into_owned()));
            match answer {
                Some((status, body)) => write!(
                    out,
                    "HTTP/1.1 {status} Kiln Test\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                    body.len()
                )?,
                None => write!(out, "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")?,
            }
        } else {
            let file = root.join(path.trim_start_matches('/'));
            let ok = !path.contains("..") && file.is_file();
            if ok {
                let mut f = std::fs::File::open(&file)?;
                let len = f.metadata()?.len();
                write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\n\r\n")?;
                if method != "HEAD" {
                    std::io::copy(&mut f, &mut out)?;
                }
            } else {
                write!(out, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            }
        }
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// Lays a k3s release layout (`download/<tag>/k3s`, `k3s-arm64`, a small
/// stand-in `k3s-airgap-images-<arch>.tar.zst` each, and their sha256sum
/// files) holding the stand-in k3s under `<dir>/releases`.
/// Returns the base URL path ("releases").
pub fn k3s_release_layout(dir: &Path) -> &'static str {
    let rel = dir.join("releases/download").join(K3S_VERSION);
    std::fs::create_dir_all(&rel).unwrap();
    let standin = std::fs::read(repo().join("tests/fixtures/k3s-standin")).unwrap();
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(&standin));
    for (asset, sums, airgap) in [
        (
            "k3s",
            "sha256sum-amd64.txt",
            "k3s-airgap-images-amd64.tar.zst",
        ),
        (
            "k3s-arm64",
            "sha256sum-arm64.txt",
            "k3s-airgap-images-arm64.tar.zst",
        ),
    ] {
        std::fs::write(rel.join(asset), &standin).unwrap();
        let images = format!("stand-in {airgap}\n");
        std::fs::write(rel.join(airgap), &images).unwrap();
        let images_sha = hex::encode(sha2::Sha256::digest(&images));
        std::fs::write(
            rel.join(sums),
            format!("{images_sha}  {airgap}\n{sha}  {asset}\n"),
        )
        .unwrap();
    }
    "releases"
}

/// Makes `www`, lays the k3s release layout in it and serves it on
/// loopback (the tests' `KILN_K3S_URL`).
pub fn release_server(www: &Path) -> HttpServer {
    std::fs::create_dir_all(www).unwrap();
    k3s_release_layout(www);
    HttpServer::start(www)
}

/// Runs `kiln` with arguments and environment; returns (success, stdout, stderr).
pub fn kiln(args: &[&str], env: &[(&str, String)]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args).current_dir(repo());
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs a command that must succeed; returns its stdout and stderr.
pub fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{cmd:?} failed:\n{out}");
    out
}

/// A copy of `from` at `to`, grown (sparse) to `len` bytes: an image on a
/// larger disk or card.
pub fn grown_copy(from: &Path, to: &Path, len: u64) {
    std::fs::copy(from, to).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(to)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Reads manifest.json of an image directory.
pub fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

pub fn artifact_sha(m: &serde_json::Value, name: &str) -> String {
    m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A QEMU guest whose serial console is collected line by line.
pub struct Guest {
    child: Child,
    console: Arc<Mutex<String>>,
}

impl Guest {
    pub fn start(mut cmd: Command) -> Guest {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting qemu");
        let console = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let c = console.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream);
                let mut buf = Vec::new();
                while let Ok(n) = r.read_until(b'\n', &mut buf) {
                    if n == 0 {
                        break;
                    }
                    let line = String::from_utf8_lossy(&buf).replace('\r', "");
                    if std::env::var_os("KILN_TEST_CONSOLE").is_some() {
                        eprint!("guest| {line}");
                    }
                    c.lock().unwrap().push_str(&line);
                    buf.clear();
                }
            });
        }
        Guest { child, console }
    }

    pub fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// Waits until the console holds `needle`; panics with the console on timeout.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.console().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "qemu exited ({status}) before {needle:?}; console:\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "no {needle:?} on the console within {timeout:?}; console:\n{}",
            self.console()
        );
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text between two marker lines of the console.
pub fn between(console: &str, begin: &str, end: &str) -> String {
    let start = console.find(begin).map(|i| i + begin.len()).unwrap_or(0);
    let rest = &console[start..];
    let stop = rest.find(end).unwrap_or(rest.len());
    rest[..stop].trim_start_matches('\n').to_string()
}

/// `qemu-system-*` with -kernel/-initrd and a user-mode NIC; `append` is the
/// kernel command line (the console= parameter is added here).
pub fn qemu_direct(arch: &str, image: &Path, append: &str) -> Command {
    let (bin, console, machine): (&str, &str, &[&str]) = match arch {
        "x86_64" => (
            "qemu-system-x86_64",
            "ttyS0",
            &["-machine", "q35", "-cpu", "max"],
        ),
        "aarch64" => (
            "qemu-system-aarch64",
            "ttyAMA0",
            &["-machine", "virt", "-cpu", "cortex-a72"],
        ),
        other => panic!("no qemu for {other}"),
    };
    let mut c = Command::new(bin);
    c.args(machine)
        .args([
            "-m",
            "1024",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
            "-accel",
            "tcg",
        ])
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initrd.img"))
        .arg("-append")
        .arg(format!("console={console} panic=-1 {append}"))
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ]);
    c
}

/// Builds `images/pxe-<arch>.toml` into `out` with the shared cache and the
/// test's k3s release layout; panics with kiln's output on failure.
pub fn build_pxe(arch: &str, out: &Path, server: &HttpServer, extra: &[(&str, String)]) -> PathBuf {
    build_spec(
        &format!("images/pxe-{arch}.toml"),
        &format!("pxe-{arch}"),
        out,
        server,
        extra,
    )
}

/// Builds the spec at `spec` (relative to the repository, or absolute),
/// whose name is `name`, with the k3s releases of `server`; returns the image
/// directory.
pub fn build_spec(
    spec: &str,
    name: &str,
    out: &Path,
    server: &HttpServer,
    extra: &[(&str, String)],
) -> PathBuf {
    let mut env = vec![
        ("KILN_CACHE", shared_cache().display().to_string()),
        ("KILN_K3S_URL", server.url("releases")),
    ];
    env.extend(extra.iter().cloned());
    let (ok, stdout, stderr) = kiln(&["build", spec, "--out", out.to_str().unwrap()], &env);
    assert!(ok, "kiln build {spec} failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    out.join(name)
}

/// Copies an image's rootfs.squashfs to `img-<arch>/` of the server's root.
fn serve_root(arch: &str, image: &Path, server: &HttpServer) -> PathBuf {
    let served = server.root.join(format!("img-{arch}"));
    std::fs::create_dir_all(&served).unwrap();
    std::fs::copy(
        image.join("rootfs.squashfs"),
        served.join("rootfs.squashfs"),
    )
    .unwrap();
    served
}

/// Boots a PXE image directly (-kernel/-initrd) with its root and node config
/// served by `server`, and checks everything the boot protocol promises.
pub fn boot_and_check(
    arch: &str,
    image: &Path,
    server: &HttpServer,
    node_yaml: &str,
    expect_role: &str,
) {
    let m = manifest(image);
    let rootfs_sha = artifact_sha(&m, "rootfs.squashfs");
    let served = serve_root(arch, image, server);
    std::fs::write(served.join("node.yaml"), node_yaml).unwrap();
    let append = format!(
        "kiln.root={} kiln.root_sha256={rootfs_sha} kiln.config={} kiln.server={}",
        server.guest_url(&format!("img-{arch}/rootfs.squashfs")),
        server.guest_url(&format!("img-{arch}/node.yaml")),
        server.guest_url(&format!("report-{arch}")),
    );
    let mut guest = Guest::start(qemu_direct(arch, image, &append));
    guest.wait_for("k3s-standin: config-end", Duration::from_secs(300));
    guest.wait_for("kiln: stage=k3s-ready\n", Duration::from_secs(120));
    let console = guest.console();
    // The last stage is reported once k3s is ready: give it a moment to arrive.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30)
        && !server
            .posts
            .lock()
            .unwrap()
            .iter()
            .any(|(p, b)| p.contains(arch) && b.ends_with("stage=k3s-ready"))
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(guest);

    // Stages, in order.
    let mut at = 0;
    for stage in BOOT_STAGES {
        let needle = format!("kiln: stage={stage}\n");
        let i = console[at..]
            .find(&needle)
            .unwrap_or_else(|| panic!("no {needle:?} after byte {at}:\n{console}"));
        at += i + needle.len();
    }
    // The stand-in k3s got exactly the k3s map of the node config.
    let config = between(
        &console,
        "k3s-standin: config-begin\n",
        "k3s-standin: config-end",
    );
    let expected: String = {
        let mut lines = Vec::new();
        let mut inblock = false;
        for l in node_yaml.lines() {
            if inblock && !l.starts_with(' ') && !l.is_empty() {
                break;
            }
            if inblock {
                lines.push(l.strip_prefix("  ").unwrap_or(l));
            }
            if l == "k3s:" {
                inblock = true;
            }
        }
        while lines.last() == Some(&"") {
            lines.pop();
        }
        lines.iter().map(|l| format!("{l}\n")).collect()
    };
    assert_eq!(
        config, expected,
        "config.yaml differs from the node config's k3s map\n{console}"
    );
    assert!(
        console.contains(&format!("k3s-standin: args={expect_role}\n")),
        "{console}"
    );
    let hostname = node_yaml
        .lines()
        .find_map(|l| l.strip_prefix("hostname: "))
        .unwrap();
    assert!(
        console.contains(&format!("k3s-standin: hostname={hostname}\n")),
        "{console}"
    );
    let kver = m["kernel"]["version"].as_str().unwrap();
    assert!(
        console.contains(&format!("k3s-standin: kernel={kver}\n")),
        "the booted kernel is not the spec's {kver}:\n{console}"
    );
    assert!(console.contains("k3s-standin: writable=yes"), "{console}");
    assert!(console.contains("k3s-standin: cgroup2=1"), "{console}");
    let modules = console
        .lines()
        .find_map(|l| l.strip_prefix("k3s-standin: modules="))
        .unwrap()
        .to_string();
    let loaded: Vec<&str> = modules.split_whitespace().collect();
    for module in ["overlay", "br_netfilter", "nf_conntrack", "vxlan"] {
        assert!(loaded.contains(&module), "{module} not loaded: {modules}");
    }
    assert!(
        loaded.contains(&"iptable_nat") || loaded.contains(&"nf_tables"),
        "no NAT module: {modules}"
    );

    // The stages were reported to kiln.server too, with the node's MAC.
    let posts = server.posts.lock().unwrap().clone();
    let reported: Vec<String> = posts
        .iter()
        .filter(|(p, _)| p == &format!("/report-{arch}/api/v1/stages"))
        .map(|(_, body)| body.clone())
        .collect();
    let stages: Vec<&str> = reported
        .iter()
        .filter_map(|b| b.split("stage=").nth(1))
        .collect();
    assert_eq!(stages, BOOT_STAGES, "{reported:?}");
    assert!(
        reported
            .iter()
            .all(|b| b.starts_with("mac=52%3A54%3A00") || b.starts_with("mac=52:54:00")),
        "{reported:?}"
    );
}

/// Boots with a wrong kiln.root_sha256: the initramfs must refuse the root,
/// say why, retry, and never switch to it.
pub fn boot_refuses_bad_root(arch: &str, image: &Path, server: &HttpServer) {
    serve_root(arch, image, server);
    let wrong = "0".repeat(64);
    let append = format!(
        "kiln.root={} kiln.root_sha256={wrong}",
        server.guest_url(&format!("img-{arch}/rootfs.squashfs"))
    );
    let mut guest = Guest::start(qemu_direct(arch, image, &append));
    guest.wait_for("sha256 mismatch", Duration::from_secs(240));
    // It retries: wait for the second refusal, then check it never went on.
    let start = Instant::now();
    while guest.console().matches("sha256 mismatch").count() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no retry:\n{}",
            guest.console()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let console = guest.console();
    assert!(console.contains(&format!("expected {wrong}")), "{console}");
    // The refusal is a boot stage too (what kiln serve records).
    assert!(console.contains("kiln: stage=rootfs-rejected"), "{console}");
    assert!(
        !console.contains("kiln: stage=rootfs\n"),
        "an unverified root was mounted:\n{console}"
    );
    assert!(!console.contains("k3s-standin"), "{console}");
}

/// unsquashfs lists the root, cpio lists the initramfs, the kernel is the spec's.
pub fn check_artifacts(image: &Path, m: &serde_json::Value) {
    let kver = m["kernel"]["version"].as_str().unwrap();
    assert!(m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == format!("linux-image-{kver}")));
    let mut vmlinuz = std::fs::read(image.join("vmlinuz")).unwrap();
    if vmlinuz.starts_with(&[0x1f, 0x8b]) {
        // arm64 kernels are a gzip-compressed Image.
        let o = Command::new("gzip")
            .arg("-dc")
            .arg(image.join("vmlinuz"))
            .output()
            .unwrap();
        vmlinuz = o.stdout;
    }
    assert!(
        vmlinuz.windows(kver.len()).any(|w| w == kver.as_bytes()),
        "vmlinuz is not kernel {kver}"
    );

    if have("unsquashfs") {
        let o = Command::new("unsquashfs")
            .args(["-lln"])
            .arg(image.join("rootfs.squashfs"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let list = String::from_utf8_lossy(&o.stdout);
        for path in [
            "squashfs-root/usr/local/bin/k3s",
            "squashfs-root/usr/lib/kiln/init",
            "squashfs-root/usr/bin/busybox",
            &format!("squashfs-root/usr/lib/modules/{kver}/modules.dep"),
            "squashfs-root/etc/inittab",
        ] {
            assert!(
                list.lines().any(|l| l.ends_with(path)),
                "{path} not in rootfs:\n{list}"
            );
        }
        assert!(
            list.lines()
                .any(|l| l.contains("squashfs-root/bin -> usr/bin")),
            "no merged /usr"
        );
    } else {
        skip(
            "unsquashfs listing",
            "unsquashfs not installed (apt-get install squashfs-tools)",
        );
    }
    if !have("cpio") {
        skip(
            "initramfs listing",
            "cpio not installed (apt-get install cpio)",
        );
        return;
    }
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc '{}' | cpio -t --quiet",
            image.join("initrd.img").display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list = String::from_utf8_lossy(&o.stdout);
    for path in [
        "init",
        "bin/busybox",
        "dev/console",
        "lib/kiln/lib.sh",
        &format!("lib/modules/{kver}/modules.dep"),
    ] {
        assert!(
            list.lines().any(|l| l == path),
            "{path} not in initramfs:\n{list}"
        );
    }
    assert!(
        list.lines().any(|l| l.ends_with("/squashfs.ko")),
        "no squashfs module in the initramfs"
    );
}

/// A network namespace made for one test and removed when dropped, with a
/// bridge `br0` at `10.77.<n>.1/24` and tap devices for QEMU guests. Every
/// address lives inside the namespace only.
pub struct Netns {
    pub name: String,
    pub subnet: u8,
}

impl Netns {
    pub fn create(tag: &str, subnet: u8) -> Netns {
        let name = format!("kiln-{tag}-{}", std::process::id());
        let ns = Netns { name, subnet };
        ns.ip(&["netns", "add", &ns.name]);
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        ns.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("10.77.{subnet}.1/24"),
            "dev",
            "br0",
        ]);
        ns.exec_ok(&["ip", "link", "set", "br0", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let st = Command::new("ip").args(args).status().unwrap();
        assert!(st.success(), "ip {args:?} failed");
    }

    /// The server's address on the bridge.
    pub fn server_ip(&self) -> String {
        format!("10.77.{}.1", self.subnet)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn exec_ok(&self, args: &[&str]) {
        let st = self.command(args[0]).args(&args[1..]).status().unwrap();
        assert!(st.success(), "{args:?} in {} failed", self.name);
    }

    /// Adds a tap device on the bridge for a QEMU guest.
    pub fn add_tap(&self, tap: &str) {
        self.exec_ok(&["ip", "tuntap", "add", "dev", tap, "mode", "tap"]);
        self.exec_ok(&["ip", "link", "set", tap, "master", "br0"]);
        self.exec_ok(&["ip", "link", "set", tap, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A background process killed when dropped (kiln serve, dnsmasq).
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How a test runs `kiln serve` in its namespace.
pub struct ServeRun<'a> {
    pub config: &'a Path,
    pub images: &'a Path,
    pub default_image: &'a str,
    /// `full` or `proxy`.
    pub dhcp: &'a str,
    /// The namespace's /24, e.g. `10.77.61` (the range is .100 to .150).
    pub net: &'a str,
    /// The HTTP listen address, ADDRESS:PORT.
    pub http: &'a str,
    pub state: &'a Path,
    /// `-v`: debug-level logs.
    pub verbose: bool,
    /// Its log is appended here.
    pub log: &'a Path,
}

/// Starts `kiln serve` inside a namespace on the bridge br0, offline from the
/// shared cache; returns once its HTTP server answers, and panics with the
/// log if it exits or does not come up within 60 s.
pub fn start_kiln_serve(ns: &Netns, run: &ServeRun) -> Background {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.log)
        .unwrap();
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_kiln"));
    if run.verbose {
        cmd.arg("-v");
    }
    let net = run.net;
    let child = cmd
        .args(["serve", "--config"])
        .arg(run.config)
        .args(["--interface", "br0", "--images"])
        .arg(run.images)
        .args(["--default-image", run.default_image, "--dhcp", run.dhcp])
        .args(["--range", &format!("{net}.100-{net}.150")])
        .args(["--http", run.http, "--state"])
        .arg(run.state)
        .env("KILN_CACHE", shared_cache())
        .env("KILN_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut serve = Background(child);
    let read_log = || std::fs::read_to_string(run.log).unwrap_or_default();
    let start = Instant::now();
    let url = format!("http://{}/metrics", run.http);
    while !ns
        .command("curl")
        .args(["-sf", "-o", "/dev/null", &url])
        .status()
        .unwrap()
        .success()
    {
        if let Ok(Some(st)) = serve.0.try_wait() {
            panic!("kiln serve exited ({st}):\n{}", read_log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "kiln serve did not come up:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    serve
}
