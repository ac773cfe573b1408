//! End to end, x86_64 (QEMU, TCG, `-kernel/-initrd`, user-mode network): the
//! node's data partition and its node config from `kiln.server`.
//!
//! - A blank virtio disk named by the node config's `data_disk` becomes one
//!   GPT partition named kiln-data holding ext4 labelled kiln-data, with the
//!   node's secret and its last good config on it; the node POSTs its MAC and
//!   a 64-hex secret to `kiln.server`/api/v1/node-config and reaches k3s-ready.
//! - Booted again with the same disk while the server refuses it (403), the
//!   node mounts the partition, sends the same secret, logs why it was
//!   refused, and after 5 tries boots with the saved config (config-cached).
//! - A disk holding data (an ext4 filesystem of someone else's) named by the
//!   config is left alone, byte for byte, and the console says why.
//!
//! The loopback HttpServer serves the root and answers the node-config POSTs.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MAC: &str = "52:54:00:12:34:56";
const TOKEN: &str = "kiln-test-token-data-disk";

fn node_yaml(hostname: &str) -> String {
    // The shape kiln serve emits: JSON-style strings, flow lists.
    format!(
        "hostname: \"{hostname}\"\nrole: \"server\"\ndata_disk: \"/dev/vda\"\nk3s:\n  \
         cluster-init: true\n  token: \"{TOKEN}\"\n  node-label: [\"zone=a\", \"kiln.test/disk=data\"]\n"
    )
}

/// The k3s map of `node_yaml`, as /etc/rancher/k3s/config.yaml must hold it.
fn k3s_config() -> String {
    format!(
        "cluster-init: true\ntoken: \"{TOKEN}\"\nnode-label: [\"zone=a\", \"kiln.test/disk=data\"]\n"
    )
}

/// What these tests need; prints a SKIP line and returns false without it.
fn can_run(test: &str) -> bool {
    for (prog, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("e2fsck", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("dumpe2fs", "e2fsprogs"),
        ("mkfs.ext4", "e2fsprogs"),
    ] {
        if !have(prog) {
            skip(
                test,
                &format!("{prog} is not installed (apt-get install {pkg})"),
            );
            return false;
        }
    }
    true
}

/// Builds images/pxe-x86_64.toml once for all tests of this file; returns
/// the image directory and the server holding its root.
fn image() -> &'static (PathBuf, HttpServer) {
    static IMAGE: std::sync::OnceLock<(PathBuf, HttpServer)> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("data-disk-e2e");
        let www = dir.join("www");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(www.join("img")).unwrap();
        let server = release_server(&www);
        let image = build_pxe("x86_64", &dir.join("images"), &server, &[]);
        std::fs::copy(
            image.join("rootfs.squashfs"),
            www.join("img/rootfs.squashfs"),
        )
        .unwrap();
        (image, server)
    })
}

/// Boots the image with `disk` as its virtio disk and `kiln.server` at
/// `/<node>/` of the server; returns the console once stage k3s-ready has
/// been reported to the server, and the boot's time.
fn boot(node: &str, disk: &Path) -> (String, Duration) {
    let (image, server) = image();
    let rootfs_sha = artifact_sha(&manifest(image), "rootfs.squashfs");
    let append = format!(
        "kiln.root={} kiln.root_sha256={rootfs_sha} kiln.server={}",
        server.guest_url("img/rootfs.squashfs"),
        server.guest_url(node),
    );
    let mut qemu = qemu_direct("x86_64", image, &append);
    qemu.args([
        "-drive",
        &format!("file={},format=raw,if=virtio", disk.display()),
    ]);
    let start = Instant::now();
    let mut guest = Guest::start(qemu);
    guest.wait_for("kiln: stage=k3s-ready\n", Duration::from_secs(300));
    let took = start.elapsed();
    let stages = format!("/{node}/api/v1/stages");
    while start.elapsed() < took + Duration::from_secs(30)
        && !server
            .posts
            .lock()
            .unwrap()
            .iter()
            .any(|(p, b)| p == &stages && b.ends_with("stage=k3s-ready"))
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = guest.console();
    drop(guest);
    eprintln!("boot {node}: k3s-ready after {:.0?}", took);
    (console, took)
}

/// The POST bodies one node sent to a path under its `kiln.server`.
fn posts(node: &str, what: &str) -> Vec<String> {
    let path = format!("/{node}/api/v1/{what}");
    image()
        .1
        .posts
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == &path)
        .map(|(_, b)| b.clone())
        .collect()
}

/// The secret of a node-config request body
/// `mac=...&secret=...&persistent=0|1`, checking `persistent` (whether the
/// node's secret is on a data partition).
fn secret_of(body: &str, persistent: bool) -> String {
    let rest = body
        .strip_prefix(&format!("mac={MAC}&secret="))
        .unwrap_or_else(|| panic!("node-config body is not mac={MAC}&secret=...: {body:?}"));
    let tail = format!("&persistent={}", u8::from(persistent));
    let secret = rest
        .strip_suffix(&tail)
        .unwrap_or_else(|| panic!("node-config body does not end with {tail}: {body:?}"));
    assert!(
        secret.len() == 64
            && secret
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "the secret is not 64 lower-case hex digits: {body:?}"
    );
    secret.to_string()
}

fn fingerprint(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))[..8].to_string()
}

/// Checks the stages on the console and as reported, in order.
fn check_stages(node: &str, console: &str, expected: &[&str]) {
    let mut at = 0;
    for stage in expected {
        let needle = format!("kiln: stage={stage}\n");
        let i = console[at..]
            .find(&needle)
            .unwrap_or_else(|| panic!("no {needle:?} after byte {at}:\n{console}"));
        at += i + needle.len();
    }
    let reported = posts(node, "stages");
    let stages: Vec<&str> = reported
        .iter()
        .map(|b| {
            assert!(b.starts_with(&format!("mac={MAC}&")), "{b:?}");
            b.split("stage=").nth(1).unwrap()
        })
        .collect();
    assert_eq!(stages, expected, "{reported:?}");
}

/// What the stand-in k3s recorded: its config, and that it ran as a server
/// named `hostname`.
fn check_k3s(console: &str, hostname: &str) {
    let config = between(
        console,
        "k3s-standin: config-begin\n",
        "k3s-standin: config-end",
    );
    assert_eq!(config, k3s_config(), "{console}");
    assert!(console.contains("k3s-standin: args=server\n"), "{console}");
    assert!(
        console.contains(&format!("k3s-standin: hostname={hostname}\n")),
        "{console}"
    );
    // kiln's own lines never show the config's token.
    for line in console.lines().filter(|l| l.starts_with("kiln:")) {
        assert!(!line.contains(TOKEN), "the token is on the console: {line}");
    }
}

/// A GPT partition: (name, type GUID bytes, first LBA, last LBA).
struct Partition {
    name: String,
    type_guid: [u8; 16],
    first: u64,
    last: u64,
}

/// Reads the GPT of a raw disk image (512-byte sectors): its used entries.
fn read_gpt(disk: &Path) -> Vec<Partition> {
    let mut f = std::fs::File::open(disk).unwrap();
    let mut header = [0u8; 92];
    f.seek(SeekFrom::Start(512)).unwrap();
    f.read_exact(&mut header).unwrap();
    assert_eq!(&header[..8], b"EFI PART", "no GPT header at LBA 1");
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let (entries_lba, count, size) = (
        u64_at(&header, 72),
        u32_at(&header, 80) as usize,
        u32_at(&header, 84) as usize,
    );
    assert!(size >= 128 && count <= 1024, "odd GPT entry array");
    let mut table = vec![0u8; count * size];
    f.seek(SeekFrom::Start(entries_lba * 512)).unwrap();
    f.read_exact(&mut table).unwrap();
    table
        .chunks(size)
        .filter(|e| e[..16].iter().any(|&b| b != 0))
        .map(|e| {
            let name: Vec<u16> = e[56..128]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&c| c != 0)
                .collect();
            Partition {
                name: String::from_utf16_lossy(&name),
                type_guid: e[..16].try_into().unwrap(),
                first: u64_at(e, 32),
                last: u64_at(e, 40),
            }
        })
        .collect()
}

/// The GPT type GUID of Linux filesystem data, in its on-disk byte order.
const LINUX_FS: [u8; 16] = [
    0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
];

fn run(cmd: &mut Command) -> (i32, String) {
    let o = cmd.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Checks the disk holds one GPT partition named kiln-data with a sound ext4
/// labelled kiln-data on it; returns (/kiln/secret, /kiln/node.yaml) read
/// from that filesystem with debugfs.
fn check_data_disk(disk: &Path, work: &Path) -> (String, String) {
    let parts = read_gpt(disk);
    assert_eq!(parts.len(), 1, "expected one partition");
    let p = &parts[0];
    assert_eq!(p.name, "kiln-data");
    assert_eq!(p.type_guid, LINUX_FS, "not a Linux filesystem partition");
    let disk_sectors = std::fs::metadata(disk).unwrap().len() / 512;
    assert!(
        p.first >= 34 && p.last < disk_sectors - 33 && p.last - p.first > disk_sectors * 9 / 10,
        "the partition does not fill the disk: {}..{} of {disk_sectors}",
        p.first,
        p.last
    );
    if have("sfdisk") {
        let (rc, out) = run(Command::new("sfdisk").arg("--json").arg(disk));
        assert_eq!(rc, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["partitiontable"]["label"], "gpt", "{out}");
        assert_eq!(v["partitiontable"]["partitions"][0]["name"], "kiln-data");
    } else {
        skip(
            "data_disk sfdisk --json",
            "sfdisk is not installed (apt-get install fdisk); the GPT was read by the test",
        );
    }

    // The partition's bytes, as a file the e2fsprogs tools read. The guest
    // was stopped without unmounting: e2fsck -p replays the journal on this
    // copy first, as the node itself does at its next boot.
    let part = work.join("kiln-data.ext4");
    {
        let mut f = std::fs::File::open(disk).unwrap();
        f.seek(SeekFrom::Start(p.first * 512)).unwrap();
        let mut out = std::fs::File::create(&part).unwrap();
        std::io::copy(&mut f.take((p.last - p.first + 1) * 512), &mut out).unwrap();
    }
    let (rc, out) = run(Command::new("e2fsck").arg("-fp").arg(&part));
    assert!(rc <= 1, "e2fsck -p: {rc}\n{out}");
    let (rc, out) = run(Command::new("e2fsck").arg("-fn").arg(&part));
    assert_eq!(rc, 0, "e2fsck -n finds errors:\n{out}");
    let (rc, out) = run(Command::new("dumpe2fs").arg("-h").arg(&part));
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("Filesystem volume name:") && l.ends_with(" kiln-data")),
        "{out}"
    );
    let debugfs = |req: &str| {
        let o = Command::new("debugfs")
            .args(["-R", req])
            .arg(&part)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let stat = debugfs("stat /kiln/secret");
    assert!(
        stat.contains("Mode:  0600") || stat.contains("Mode:  00600"),
        "{stat}"
    );
    let (secret, config) = (debugfs("cat /kiln/secret"), debugfs("cat /kiln/node.yaml"));
    let _ = std::fs::remove_file(&part);
    (secret, config)
}

fn sparse_disk(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

fn sha256_file(path: &Path) -> String {
    kiln_builder::hash_file(path).unwrap().0
}

#[test]
fn a_blank_disk_becomes_kiln_data_and_keeps_secret_and_config() {
    let test = "data_disk blank";
    if !can_run(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("blank.raw");
    sparse_disk(&disk, 256);
    let server = &image().1;
    let node = "node-blank";
    let yaml = node_yaml("cp-data");
    server
        .answers
        .lock()
        .unwrap()
        .insert(format!("/{node}/api/v1/node-config"), (200, yaml.clone()));

    // Boot 1: the blank disk is partitioned and formatted.
    let (console, _) = boot(node, &disk);
    check_stages(node, &console, BOOT_STAGES);
    assert!(
        console.contains("kiln: data_disk /dev/vda is blank: making a GPT partition kiln-data"),
        "{console}"
    );
    assert!(
        console.contains("kiln: data partition /dev/vda1 holds /var/lib/rancher and /var/lib/kiln"),
        "{console}"
    );
    check_k3s(&console, "cp-data");
    let requests = posts(node, "node-config");
    assert_eq!(requests.len(), 1, "{requests:?}");
    // The partition is made after the first fetch: the secret was in RAM then.
    let secret = secret_of(&requests[0], false);
    assert!(
        console.contains(&format!(
            "kiln: node secret: new, sha256 {}",
            fingerprint(&secret)
        )),
        "{console}"
    );
    assert!(!console.contains(&secret), "the secret is on the console");
    let (on_disk, saved) = check_data_disk(&disk, tmp.path());
    assert_eq!(
        on_disk, secret,
        "the secret on the disk is not the one sent"
    );
    assert_eq!(saved, yaml, "the saved node config is not the one served");

    // Boot 2: the server refuses the node; it keeps asking with the same
    // secret, says why, then boots with the config saved on its disk.
    // (Its kiln.server is another path, so its requests are told apart.)
    let node = "node-blank-again";
    server.answers.lock().unwrap().insert(
        format!("/{node}/api/v1/node-config"),
        (403, format!("machine {MAC}: the secret does not match\n")),
    );
    let (console, _) = boot(node, &disk);
    check_stages(
        node,
        &console,
        &[
            "initramfs",
            "network",
            "rootfs",
            "config-cached",
            "k3s-started",
            "k3s-ready",
        ],
    );
    assert!(
        console.contains("kiln: data partition /dev/vda1 holds /var/lib/rancher and /var/lib/kiln"),
        "{console}"
    );
    assert!(!console.contains("is blank"), "{console}");
    assert!(
        console.contains(&format!(
            "kiln: node secret: kept, sha256 {}",
            fingerprint(&secret)
        )),
        "{console}"
    );
    assert!(
        console.contains(&format!(
            "refused (403): machine {MAC}: the secret does not match"
        )),
        "the refusal's reason is not on the console:\n{console}"
    );
    assert!(
        console.contains("failed 5 times") && console.contains("booting with the last good config"),
        "{console}"
    );
    check_k3s(&console, "cp-data");
    let requests = posts(node, "node-config");
    assert_eq!(requests.len(), 5, "{requests:?}");
    for body in &requests {
        assert_eq!(secret_of(body, true), secret, "boot 2 sent another secret");
    }
    let (on_disk, _) = check_data_disk(&disk, tmp.path());
    assert_eq!(on_disk, secret, "the secret on the disk changed");
}

#[test]
fn a_disk_holding_data_is_left_alone() {
    let test = "data_disk holding data";
    if !can_run(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Someone else's filesystem on the whole disk, with a file in it.
    let disk = tmp.path().join("used.raw");
    sparse_disk(&disk, 64);
    let (rc, out) = run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "site-data"])
        .arg(&disk));
    assert_eq!(rc, 0, "{out}");
    let before = sha256_file(&disk);

    let server = &image().1;
    let node = "node-used";
    server.answers.lock().unwrap().insert(
        format!("/{node}/api/v1/node-config"),
        (200, node_yaml("cp-used")),
    );
    let (console, _) = boot(node, &disk);
    check_stages(node, &console, BOOT_STAGES);
    assert!(
        console.contains("kiln: data_disk /dev/vda is not blank (its first 4 MiB are not all zero")
            && console.contains("it is left alone, nothing written"),
        "the console does not say why the disk was left alone:\n{console}"
    );
    assert!(!console.contains("data partition /dev/vda"), "{console}");
    check_k3s(&console, "cp-used");
    assert_eq!(
        sha256_file(&disk),
        before,
        "the disk holding data was written"
    );
    let requests = posts(node, "node-config");
    assert_eq!(requests.len(), 1, "{requests:?}");
    secret_of(&requests[0], false);
}
