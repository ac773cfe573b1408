//! `kiln flash` through the real binary: a small SD-card image (made with
//! kiln_builder::sdcard) written to files, with the node settings in its
//! boot partition, read by mtools, fsck.vfat and the node's own shell
//! parser. Quick: no network, no QEMU, no devices (one loop-device test as
//! root).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use kiln_builder::sdcard::{self, BOOT_SIZE, BOOT_START};

/// A small kiln SD-card image in `dir` (about 262 MiB, mostly sparse).
fn card(dir: &Path) -> PathBuf {
    let root: Vec<u8> = (0..1_200_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let img = dir.join("card.img");
    sdcard::write_sample(&img, "flash-test", &root).unwrap();
    img
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `mtype` of a file in the boot partition of `img`; None without mtools.
fn mtype(img: &Path, file: &str) -> Option<String> {
    if !have("mtype") {
        return None;
    }
    let o = Command::new("mtype")
        .arg("-i")
        .arg(format!("{}@@{}", s(img), BOOT_START))
        .arg(format!("::/{file}"))
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "mtype: {o:?}");
    Some(String::from_utf8(o.stdout).unwrap())
}

/// What the node's shell parser (lib.sh) reads from `yaml`.
fn node_reads(dir: &Path, yaml: &str, func: &str, key: &str) -> String {
    let f = dir.join("node.yaml");
    std::fs::write(&f, yaml).unwrap();
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(". \"$0\"; {func} {key} < \"$1\""))
        .arg(repo().join("overlays/base/usr/lib/kiln/lib.sh"))
        .arg(&f)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout).unwrap().trim_end().to_string()
}

/// `fsck.vfat -n` of the boot partition of `img` is clean.
fn fsck_boot_partition(test: &str, dir: &Path, img: &[u8]) {
    if !have("fsck.vfat") {
        skip(test, "no fsck.vfat (apt-get install dosfstools)");
        return;
    }
    let part = dir.join("boot.vfat");
    std::fs::write(
        &part,
        &img[BOOT_START as usize..(BOOT_START + BOOT_SIZE) as usize],
    )
    .unwrap();
    let o = Command::new("fsck.vfat")
        .arg("-n")
        .arg(&part)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "fsck.vfat: {o:?}");
    assert!(!out.contains("Dirty bit"), "{out}");
}

/// The bytes outside the boot partition are the image's.
fn assert_same_outside_boot(image: &[u8], target: &[u8]) {
    let (a, b) = (BOOT_START as usize, (BOOT_START + BOOT_SIZE) as usize);
    assert!(target.len() >= image.len());
    assert!(image[..a] == target[..a], "the MBR and gap differ");
    assert!(
        image[b..] == target[b..image.len()],
        "the root partitions differ"
    );
}

#[test]
fn flash_writes_the_image_and_the_settings() {
    let test = "flash_writes_the_image_and_the_settings";
    let d = tempfile::tempdir().unwrap();
    let img = card(d.path());
    let target = d.path().join("target.img");
    let (ok, out, err) = kiln(
        &[
            "flash",
            s(&img),
            s(&target),
            "--hostname",
            "pi-07",
            "--role",
            "agent",
            "--server",
            "http://10.9.8.7:8080",
            "--yes",
        ],
        &[],
    );
    assert!(ok, "{out}\n{err}");
    let image = std::fs::read(&img).unwrap();
    let written = std::fs::read(&target).unwrap();
    assert_eq!(written.len(), image.len());
    assert_same_outside_boot(&image, &written);
    assert_ne!(image, written, "the settings were not written");
    assert!(
        out.contains(&format!("sha256:   {}", kiln_builder::sha256_hex(&written))),
        "{out}"
    );
    assert!(
        out.contains(&format!("{} bytes", image.len())) && out.contains("verified"),
        "{out}"
    );
    assert!(
        out.contains(
            "settings: kiln.yaml (hostname pi-07, role agent, server http://10.9.8.7:8080)"
        ),
        "{out}"
    );
    fsck_boot_partition(test, d.path(), &written);

    let Some(yaml) = mtype(&target, "kiln.yaml") else {
        skip(test, "no mtype (apt-get install mtools)");
        return;
    };
    assert_eq!(
        yaml,
        "# kiln node settings, written by kiln flash\nhostname: \"pi-07\"\nrole: \"agent\"\nserver: \"http://10.9.8.7:8080\"\n"
    );
    assert_eq!(
        node_reads(d.path(), &yaml, "kiln_yaml_scalar", "hostname"),
        "pi-07"
    );
    assert_eq!(
        node_reads(d.path(), &yaml, "kiln_yaml_scalar", "role"),
        "agent"
    );
    assert_eq!(
        node_reads(d.path(), &yaml, "kiln_yaml_scalar", "server"),
        "http://10.9.8.7:8080"
    );
    // The rest of the boot partition is untouched.
    assert_eq!(mtype(&target, "vmlinuz").unwrap(), "KERNEL");
    assert_eq!(mtype(&target, "config.txt"), mtype(&img, "config.txt"));
}

#[test]
fn flash_with_a_config_file_and_a_hostname_override_onto_a_larger_file() {
    let test = "flash_with_a_config_file_and_a_hostname_override_onto_a_larger_file";
    let d = tempfile::tempdir().unwrap();
    let img = card(d.path());
    let config = d.path().join("node.yaml");
    std::fs::write(
        &config,
        "# saved from kiln serve\nhostname: \"kiln-server-2\"\nrole: \"server\"\n\
         data_disk: \"/dev/nvme0n1\"\nk3s:\n  server: \"https://10.0.0.5:6443\"\n  \
         token: \"abc123\"\n  node-label: [\"zone=a\"]\n",
    )
    .unwrap();
    // A larger file (like a larger card) keeps its length and its tail.
    let image_len = std::fs::metadata(&img).unwrap().len();
    let target = d.path().join("bigger.img");
    let len = image_len + 64 * 1024 * 1024 + 123;
    {
        let f = std::fs::File::create(&target).unwrap();
        f.set_len(len).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"TAIL", len - 4).unwrap();
    }
    let (ok, out, err) = kiln(
        &[
            "flash",
            s(&img),
            s(&target),
            "--config",
            s(&config),
            "--hostname",
            "pi-09",
            "--yes",
        ],
        &[],
    );
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("hostname pi-09, role server"), "{out}");
    assert!(out.contains(&format!("{image_len} bytes")), "{out}");
    let written = std::fs::read(&target).unwrap();
    assert_eq!(written.len() as u64, len);
    assert_eq!(&written[written.len() - 4..], b"TAIL");
    assert_same_outside_boot(&std::fs::read(&img).unwrap(), &written);
    fsck_boot_partition(test, d.path(), &written);
    let Some(yaml) = mtype(&target, "kiln.yaml") else {
        skip(test, "no mtype (apt-get install mtools)");
        return;
    };
    assert_eq!(
        node_reads(d.path(), &yaml, "kiln_yaml_scalar", "hostname"),
        "pi-09"
    );
    assert_eq!(
        node_reads(d.path(), &yaml, "kiln_yaml_scalar", "role"),
        "server"
    );
    assert_eq!(
        node_reads(d.path(), &yaml, "kiln_yaml_scalar", "data_disk"),
        "/dev/nvme0n1"
    );
    assert_eq!(
        node_reads(d.path(), &yaml, "kiln_yaml_block", "k3s"),
        "server: \"https://10.0.0.5:6443\"\ntoken: \"abc123\"\nnode-label: [\"zone=a\"]"
    );
}

#[test]
fn a_raw_image_without_settings_is_written_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("raw.img");
    let raw: Vec<u8> = (0..3_000_001u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&img, &raw).unwrap();
    let target = d.path().join("copy.img");
    let (ok, out, err) = kiln(&["flash", s(&img), s(&target)], &[]);
    assert!(ok, "a new file needs no --yes: {out}\n{err}");
    assert!(out.contains("settings: the image's own"), "{out}");
    assert!(std::fs::read(&target).unwrap() == raw);
    // Settings need an MBR disk with a FAT partition 1.
    let (ok, _, err) = kiln(
        &["flash", s(&img), s(&target), "--hostname", "pi", "--yes"],
        &[],
    );
    assert!(
        !ok && err.contains("raw.img has no MBR partition table"),
        "{err}"
    );
}

#[test]
fn a_bad_role_is_refused_and_named() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("any.img");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    let target = d.path().join("target.img");
    let (ok, _, err) = kiln(
        &["flash", s(&img), s(&target), "--role", "master", "--yes"],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("--role: role \"master\" is not a kiln role"),
        "{err}"
    );
    assert!(!target.exists());

    let (ok, _, err) = kiln(
        &["flash", s(&img), s(&target), "--hostname", "Pi-07", "--yes"],
        &[],
    );
    assert!(!ok && err.contains("use \"pi-07\""), "{err}");
    let config = d.path().join("bad.yaml");
    std::fs::write(&config, "hostname: pi\nlabels: [a]\n").unwrap();
    let (ok, _, err) = kiln(
        &[
            "flash",
            s(&img),
            s(&target),
            "--config",
            s(&config),
            "--yes",
        ],
        &[],
    );
    assert!(
        !ok && err.contains(&format!("{}: unknown key \"labels\"", s(&config))),
        "{err}"
    );
    assert!(!target.exists());
}

#[test]
fn without_yes_and_a_terminal_an_existing_target_is_left_alone() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("any.img");
    std::fs::write(&img, [1u8; 4096]).unwrap();
    let target = d.path().join("target.img");
    std::fs::write(&target, b"precious").unwrap();
    // common::kiln runs it with stdin from /dev/null.
    let (ok, _, err) = kiln(&["flash", s(&img), s(&target)], &[]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "refusing to overwrite {} without --yes (stdin is not a terminal)",
            s(&target)
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
}

#[test]
fn the_image_itself_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("any.img");
    std::fs::write(&img, [2u8; 4096]).unwrap();
    let link = d.path().join("link.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    for target in [&img, &link] {
        let (ok, _, err) = kiln(&["flash", s(&img), s(target), "--yes"], &[]);
        assert!(!ok && err.contains("itself"), "{err}");
    }
    assert_eq!(std::fs::read(&img).unwrap(), [2u8; 4096]);
}

/// Detaches a loop device when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn flash_to_a_loop_device() {
    let test = "flash_to_a_loop_device";
    if !is_root() || !have("losetup") {
        skip(test, "needs root and losetup (util-linux)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = card(d.path());
    let image_len = std::fs::metadata(&img).unwrap().len();
    let backing = d.path().join("disk");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(image_len + 8 * 1024 * 1024)
        .unwrap();
    let o = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    if !o.status.success() {
        skip(
            test,
            &format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        );
        return;
    }
    let dev = Loop(String::from_utf8(o.stdout).unwrap().trim().to_string());
    let (ok, out, err) = kiln(
        &["flash", s(&img), &dev.0, "--hostname", "pi-loop", "--yes"],
        &[],
    );
    assert!(ok, "{out}\n{err}");
    assert!(out.contains(&format!("to {}", dev.0)), "{out}");
    let written = std::fs::read(&backing).unwrap();
    assert_same_outside_boot(&std::fs::read(&img).unwrap(), &written);
    if let Some(yaml) = mtype(&backing, "kiln.yaml") {
        assert!(yaml.contains("hostname: \"pi-loop\""), "{yaml}");
    }
    // Without --yes: stdin is not a terminal.
    let (ok, _, err) = kiln(&["flash", s(&img), &dev.0], &[]);
    assert!(
        !ok && err.contains("without --yes (stdin is not a terminal)"),
        "{err}"
    );

    // A device smaller than the image is refused before anything is written.
    let small = d.path().join("small");
    std::fs::write(&small, vec![9u8; 1 << 20]).unwrap();
    let o = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&small)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let small_dev = Loop(String::from_utf8(o.stdout).unwrap().trim().to_string());
    let (ok, _, err) = kiln(&["flash", s(&img), &small_dev.0, "--yes"], &[]);
    assert!(!ok && err.contains("less than the image's"), "{err}");
    assert_eq!(std::fs::read(&small).unwrap(), vec![9u8; 1 << 20]);
}
