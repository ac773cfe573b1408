//! Cloud and server disk images: build images/cloud-x86_64.toml and
//! images/cloud-aarch64.toml and check what they emit with the real tools,
//! then boot them under UEFI firmware (OVMF / AAVMF, TCG) with a NoCloud
//! seed made by `kiln seed`.
//!
//! - disk.raw: sfdisk verifies the GPT (ESP, kiln-root-a, kiln-root-b with
//!   the discoverable-partition types and GUIDs derived from the names),
//!   fsck.vfat finds the ESP clean and mtools reads systemd-boot and the
//!   loader entry from it; disk.qcow2: qemu-img check is clean and qemu-img
//!   compare finds it equal to disk.raw; disk.vhd: whole MiB, its footer
//!   checksum right; disk.gce.tar.gz holds disk.raw and nothing else. A second
//!   build gives identical disk.raw, disk.qcow2 and disk.gce.tar.gz.
//! - Both arches boot disk.raw (grown to 1 GiB, as a cloud disk is) and
//!   disk.qcow2 (through a 1 GiB overlay): systemd-boot starts slot A, the
//!   initramfs finds root A by PARTLABEL, the node makes its data partition
//!   in the rest of the disk and its stand-in k3s runs with the seed's
//!   hostname, role and k3s map.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";

/// The node config the seed carries.
const SEED_CONFIG: &str = "\
role: \"server\"
k3s:
  node-label: [\"kiln.test/cloud=seeded\"]
  write-kubeconfig-mode: \"0640\"
";
/// Its k3s map as config.yaml must hold it (kiln seed writes compact JSON).
const SEED_K3S: &str =
    "node-label: [\"kiln.test/cloud=seeded\"]\nwrite-kubeconfig-mode: \"0640\"\n";

/// `kiln seed` with SEED_CONFIG and the hostname cloud-seeded, in `dir`.
fn make_seed(dir: &Path) -> PathBuf {
    let config = dir.join("node.yaml");
    std::fs::write(&config, SEED_CONFIG).unwrap();
    let seed = dir.join("seed.img");
    let (ok, out, err) = kiln(
        &[
            "seed",
            seed.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--hostname",
            "cloud-seeded",
        ],
        &[],
    );
    assert!(ok, "kiln seed failed:\n{out}\n{err}");
    seed
}

/// One guest at a time: two TCG guests on two cores crawl.
static ONE_GUEST: Mutex<()> = Mutex::new(());

/// images/cloud-<arch>.toml, built once per test binary.
fn image(arch: &str) -> &'static (PathBuf, HttpServer) {
    static X86_64: OnceLock<(PathBuf, HttpServer)> = OnceLock::new();
    static AARCH64: OnceLock<(PathBuf, HttpServer)> = OnceLock::new();
    let cell = if arch == "aarch64" { &AARCH64 } else { &X86_64 };
    cell.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cloud-disk-{arch}"));
        let _ = std::fs::remove_dir_all(&dir);
        let server = release_server(&dir.join("www"));
        let name = format!("cloud-{arch}");
        let image = build_spec(
            &format!("images/{name}.toml"),
            &name,
            &dir.join("out"),
            &server,
            &[],
        );
        (image, server)
    })
}

fn missing(test: &str, tools: &[(&str, &str)]) -> bool {
    for (prog, pkg) in tools {
        if !have(prog) {
            skip(
                test,
                &format!("{prog} is not installed (apt-get install {pkg})"),
            );
            return true;
        }
    }
    false
}

#[test]
fn cloud_x86_64_formats_check_clean_and_reproduce() {
    let test = "cloud_x86_64 formats";
    let (image, server) = image("x86_64");
    let tmp = tempfile::tempdir().unwrap();
    let again = build_spec(
        "images/cloud-x86_64.toml",
        "cloud-x86_64",
        &tmp.path().join("out"),
        server,
        &[],
    );
    for f in ["disk.raw", "disk.qcow2", "disk.gce.tar.gz", "disk.vhd"] {
        assert_eq!(
            kiln_builder::hash_file(&image.join(f)).unwrap(),
            kiln_builder::hash_file(&again.join(f)).unwrap(),
            "two builds give one {f}"
        );
    }
    std::fs::remove_dir_all(tmp.path().join("out")).unwrap();
    let m = manifest(image);
    let names: Vec<&str> = m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["disk.gce.tar.gz", "disk.qcow2", "disk.raw", "disk.vhd"],
        "{m}"
    );
    if missing(
        test,
        &[
            ("sfdisk", "fdisk"),
            ("fsck.vfat", "dosfstools"),
            ("mdir", "mtools"),
            ("qemu-img", "qemu-utils"),
            ("tar", "tar"),
        ],
    ) {
        return;
    }
    let raw = image.join("disk.raw");
    let r = raw.to_str().unwrap();
    let verify = run(Command::new("sfdisk").args(["--verify", r]));
    assert!(verify.contains("No errors detected"), "{verify}");
    let json: serde_json::Value =
        serde_json::from_str(&run(Command::new("sfdisk").args(["--json", r]))).unwrap();
    let t = &json["partitiontable"];
    assert_eq!(t["label"], "gpt");
    use kiln_builder::disk::{derived_guid, guid_text};
    assert_eq!(t["id"], guid_text(&derived_guid("cloud-x86_64", "disk")));
    let parts = t["partitions"].as_array().unwrap();
    let want = [
        ("kiln-esp", kiln_builder::disk::TYPE_ESP),
        ("kiln-root-a", kiln_builder::disk::TYPE_ROOT_X86_64),
        ("kiln-root-b", kiln_builder::disk::TYPE_ROOT_X86_64),
    ];
    assert_eq!(parts.len(), 3, "{json}");
    for (p, (name, ty)) in parts.iter().zip(want) {
        assert_eq!(p["name"], name, "{json}");
        assert_eq!(p["type"], ty, "{json}");
        assert_eq!(
            p["uuid"],
            guid_text(&derived_guid("cloud-x86_64", name)),
            "{json}"
        );
        assert_eq!(p["start"].as_u64().unwrap() % 2048, 0, "MiB-aligned");
    }
    // The ESP, checked and read in place (mtools' @@offset).
    let esp_at = parts[0]["start"].as_u64().unwrap() * 512;
    let esp = tmp.path().join("esp.fat");
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&raw).unwrap();
        f.seek(SeekFrom::Start(esp_at)).unwrap();
        let mut out = std::fs::File::create(&esp).unwrap();
        std::io::copy(&mut f.take(256 << 20), &mut out).unwrap();
    }
    run(Command::new("fsck.vfat").arg("-n").arg(&esp));
    let at = format!("{r}@@{esp_at}");
    let listing = run(Command::new("mdir").args(["-/", "-b", "-i", &at, "::/"]));
    for f in [
        "::/EFI/BOOT/BOOTX64.EFI",
        "::/loader/loader.conf",
        "::/loader/entries/kiln-a.conf",
        "::/loader/entries/kiln-b.conf",
        "::/kiln/a/vmlinuz",
        "::/kiln/a/initrd.img",
        "::/kiln/b/vmlinuz",
    ] {
        assert!(listing.lines().any(|l| l.trim() == f), "{f} in:\n{listing}");
    }
    let entry = run(Command::new("mtype").args(["-i", &at, "::/loader/entries/kiln-a.conf"]));
    assert!(
        entry.contains("options kiln.root=PARTLABEL=kiln-root-a "),
        "{entry}"
    );

    let qcow2 = image.join("disk.qcow2");
    let q = qcow2.to_str().unwrap();
    run(Command::new("qemu-img").args(["check", "-f", "qcow2", q]));
    let same = run(Command::new("qemu-img").args(["compare", "-f", "raw", r, "-F", "qcow2", q]));
    assert!(same.contains("Images are identical"), "{same}");

    // VHD: the raw disk, zeros to a whole MiB, the 512-byte footer.
    let vhd = std::fs::read(image.join("disk.vhd")).unwrap();
    let (body, footer) = vhd.split_at(vhd.len() - 512);
    assert_eq!(body.len() % (1 << 20), 0, "whole MiB");
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(
        u64::from_be_bytes(footer[48..56].try_into().unwrap()),
        body.len() as u64,
        "current size"
    );
    assert_eq!(
        u32::from_be_bytes(footer[60..64].try_into().unwrap()),
        2,
        "fixed"
    );
    let sum: u32 = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, b)| u32::from(*b))
        .sum();
    assert_eq!(
        u32::from_be_bytes(footer[64..68].try_into().unwrap()),
        !sum,
        "footer checksum"
    );
    let raw_bytes = std::fs::read(&raw).unwrap();
    assert!(
        body[..raw_bytes.len()] == raw_bytes[..],
        "the VHD holds disk.raw"
    );

    let list =
        run(Command::new("tar").args(["-tzf", image.join("disk.gce.tar.gz").to_str().unwrap()]));
    assert_eq!(list, "disk.raw\n", "the GCE tarball holds disk.raw only");
}

/// Boots `disk` (raw or qcow2) under the arch's UEFI firmware with `seed`
/// as a second disk; returns the console once the stand-in k3s has recorded
/// its start and the node reported k3s-ready.
fn boot_uefi(arch: &str, disk: &Path, format: &str, seed: &Path, work: &Path) -> String {
    boot_until_ready(uefi_qemu(
        arch,
        disk,
        format,
        Some(seed),
        work,
        false,
        "",
        &[],
    ))
}

/// QEMU booting `disk` under the arch's UEFI firmware (the disk is drive
/// `disk0` for the monitor), `seed` a second disk; the guest may restart
/// itself when `reboots` (a slot that fails restarts so that the boot loader
/// counts its try). `netdev` is added to the user-mode network's options,
/// `extra` to QEMU's arguments.
#[allow(clippy::too_many_arguments)]
fn uefi_qemu(
    arch: &str,
    disk: &Path,
    format: &str,
    seed: Option<&Path>,
    work: &Path,
    reboots: bool,
    netdev: &str,
    extra: &[&str],
) -> Command {
    let (bin, code, vars, machine): (&str, &str, &str, &[&str]) = match arch {
        "x86_64" => (
            "qemu-system-x86_64",
            OVMF_CODE,
            OVMF_VARS,
            &["-machine", "q35", "-cpu", "max"],
        ),
        _ => (
            "qemu-system-aarch64",
            AAVMF_CODE,
            AAVMF_VARS,
            &["-machine", "virt", "-cpu", "cortex-a72"],
        ),
    };
    let my_vars = work.join("vars.fd");
    std::fs::copy(vars, &my_vars).unwrap();
    let mut q = Command::new(bin);
    q.args(machine)
        .args(["-m", "1024", "-smp", "2", "-nographic", "-accel", "tcg"]);
    if !reboots {
        q.arg("-no-reboot");
    }
    q.args([
        "-drive",
        &format!("if=pflash,format=raw,readonly=on,file={code}"),
        "-drive",
        &format!("if=pflash,format=raw,file={}", my_vars.display()),
        "-drive",
        &format!("file={},format={format},if=virtio,id=disk0", disk.display()),
        "-netdev",
        &format!("user,id=n0{netdev}"),
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
    ])
    .args(extra);
    if let Some(seed) = seed {
        q.args([
            "-drive",
            &format!("file={},format=raw,if=virtio,readonly=on", seed.display()),
        ]);
    }
    q
}

/// Starts the guest `q` (one at a time); returns its console once k3s is
/// ready.
fn boot_until_ready(q: Command) -> String {
    let _one = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let mut guest = Guest::start(q);
    guest.wait_for("k3s-standin: config-end", Duration::from_secs(400));
    guest.wait_for("kiln: stage=k3s-ready\n", Duration::from_secs(120));
    guest.console()
}

fn check_boot(console: &str, what: &str) {
    for want in [
        "kiln: root PARTLABEL=kiln-root-a is /dev/vda2 on /dev/vda",
        "kiln: making the data partition: /dev/vda partition 4",
        "kiln: data partition /dev/vda4 holds /var/lib/rancher and /var/lib/kiln",
        "kiln: node settings: user-data of the NoCloud seed /dev/vdb",
        "kiln: hostname cloud-seeded, role server",
        "kiln: stage=config-settings",
        "k3s-standin: args=server",
        "k3s-standin: hostname=cloud-seeded",
        "k3s-standin: rancher-on=/dev/vda4",
    ] {
        assert!(
            console.contains(want),
            "{what}: {want:?} on the console:\n{console}"
        );
    }
    assert_eq!(
        between(
            console,
            "k3s-standin: config-begin\n",
            "k3s-standin: config-end"
        ),
        SEED_K3S,
        "{what}: k3s' config.yaml is the seed's k3s map"
    );
}

fn boots_raw_and_qcow2(arch: &str) {
    let test = format!("cloud_{arch} boot");
    let (code, pkg, bin) = match arch {
        "x86_64" => (OVMF_CODE, "ovmf", "qemu-system-x86_64"),
        _ => (AAVMF_CODE, "qemu-efi-aarch64", "qemu-system-aarch64"),
    };
    if missing(
        &test,
        &[
            (
                bin,
                if arch == "x86_64" {
                    "qemu-system-x86"
                } else {
                    "qemu-system-arm"
                },
            ),
            ("qemu-img", "qemu-utils"),
            ("sfdisk", "fdisk"),
        ],
    ) {
        return;
    }
    if !Path::new(code).exists() {
        skip(
            &test,
            &format!("{code} is not installed (apt-get install {pkg})"),
        );
        return;
    }
    let (image, _) = image(arch);
    let tmp = tempfile::tempdir().unwrap();
    let seed = make_seed(tmp.path());

    // disk.raw on a 1 GiB cloud disk.
    let raw = tmp.path().join("disk.raw");
    grown_copy(&image.join("disk.raw"), &raw, 1 << 30);
    let work = tmp.path().join("raw");
    std::fs::create_dir_all(&work).unwrap();
    let console = boot_uefi(arch, &raw, "raw", &seed, &work);
    check_boot(&console, &format!("{arch} disk.raw"));
    let r = raw.to_str().unwrap();
    let verify = run(Command::new("sfdisk").args(["--verify", r]));
    assert!(verify.contains("No errors detected"), "{verify}");
    let json: serde_json::Value =
        serde_json::from_str(&run(Command::new("sfdisk").args(["--json", r]))).unwrap();
    let parts = json["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 4, "{json}");
    assert_eq!(parts[3]["name"], "kiln-data", "{json}");
    let end = (parts[3]["start"].as_u64().unwrap() + parts[3]["size"].as_u64().unwrap()) * 512;
    assert!(
        end > (1 << 30) - (2 << 20) && end <= (1 << 30) - 33 * 512,
        "the data partition fills the disk: ends at {end}"
    );

    // disk.qcow2 through a 1 GiB overlay (the artifact is left as built).
    let overlay = tmp.path().join("overlay.qcow2");
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        image.join("disk.qcow2").to_str().unwrap(),
        "-F",
        "qcow2",
        overlay.to_str().unwrap(),
        "1G",
    ]));
    let work = tmp.path().join("qcow2");
    std::fs::create_dir_all(&work).unwrap();
    let console = boot_uefi(arch, &overlay, "qcow2", &seed, &work);
    check_boot(&console, &format!("{arch} disk.qcow2"));
}

#[test]
fn cloud_x86_64_boots_raw_and_qcow2_with_a_seed() {
    boots_raw_and_qcow2("x86_64");
}

#[test]
fn cloud_aarch64_boots_raw_and_qcow2_with_a_seed() {
    boots_raw_and_qcow2("aarch64");
}

/// The loader entries on a kiln disk's ESP (at 1 MiB), by mtools.
fn loader_entries(disk: &Path) -> Vec<String> {
    let at = format!("{}@@1M", disk.display());
    let out = run(Command::new("mdir").args(["-b", "-i", &at, "::/loader/entries"]));
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("::/loader/entries/"))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// A copy of the image (disk.raw and a manifest listing it) whose root A's
/// squashfs has its last 128 KiB (its tables) overwritten: it does not mount.
fn broken_image(image: &Path, to: &Path) -> PathBuf {
    let dir = to.join("cloud-x86_64");
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("disk.raw");
    std::fs::copy(image.join("disk.raw"), &raw).unwrap();
    let json: serde_json::Value = serde_json::from_str(&run(
        Command::new("sfdisk").args(["--json", raw.to_str().unwrap()])
    ))
    .unwrap();
    let start = json["partitiontable"]["partitions"][1]["start"]
        .as_u64()
        .unwrap()
        * 512;
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&raw)
            .unwrap();
        let mut sb = [0u8; 96];
        f.seek(SeekFrom::Start(start)).unwrap();
        f.read_exact(&mut sb).unwrap();
        assert_eq!(&sb[..4], b"hsqs");
        let len = u64::from_le_bytes(sb[40..48].try_into().unwrap());
        f.seek(SeekFrom::Start(start + len - (128 << 10))).unwrap();
        f.write_all(&vec![0xde; 128 << 10]).unwrap();
    }
    let mut m = manifest(image);
    let (sha256, size) = kiln_builder::hash_file(&raw).unwrap();
    m["artifacts"] = serde_json::json!([{"name": "disk.raw", "sha256": sha256, "size": size}]);
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    dir
}

/// A/B: slot B written with a root that does not mount boots three times,
/// restarts each time, and the node comes back on A; B written again with
/// the good image boots and marks itself good.
#[test]
fn cloud_x86_64_ab_update_falls_back_then_switches() {
    let test = "cloud_x86_64 A/B";
    if missing(
        test,
        &[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("sfdisk", "fdisk"),
            ("mdir", "mtools"),
        ],
    ) || !Path::new(OVMF_CODE).exists()
    {
        skip(test, "needs qemu-system-x86, fdisk, mtools and ovmf");
        return;
    }
    let (image, _) = image("x86_64");
    let tmp = tempfile::tempdir().unwrap();
    let seed = make_seed(tmp.path());
    let disk = tmp.path().join("disk.raw");
    grown_copy(&image.join("disk.raw"), &disk, 1 << 30);
    let d = disk.to_str().unwrap();
    assert_eq!(loader_entries(&disk), ["kiln-a.conf", "kiln-b.conf"]);

    // B with a root that does not mount.
    let broken = broken_image(image, &tmp.path().join("broken"));
    let (ok, out, err) = kiln(&["update", d, broken.to_str().unwrap()], &[]);
    assert!(ok, "kiln update failed:\n{out}\n{err}");
    assert!(out.contains("slot b holds"), "{out}");
    assert_eq!(loader_entries(&disk), ["kiln-a.conf", "kiln-b+3.conf"]);
    // A slot on trial is not overwritten.
    let (ok, _, err) = kiln(&["update", d, image.to_str().unwrap()], &[]);
    assert!(!ok && err.contains("slot b is on trial"), "{err}");

    // Boot: B three times, then A. The node keeps running on A.
    let work = tmp.path().join("boot");
    std::fs::create_dir_all(&work).unwrap();
    let monitor = work.join("monitor.sock");
    let mut q = uefi_qemu("x86_64", &disk, "raw", Some(&seed), &work, true, "", &[]);
    q.args([
        "-monitor",
        &format!("unix:{},server,nowait", monitor.display()),
    ]);
    let _one = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let mut guest = Guest::start(q);
    guest.wait_for("kiln: stage=k3s-ready\n", Duration::from_secs(600));
    let console = guest.console();
    assert_eq!(
        console
            .matches("kiln: root PARTLABEL=kiln-root-b is /dev/vda3")
            .count(),
        3,
        "three tries of B:\n{console}"
    );
    assert_eq!(
        console
            .matches("restarting in 10 s (kiln.onfail=reboot)")
            .count(),
        3
    );
    let last = &console[console.rfind("Linux version").unwrap()..];
    assert!(
        last.contains("kiln: root PARTLABEL=kiln-root-a is /dev/vda2")
            && last.contains("kiln: stage=k3s-ready"),
        "back on A:\n{last}"
    );
    assert_eq!(loader_entries(&disk), ["kiln-a.conf", "kiln-b+0-3.conf"]);
    let before = data_partition_end(&disk);
    assert!(before > (1 << 30) - (2 << 20), "{before}");

    // While the node runs on A: B gets the good image, the disk grows (a
    // cloud volume resized), and the machine is reset. B boots, grows the
    // data partition, and k3s started marks it good.
    let (ok, out, err) = kiln(&["update", d, image.to_str().unwrap()], &[]);
    assert!(ok, "kiln update failed:\n{out}\n{err}");
    assert_eq!(loader_entries(&disk), ["kiln-a.conf", "kiln-b+3.conf"]);
    let seen = console.len();
    hmp(&monitor, "block_resize disk0 1536M");
    hmp(&monitor, "system_reset");
    guest.wait_for("kiln: slot b marked good", Duration::from_secs(400));
    let start = Instant::now();
    while !guest.console()[seen..].contains("kiln: stage=k3s-ready\n") {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no k3s-ready on B:\n{}",
            &guest.console()[seen..]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let console = guest.console()[seen..].to_string();
    drop(guest);
    for want in [
        "kiln: root PARTLABEL=kiln-root-b is /dev/vda3",
        "kiln: data partition /dev/vda4 holds",
        "kiln: slot b marked good (kiln-b+2-1.conf -> kiln-b.conf)",
        "kiln: growing the data partition /dev/vda4",
        "kiln: data partition /dev/vda4 grown",
        "k3s-standin: hostname=cloud-seeded",
    ] {
        assert!(console.contains(want), "{want:?}:\n{console}");
    }
    assert!(!console.contains("restarting in 10 s"), "{console}");
    assert_eq!(loader_entries(&disk), ["kiln-a.conf", "kiln-b.conf"]);
    let verify = run(Command::new("sfdisk").args(["--verify", d]));
    assert!(verify.contains("No errors detected"), "{verify}");
    let after = data_partition_end(&disk);
    assert!(
        after > (3 << 29) - (2 << 20) && after <= (3 << 29) - 33 * 512,
        "the data partition grew to the disk's new end: {after}"
    );
}

/// Sends one command to QEMU's human monitor on a unix socket; returns what
/// it printed.
fn hmp(socket: &Path, command: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let read_prompt = |s: &mut std::os::unix::net::UnixStream| {
        let mut got = Vec::new();
        let mut b = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains("(qemu) ") {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "the monitor closed");
            got.extend_from_slice(&b[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    read_prompt(&mut s);
    s.write_all(format!("{command}\n").as_bytes()).unwrap();
    read_prompt(&mut s)
}

/// Where partition 4 (kiln-data) of a GPT disk ends, in bytes.
fn data_partition_end(disk: &Path) -> u64 {
    let json: serde_json::Value = serde_json::from_str(&run(
        Command::new("sfdisk").args(["--json", disk.to_str().unwrap()])
    ))
    .unwrap();
    let p = &json["partitiontable"]["partitions"][3];
    assert_eq!(p["name"], "kiln-data", "{json}");
    (p["start"].as_u64().unwrap() + p["size"].as_u64().unwrap()) * 512
}

/// No seed, on a machine whose firmware says it is an EC2 instance: the node
/// takes its config from the metadata service's user-data (IMDSv2: a token
/// by PUT, then the GET with it), served by the test on loopback and
/// reached through QEMU's guestfwd at 169.254.169.254:80.
#[test]
fn cloud_x86_64_reads_user_data_from_the_metadata_service() {
    let test = "cloud_x86_64 metadata service";
    if missing(
        test,
        &[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("busybox", "busybox"),
        ],
    ) {
        return;
    }
    if !Path::new(OVMF_CODE).exists() {
        skip(
            test,
            &format!("{OVMF_CODE} is not installed (apt-get install ovmf)"),
        );
        return;
    }
    let (image, _) = image("x86_64");
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    std::fs::create_dir_all(www.join("latest")).unwrap();
    std::fs::write(
        www.join("latest/user-data"),
        "hostname: \"imds-node\"\nrole: \"agent\"\nk3s:\n  server: \"https://10.0.2.100:6443\"\n  token: \"imds-token\"\n",
    )
    .unwrap();
    let imds = HttpServer::start(&www);
    imds.answers.lock().unwrap().insert(
        "/latest/api/token".into(),
        (200, "kiln-imds-session-1".into()),
    );
    let disk = tmp.path().join("disk.raw");
    grown_copy(&image.join("disk.raw"), &disk, 1 << 30);
    let work = tmp.path().join("boot");
    std::fs::create_dir_all(&work).unwrap();
    let console = boot_until_ready(uefi_qemu(
        "x86_64",
        &disk,
        "raw",
        None,
        &work,
        false,
        // slirp forwards only addresses of its own network: make it the
        // link-local one the metadata service lives in. One busybox nc per
        // connection carries it to the test's server on loopback.
        &format!(
            ",net=169.254.0.0/16,host=169.254.0.2,dhcpstart=169.254.0.15,\
             guestfwd=tcp:169.254.169.254:80-cmd:busybox nc 127.0.0.1 {}",
            imds.addr.port()
        ),
        &["-smbios", "type=1,manufacturer=Amazon EC2,product=t3.small"],
    ));
    for want in [
        "kiln: node settings: user-data of the metadata service 169.254.169.254",
        "kiln: hostname imds-node, role agent",
        "k3s-standin: args=agent",
        "k3s-standin: hostname=imds-node",
    ] {
        assert!(console.contains(want), "{want:?}:\n{console}");
    }
    assert_eq!(
        between(
            &console,
            "k3s-standin: config-begin\n",
            "k3s-standin: config-end"
        ),
        "server: \"https://10.0.2.100:6443\"\ntoken: \"imds-token\"\n"
    );
    let seen = imds.posts.lock().unwrap().clone();
    assert!(
        seen.iter().any(|(p, _)| p == "/latest/api/token"),
        "an IMDSv2 token was asked for: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(p, b)| p == "/latest/user-data" && b == "token=kiln-imds-session-1"),
        "user-data was asked for with the token: {seen:?}"
    );
}
