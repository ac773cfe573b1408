//! Raspberry Pi SD-card images: build images/rpi4.toml and images/rpi5.toml
//! and check sdcard.img with the real tools: sfdisk reads the MBR,
//! fsck.vfat finds the boot partition clean, mtools list and read its files,
//! unsquashfs reads root A. A second rpi4 build gives the same bytes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

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

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{cmd:?} failed:\n{out}");
    out
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
    assert_eq!(names, ["sdcard.img"], "only the card: {m}");
    let img = image.join("sdcard.img");
    let (sha, size) = kiln_builder::hash_file(&img).unwrap();
    assert_eq!(artifact_sha(&m, "sdcard.img"), sha);
    assert_eq!(m["artifacts"][0]["size"], size);

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
    let www = tmp.path().join("www");
    let server = release_server(&www);
    let image = build_spec(
        "images/rpi4.toml",
        "rpi4",
        &tmp.path().join("out"),
        &server,
        &[],
    );
    let again = build_spec(
        "images/rpi4.toml",
        "rpi4",
        &tmp.path().join("out2"),
        &server,
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
    check_card(&image, "rpi4", tmp.path());
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
