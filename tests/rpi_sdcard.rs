//! Raspberry Pi SD-card images: build images/rpi4.toml and images/rpi5.toml
//! and check sdcard.img with the real tools: sfdisk reads the MBR,
//! fsck.vfat finds the boot partition clean, mtools list and read its files,
//! unsquashfs reads root A. A second rpi4 build gives the same bytes.
//!
//! Then the card boots: `kiln flash` writes sdcard.img with node settings
//! into a 1 GiB card file, and QEMU (aarch64 `-M virt`, TCG) boots the
//! card's own kernel and initramfs with the card as its virtio disk: root A
//! found by PARTUUID, the data partition made in the rest of the card, the
//! stand-in k3s started with the settings kiln flash wrote. The card then
//! grows to 1.5 GiB and boots again: the data partition and its filesystem
//! grow, the node's secret is kept.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// images/rpi4.toml, built once for this file's tests.
fn rpi4() -> &'static (PathBuf, HttpServer) {
    static IMAGE: OnceLock<(PathBuf, HttpServer)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("rpi-sdcard");
        let _ = std::fs::remove_dir_all(&dir);
        let server = release_server(&dir.join("www"));
        let image = build_spec("images/rpi4.toml", "rpi4", &dir.join("out"), &server, &[]);
        (image, server)
    })
}

/// The tools the checks use, with the Debian package that has each.
const TOOLS: &[(&str, &str)] = &[
    ("sfdisk", "fdisk"),
    ("fsck.vfat", "dosfstools"),
    ("mdir", "mtools"),
    ("mtype", "mtools"),
    ("unsquashfs", "squashfs-tools"),
];

fn missing_tool() -> Option<String> {
    TOOLS
        .iter()
        .find(|(t, _)| !have(t))
        .map(|(t, p)| format!("{t} is not installed (apt-get install {p})"))
}

/// (start, size) in bytes and type of each partition, from `sfdisk --json`.
fn partitions(img: &Path, disk_id: u32) -> Vec<(u64, u64, String)> {
    let json = run(Command::new("sfdisk").arg("--json").arg(img));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let t = &v["partitiontable"];
    assert_eq!(t["label"], "dos", "{json}");
    assert_eq!(t["id"], format!("0x{disk_id:08x}"), "{json}");
    assert_eq!(t["sectorsize"], 512, "{json}");
    t["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().unwrap() * 512,
                p["size"].as_u64().unwrap() * 512,
                p["type"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Copies `len` bytes at `start` of `img` into `to`.
fn extract(img: &Path, start: u64, len: u64, to: &Path) -> PathBuf {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(img).unwrap();
    f.seek(SeekFrom::Start(start)).unwrap();
    let mut out = std::fs::File::create(to).unwrap();
    let n = std::io::copy(&mut f.take(len), &mut out).unwrap();
    assert_eq!(n, len);
    to.to_path_buf()
}

/// Checks an image directory holding sdcard.img; returns the boot files' names.
fn check_card(image: &Path, name: &str, work: &Path) -> Vec<String> {
    let m = manifest(image);
    let names: Vec<&str> = m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["initrd.img", "rootfs.squashfs", "sdcard.img", "vmlinuz"],
        "the card, and the files of network boot: {m}"
    );
    let img = image.join("sdcard.img");
    let (sha, size) = kiln_builder::hash_file(&img).unwrap();
    assert_eq!(artifact_sha(&m, "sdcard.img"), sha);
    assert_eq!(m["artifacts"][2]["size"], size);

    let disk_id = kiln_builder::sdcard::disk_id(name);
    let parts = partitions(&img, disk_id);
    let kinds: Vec<&str> = parts.iter().map(|p| p.2.as_str()).collect();
    assert_eq!(kinds, ["c", "83", "83"], "{parts:?}");
    assert_eq!((parts[0].0, parts[0].1), (4 << 20, 256 << 20));
    for p in &parts {
        assert_eq!(
            p.0 % (1 << 20),
            0,
            "partition start aligned to a MiB: {parts:?}"
        );
    }
    assert_eq!(parts[1].1, parts[2].1, "roots A and B have one size");
    assert_eq!(parts[2].0 + parts[2].1, size, "the card ends with root B");

    let boot = extract(&img, parts[0].0, parts[0].1, &work.join("boot.fat"));
    let fsck = run(Command::new("fsck.vfat").arg("-n").arg(&boot));
    eprintln!("{fsck}");
    let listing = run(Command::new("mdir")
        .args(["-b", "-i"])
        .arg(&boot)
        .arg("::/"));
    let files: Vec<String> = listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("::/"))
        .map(str::to_string)
        .collect();
    for f in [
        "start4.elf",
        "fixup4.dat",
        "bcm2711-rpi-4-b.dtb",
        "vmlinuz",
        "initrd.img",
        "config.txt",
        "cmdline.txt",
    ] {
        assert!(
            files.iter().any(|x| x == f),
            "{f} on the boot partition: {files:?}"
        );
    }
    let cmdline = run(Command::new("mtype")
        .arg("-i")
        .arg(&boot)
        .arg("::/cmdline.txt"));
    assert!(
        cmdline.contains(&format!("kiln.root=PARTUUID={disk_id:08x}-02 ")),
        "{cmdline}"
    );
    let config = run(Command::new("mtype")
        .arg("-i")
        .arg(&boot)
        .arg("::/config.txt"));
    for line in [
        "arm_64bit=1",
        "kernel=vmlinuz",
        "initramfs initrd.img followkernel",
    ] {
        assert!(config.lines().any(|l| l.trim() == line), "{line}: {config}");
    }

    let root_a = extract(&img, parts[1].0, parts[1].1, &work.join("root-a.squashfs"));
    let list = run(Command::new("unsquashfs").arg("-l").arg(&root_a));
    assert!(
        list.lines()
            .any(|l| l.trim() == "squashfs-root/usr/local/bin/k3s"),
        "k3s in root A"
    );
    files
}

#[test]
fn rpi4_sdcard_builds_checks_clean_and_reproduces() {
    let tmp = tempfile::tempdir().unwrap();
    let (image, server) = rpi4();
    let again = build_spec(
        "images/rpi4.toml",
        "rpi4",
        &tmp.path().join("out2"),
        server,
        &[],
    );
    assert_eq!(
        kiln_builder::hash_file(&image.join("sdcard.img")).unwrap(),
        kiln_builder::hash_file(&again.join("sdcard.img")).unwrap(),
        "two builds of one spec give one card"
    );
    drop(again);
    std::fs::remove_dir_all(tmp.path().join("out2")).unwrap();
    if let Some(why) = missing_tool() {
        skip("rpi4_sdcard checks", &why);
        return;
    }
    check_card(image, "rpi4", tmp.path());
}

#[test]
fn rpi5_sdcard_carries_the_pi5_device_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    let server = release_server(&www);
    let image = build_spec(
        "images/rpi5.toml",
        "rpi5",
        &tmp.path().join("out"),
        &server,
        &[],
    );
    if let Some(why) = missing_tool() {
        skip("rpi5_sdcard checks", &why);
        return;
    }
    let files = check_card(&image, "rpi5", tmp.path());
    assert!(
        files.iter().any(|f| f == "bcm2712-rpi-5-b.dtb"),
        "{files:?}"
    );
}

/// The node config kiln flash puts on the card (`--config`), before its
/// `--hostname` and `--role` override those keys.
const CARD_CONFIG: &str = "\
# a node config, as kiln serve hands them out
hostname: \"overridden-by-the-flag\"
role: \"agent\"
k3s:
  node-label: [\"kiln.test/card=flashed\", \"zone=shelf-1\"]
  write-kubeconfig-mode: \"0640\"
";

/// What /etc/rancher/k3s/config.yaml must hold: CARD_CONFIG's k3s map (as
/// kiln flash writes it: each value as compact JSON).
const CARD_K3S: &str = "node-label: [\"kiln.test/card=flashed\",\"zone=shelf-1\"]\n\
                        write-kubeconfig-mode: \"0640\"\n";

/// `tool args...` must succeed; returns its stdout.
fn tool(prog: &str, args: &[&str]) -> String {
    run(Command::new(prog).args(args))
}

/// Boots the card file `card` with the kernel, initramfs and command line
/// found on its boot partition (copied out with mtools into `work`); returns
/// the console once the stand-in k3s has recorded its start and the node has
/// reported k3s-ready, and the time that took.
fn boot_card(card: &Path, work: &Path) -> (String, Duration) {
    let at = format!("{}@@4M", card.display());
    std::fs::create_dir_all(work).unwrap();
    for f in ["vmlinuz", "initrd.img", "cmdline.txt"] {
        let to = work.join(f);
        let _ = std::fs::remove_file(&to);
        tool(
            "mcopy",
            &["-n", "-i", &at, &format!("::/{f}"), to.to_str().unwrap()],
        );
    }
    // The card's own command line, less its consoles (the Pi's UARTs): QEMU's
    // is ttyAMA0, which qemu_direct puts first.
    let cmdline = std::fs::read_to_string(work.join("cmdline.txt")).unwrap();
    let append: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("console="))
        .collect();
    let mut qemu = qemu_direct("aarch64", work, &append.join(" "));
    qemu.args([
        "-drive",
        &format!("file={},format=raw,if=none,id=card", card.display()),
        "-device",
        "virtio-blk-pci,drive=card",
    ]);
    let start = Instant::now();
    let mut guest = Guest::start(qemu);
    guest.wait_for("k3s-standin: config-end", Duration::from_secs(400));
    guest.wait_for("kiln: stage=k3s-ready\n", Duration::from_secs(120));
    let took = start.elapsed();
    // ext4 commits its journal every 5 s: let the data partition settle
    // before the machine is switched off.
    std::thread::sleep(Duration::from_secs(7));
    let console = guest.console();
    drop(guest);
    eprintln!("card boot: k3s-ready after {took:.0?}");
    (console, took)
}

/// The card's partition 4 (start, size in bytes), from sfdisk.
fn data_partition(card: &Path) -> (u64, u64) {
    let json = tool("sfdisk", &["--json", card.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let parts = v["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 4, "a data partition was made: {json}");
    assert_eq!(parts[3]["type"], "83", "{json}");
    (
        parts[3]["start"].as_u64().unwrap() * 512,
        parts[3]["size"].as_u64().unwrap() * 512,
    )
}

/// Label, size in bytes and the node secret of the card's ext4 data
/// partition, read on the host with e2fsprogs.
fn data_fs(card: &Path, work: &Path) -> (String, u64, String) {
    let (start, size) = data_partition(card);
    let part = extract(card, start, size, &work.join("data.ext4"));
    let p = part.to_str().unwrap();
    // The machine was switched off, as a Pi is: replay the journal as the
    // node's next boot does (e2fsck -p). 0: clean, 1: fixed (free counts
    // are not journaled); anything else is damage.
    let fsck = Command::new("e2fsck").args(["-fy", p]).output().unwrap();
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "e2fsck on the data partition: {fsck:?}"
    );
    let dump = tool("dumpe2fs", &["-h", p]);
    let field = |name: &str| {
        dump.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in dumpe2fs:\n{dump}"))
            .trim()
            .to_string()
    };
    let blocks: u64 = field("Block count:").parse().unwrap();
    let block_size: u64 = field("Block size:").parse().unwrap();
    let out = Command::new("debugfs")
        .args(["-R", "cat /kiln/secret", p])
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs: {out:?}");
    let secret = String::from_utf8(out.stdout).unwrap();
    std::fs::remove_file(&part).unwrap();
    (
        field("Filesystem volume name:"),
        blocks * block_size,
        secret,
    )
}

#[test]
fn rpi4_card_flashed_with_settings_boots_and_grows_its_data_partition() {
    let test = "rpi4_card boot";
    for (prog, pkg) in [
        ("qemu-system-aarch64", "qemu-system-arm"),
        ("mcopy", "mtools"),
        ("sfdisk", "fdisk"),
        ("dumpe2fs", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
    ] {
        if !have(prog) {
            skip(
                test,
                &format!("{prog} is not installed (apt-get install {pkg})"),
            );
            return;
        }
    }
    let (image, _server) = rpi4();
    let tmp = tempfile::tempdir().unwrap();
    let card = tmp.path().join("card.img");
    // A blank 1 GiB "SD card": kiln flash writes over its start.
    std::fs::File::create(&card)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let config = tmp.path().join("node.yaml");
    std::fs::write(&config, CARD_CONFIG).unwrap();
    let (ok, out, err) = kiln(
        &[
            "flash",
            image.join("sdcard.img").to_str().unwrap(),
            card.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--hostname",
            "pi-shelf-1",
            "--role",
            "server",
            "--yes",
        ],
        &[],
    );
    assert!(ok, "kiln flash failed:\n{out}\n{err}");
    assert_eq!(std::fs::metadata(&card).unwrap().len(), 1 << 30);

    // First boot: root A by PARTUUID, partition 4 made to the end of the
    // card, the settings from the boot partition.
    let (console, _) = boot_card(&card, &tmp.path().join("boot1"));
    let disk_id = kiln_builder::sdcard::disk_id("rpi4");
    for want in [
        format!("kiln: root PARTUUID={disk_id:08x}-02 is /dev/vda2 on /dev/vda"),
        "kiln: making the data partition: /dev/vda partition 4".to_string(),
        "kiln: data partition /dev/vda4 holds /var/lib/rancher and /var/lib/kiln".to_string(),
        "kiln: node settings: kiln.yaml on /dev/vda1".to_string(),
        "kiln: hostname pi-shelf-1, role server".to_string(),
        "k3s-standin: args=server".to_string(),
        "k3s-standin: hostname=pi-shelf-1".to_string(),
        "k3s-standin: rancher-on=/dev/vda4".to_string(),
        "kiln: stage=config-settings".to_string(),
    ] {
        assert!(
            console.contains(&want),
            "{want:?} on the console:\n{console}"
        );
    }
    assert_eq!(
        between(
            &console,
            "k3s-standin: config-begin\n",
            "k3s-standin: config-end"
        ),
        CARD_K3S,
        "k3s' config.yaml is the settings' k3s map"
    );
    let (start, size) = data_partition(&card);
    assert_eq!(start % (1 << 20), 0, "partition 4 aligned to a MiB");
    assert_eq!(start + size, 1 << 30, "partition 4 fills the card");
    let (label, fs_size, secret) = data_fs(&card, tmp.path());
    assert_eq!(label, "kiln-data");
    assert!(
        fs_size + (4 << 20) >= size,
        "ext4 fills partition 4: {fs_size} of {size}"
    );
    assert!(
        secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit()),
        "the node secret on the data partition: {secret:?}"
    );

    // The card is larger now: partition 4 and its filesystem grow to the end,
    // the secret is the same.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&card)
        .unwrap()
        .set_len(3 << 29)
        .unwrap();
    let (console, _) = boot_card(&card, &tmp.path().join("boot2"));
    for want in [
        "kiln: growing the data partition /dev/vda4",
        "kiln: data partition /dev/vda4 grown",
        "kiln: node secret: kept",
        "k3s-standin: hostname=pi-shelf-1",
    ] {
        assert!(
            console.contains(want),
            "{want:?} on the console:\n{console}"
        );
    }
    assert!(
        !console.contains("making the data partition"),
        "made once:\n{console}"
    );
    let (start2, size2) = data_partition(&card);
    assert_eq!((start2, start2 + size2), (start, 3 << 29));
    let (_, fs_size2, secret2) = data_fs(&card, tmp.path());
    assert!(
        fs_size2 + (4 << 20) >= size2,
        "ext4 grew: {fs_size2} of {size2}"
    );
    assert_eq!(secret2, secret, "the node kept its secret");
}
