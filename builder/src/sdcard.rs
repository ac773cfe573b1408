//! Output "sdcard": `sdcard.img`, a Raspberry Pi 4/5 SD-card image.
//!
//! An MBR disk (disk id from the spec name):
//!
//! | # | type | start | size | holds |
//! | - | ---- | ----- | ---- | ----- |
//! | 1 | 0x0c FAT32 (LBA) | 4 MiB | 256 MiB | firmware, DTBs, overlays/, vmlinuz, initrd.img, config.txt, cmdline.txt, kiln.yaml |
//! | 2 | 0x83 | after 1 | rootfs.squashfs padded to a MiB | root A |
//! | 3 | 0x83 | after 2 | the same | root B (a copy of A for now) |
//!
//! The card's free space after partition 3 is left for the data partition
//! (4, ext4 labelled kiln-data), which the node makes at first boot and grows
//! when the card is larger than the partition. The boot partition's FAT volume id is
//! derived from the spec name and every FAT timestamp is SOURCE_DATE_EPOCH,
//! so the same spec and inputs give the same bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::fat;
use crate::tree::{Content, Kind, Tree};

pub const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// Where the boot partition starts (aligned for SD cards' erase blocks).
pub const BOOT_START: u64 = 4 * MIB;
pub const BOOT_SIZE: u64 = 256 * MIB;
pub const TYPE_FAT32_LBA: u8 = 0x0c;
pub const TYPE_LINUX: u8 = 0x83;
/// Where Debian's raspi-firmware package puts the Pi's boot firmware.
pub const FIRMWARE_DIR: &str = "usr/lib/raspi-firmware";
/// Files the boot partition must hold for a Pi 4 (the Pi 5 loads its
/// firmware from its EEPROM and needs only the DTB).
const PI4_FIRMWARE: &[&str] = &["start4.elf", "fixup4.dat"];

/// The MBR disk id (disk signature) of the image named `name`; partitions
/// are `PARTUUID=<id as 8 hex digits>-<nn>`.
pub fn disk_id(name: &str) -> u32 {
    derived_id("kiln sdcard disk id", name)
}

/// The boot partition's FAT volume id.
pub fn volume_id(name: &str) -> u32 {
    derived_id("kiln sdcard boot volume id", name)
}

fn derived_id(what: &str, name: &str) -> u32 {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("{what}\0{name}").as_bytes());
    let id = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    // 0 means "no id" to some tools.
    id.max(1)
}

/// `PARTUUID=` of partition `n` as Linux names it.
pub fn partuuid(disk_id: u32, n: u8) -> String {
    format!("{disk_id:08x}-{n:02}")
}

/// The node settings file at the root of the boot partition: any computer
/// can edit it (FAT), `kiln flash` writes it, and the node reads it at boot
/// (README, "Node settings on the boot partition").
pub const SETTINGS_FILE: &str = "kiln.yaml";

/// The settings file the image ships: comments only, so a node booted from
/// an unedited card runs as a standalone k3s server named after its MAC.
pub fn settings_template() -> String {
    "# kiln node settings, read by the node at every boot. Edit this file on\n\
     # any computer, or let `kiln flash --hostname --role --server --config`\n\
     # write it. The format is kiln's node config (YAML):\n\
     #\n\
     #   hostname: \"pi-01\"               # default: kiln-<mac without colons>\n\
     #   role: \"agent\"                   # server (default) or agent\n\
     #   server: \"http://10.0.0.1:8080\"  # a `kiln serve` that hands out the\n\
     #                                     # node config (cluster token, API)\n\
     #   k3s:                              # k3s' config.yaml, as it is\n\
     #     server: \"https://10.0.0.10:6443\"\n\
     #     token: \"...\"\n\
     #\n\
     # With `server:` the node asks that kiln serve for its config; hostname\n\
     # and role given here win over the served ones. Without it, this file is\n\
     # the whole node config.\n"
        .to_string()
}

/// config.txt: 64-bit mode, the UART, Debian's (upstream) kernel and device
/// trees, and the initramfs placed after the kernel.
pub fn config_txt() -> String {
    "# kiln: Raspberry Pi 4/5 boot configuration\n\
     arm_64bit=1\n\
     enable_uart=1\n\
     # Debian's kernel uses the upstream device trees (bcm2711-rpi-4-b.dtb, bcm2712-rpi-5-b.dtb).\n\
     upstream_kernel=1\n\
     kernel=vmlinuz\n\
     initramfs initrd.img followkernel\n"
        .to_string()
}

/// cmdline.txt: the consoles and the root partition A. With Debian's kernel
/// the Pi 4's serial console (GPIO 14/15, mini UART) is ttyS1 and the Pi 5's
/// debug UART is ttyAMA10; the kernel skips the one a board lacks, and the
/// last one present is /dev/console.
pub fn cmdline_txt(disk_id: u32, extra: &[String]) -> String {
    let mut s = format!(
        "console=tty1 console=ttyAMA10,115200 console=ttyS1,115200 kiln.root=PARTUUID={} rootwait",
        partuuid(disk_id, 2)
    );
    for a in extra {
        s.push(' ');
        s.push_str(a);
    }
    s.push('\n');
    s
}

/// Where a kernel package puts its device trees: Debian's trixie kernels in
/// /usr/lib/linux-image-<kver>/, newer ones (trixie-backports) in
/// /usr/lib/modules/<kver>/dtb/.
fn dtb_dirs(kver: &str) -> [String; 2] {
    [
        format!("usr/lib/linux-image-{kver}"),
        format!("usr/lib/modules/{kver}/dtb"),
    ]
}

/// The boot partition's files from the root tree: the raspi-firmware files,
/// the kernel's Raspberry Pi device trees (broadcom/bcm27*.dtb, bcm283*.dtb)
/// and its overlays/ if any, the kernel, the initramfs, config.txt and
/// cmdline.txt.
pub fn boot_files(
    tree: &Tree,
    kernel_version: &str,
    vmlinuz: Content,
    initrd: Content,
    cmdline: &str,
) -> Result<BTreeMap<String, Content>> {
    let mut files = BTreeMap::new();
    for (path, e) in tree.walk(FIRMWARE_DIR) {
        if let Kind::File(c) = &e.kind {
            let rel = &path[FIRMWARE_DIR.len() + 1..];
            files.insert(rel.to_string(), c.clone());
        }
    }
    for f in PI4_FIRMWARE {
        if !files.contains_key(*f) {
            bail!(
                "the root has no /{FIRMWARE_DIR}/{f}: an sdcard image needs the raspi-firmware \
                 package (component non-free-firmware) in [debian] packages"
            );
        }
    }
    let mut dtbs = 0;
    for dir in dtb_dirs(kernel_version) {
        let broadcom = format!("{dir}/broadcom");
        for (path, e) in tree.walk(&broadcom) {
            let Kind::File(c) = &e.kind else { continue };
            let rel = &path[broadcom.len() + 1..];
            if let Some(overlay) = rel.strip_prefix("overlays/") {
                files.insert(format!("overlays/{overlay}"), c.clone());
            } else if !rel.contains('/')
                && rel.ends_with(".dtb")
                && (rel.starts_with("bcm27") || rel.starts_with("bcm283"))
            {
                files.insert(rel.to_string(), c.clone());
                dtbs += 1;
            }
        }
        for (path, e) in tree.walk(&format!("{dir}/overlays")) {
            if let Kind::File(c) = &e.kind {
                let rel = &path[dir.len() + 1..];
                files.insert(rel.to_string(), c.clone());
            }
        }
    }
    if dtbs == 0 {
        bail!(
            "the kernel {kernel_version} has no Raspberry Pi device trees (looked in /{}/broadcom and /{}/broadcom)",
            dtb_dirs(kernel_version)[0],
            dtb_dirs(kernel_version)[1]
        );
    }
    files.insert("vmlinuz".into(), vmlinuz);
    files.insert("initrd.img".into(), initrd);
    files.insert("config.txt".into(), Content::from(config_txt().as_bytes()));
    files.insert("cmdline.txt".into(), Content::from(cmdline.as_bytes()));
    files.insert(
        SETTINGS_FILE.into(),
        Content::from(settings_template().as_bytes()),
    );
    Ok(files)
}

/// One partition of the image, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    pub start: u64,
    pub size: u64,
    pub kind: u8,
}

/// The partitions for a root of `root_len` bytes.
pub fn layout(root_len: u64) -> [Partition; 3] {
    let root_size = root_len.div_ceil(MIB).max(1) * MIB;
    let a = BOOT_START + BOOT_SIZE;
    [
        Partition {
            start: BOOT_START,
            size: BOOT_SIZE,
            kind: TYPE_FAT32_LBA,
        },
        Partition {
            start: a,
            size: root_size,
            kind: TYPE_LINUX,
        },
        Partition {
            start: a + root_size,
            size: root_size,
            kind: TYPE_LINUX,
        },
    ]
}

/// What goes on the card.
pub struct Card<'a> {
    pub disk_id: u32,
    pub volume_id: u32,
    pub epoch: u64,
    pub boot: &'a BTreeMap<String, Content>,
    /// The root squashfs, written to partitions 2 (A) and 3 (B).
    pub rootfs: &'a Path,
}

/// Writes the image to `path`.
pub fn write(path: &Path, card: &Card) -> Result<[Partition; 3]> {
    let root_len = std::fs::metadata(card.rootfs)
        .with_context(|| format!("opening {}", card.rootfs.display()))?
        .len();
    let parts = layout(root_len);
    let end = parts[2].start + parts[2].size;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(end)?;

    let mut mbr = mbrman::MBR::new_from(&mut f, SECTOR as u32, card.disk_id.to_le_bytes())
        .context("making the MBR")?;
    for (i, p) in parts.iter().enumerate() {
        mbr[i + 1] = mbrman::MBRPartitionEntry {
            boot: mbrman::BOOT_INACTIVE,
            first_chs: mbrman::CHS::empty(),
            sys: p.kind,
            last_chs: mbrman::CHS::empty(),
            starting_lba: u32::try_from(p.start / SECTOR).context("the card is too large")?,
            sectors: u32::try_from(p.size / SECTOR).context("a partition is too large")?,
        };
    }
    mbr.write_into(&mut f).context("writing the MBR")?;

    {
        let mut boot = fat::Slice::new(&mut f, parts[0].start, parts[0].size)?;
        fat::write_fat32(
            &mut boot,
            &fat::Volume {
                volume_id: card.volume_id,
                label: "KILN-BOOT",
                epoch: card.epoch,
                hidden_sectors: (parts[0].start / SECTOR) as u32,
                files: card.boot,
            },
        )
        .context("writing the boot partition")?;
    }
    copy_root(&mut f, card.rootfs, &[parts[1].start, parts[2].start])?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(parts)
}

/// Copies the root squashfs at `rootfs` to each of the byte offsets
/// `starts` of the disk image `f` (root A and root B), checking it did not
/// change meanwhile.
pub(crate) fn copy_root(f: &mut File, rootfs: &Path, starts: &[u64]) -> Result<()> {
    let mut root = File::open(rootfs).with_context(|| format!("opening {}", rootfs.display()))?;
    let len = root.metadata()?.len();
    for &start in starts {
        root.seek(SeekFrom::Start(0))?;
        f.seek(SeekFrom::Start(start))?;
        let n = std::io::copy(&mut root, f).context("copying the root into its partition")?;
        if n != len {
            bail!("{} changed while it was copied", rootfs.display());
        }
    }
    f.flush()?;
    Ok(())
}

/// A small card for tests: the Pi 4 firmware (start4.elf, fixup4.dat) and
/// device tree of a kernel "6.1-arm64", a kernel and initramfs of a few
/// bytes, and `root` as roots A and B; ids from `name`.
#[doc(hidden)]
pub fn write_sample(img: &Path, name: &str, root: &[u8]) -> Result<[Partition; 3]> {
    use crate::tree::Entry;
    let mut t = Tree::new();
    t.mkdir_p(FIRMWARE_DIR)?;
    for f in PI4_FIRMWARE {
        t.insert(
            &format!("{FIRMWARE_DIR}/{f}"),
            Entry::file(f.as_bytes().to_vec(), 0o644),
        )?;
    }
    t.mkdir_p("usr/lib/linux-image-6.1-arm64/broadcom")?;
    t.insert(
        "usr/lib/linux-image-6.1-arm64/broadcom/bcm2711-rpi-4-b.dtb",
        Entry::file(b"dtb".to_vec(), 0o644),
    )?;
    let id = disk_id(name);
    let boot = boot_files(
        &t,
        "6.1-arm64",
        Content::from(&b"KERNEL"[..]),
        Content::from(&b"INITRD"[..]),
        &cmdline_txt(id, &[]),
    )?;
    let rootfs = tempfile::NamedTempFile::new().context("making a temporary root")?;
    std::fs::write(rootfs.path(), root)?;
    write(
        img,
        &Card {
            disk_id: id,
            volume_id: volume_id(name),
            epoch: 1_735_689_600,
            boot: &boot,
            rootfs: rootfs.path(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Entry;
    use std::io::Read;

    fn small_root() -> Tree {
        let mut t = Tree::new();
        for f in [
            "start4.elf",
            "fixup4.dat",
            "bootcode.bin",
            "overlays/pi4-spidev.dtbo",
        ] {
            t.mkdir_p(&format!(
                "{FIRMWARE_DIR}/{}",
                f.rsplit_once('/').map_or("", |x| x.0)
            ))
            .unwrap();
            t.insert(
                &format!("{FIRMWARE_DIR}/{f}"),
                Entry::file(f.as_bytes().to_vec(), 0o644),
            )
            .unwrap();
        }
        t.mkdir_p("usr/lib/linux-image-6.1-arm64/broadcom").unwrap();
        for d in [
            "bcm2711-rpi-4-b.dtb",
            "bcm2712-rpi-5-b.dtb",
            "bcm4908-asus.dtb",
        ] {
            t.insert(
                &format!("usr/lib/linux-image-6.1-arm64/broadcom/{d}"),
                Entry::file(d.as_bytes().to_vec(), 0o644),
            )
            .unwrap();
        }
        t
    }

    fn card_bytes(dir: &Path, name: &str) -> (Vec<u8>, [Partition; 3]) {
        let tree = small_root();
        let id = disk_id("rpi4");
        let boot = boot_files(
            &tree,
            "6.1-arm64",
            Content::from(&b"KERNEL"[..]),
            Content::from(&b"INITRD"[..]),
            &cmdline_txt(id, &[]),
        )
        .unwrap();
        let rootfs = dir.join("rootfs.squashfs");
        std::fs::write(&rootfs, vec![0x5au8; 1_500_000]).unwrap();
        let img = dir.join(name);
        let parts = write(
            &img,
            &Card {
                disk_id: id,
                volume_id: volume_id("rpi4"),
                epoch: 1_735_689_600,
                boot: &boot,
                rootfs: &rootfs,
            },
        )
        .unwrap();
        (std::fs::read(&img).unwrap(), parts)
    }

    #[test]
    fn the_mbr_has_three_aligned_partitions_and_the_disk_id() {
        let d = tempfile::tempdir().unwrap();
        let (img, parts) = card_bytes(d.path(), "a.img");
        let mbr = mbrman::MBR::read_from(&mut std::io::Cursor::new(&img), 512).unwrap();
        assert_eq!(
            u32::from_le_bytes(mbr.header.disk_signature),
            disk_id("rpi4")
        );
        assert_eq!(&img[510..512], &[0x55, 0xaa]);
        let used: Vec<_> = mbr.iter().filter(|(_, p)| p.is_used()).collect();
        assert_eq!(used.len(), 3);
        let want = [
            (8192, 524288, 0x0c),
            (532480, 4096, 0x83),
            (536576, 4096, 0x83),
        ];
        for ((_, p), (lba, sectors, sys)) in used.iter().zip(want) {
            assert_eq!((p.starting_lba, p.sectors, p.sys), (lba, sectors, sys));
            assert_eq!(u64::from(p.starting_lba) * 512 % MIB, 0, "aligned to a MiB");
        }
        // Roots A and B hold the squashfs, zero-padded to the MiB.
        for p in &parts[1..] {
            let s = p.start as usize;
            assert!(img[s..s + 1_500_000].iter().all(|&b| b == 0x5a));
            assert!(img[s + 1_500_000..s + p.size as usize]
                .iter()
                .all(|&b| b == 0));
        }
        assert_eq!(img.len() as u64, parts[2].start + parts[2].size);
    }

    #[test]
    fn the_boot_partition_reads_back_and_two_builds_are_identical() {
        let d = tempfile::tempdir().unwrap();
        let (img, parts) = card_bytes(d.path(), "a.img");
        let (again, _) = card_bytes(d.path(), "b.img");
        assert!(img == again, "two writes of one card differ");

        let boot = &img[parts[0].start as usize..(parts[0].start + parts[0].size) as usize];
        let fs =
            fatfs::FileSystem::new(std::io::Cursor::new(boot.to_vec()), fatfs::FsOptions::new())
                .unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat32);
        assert_eq!(fs.volume_id(), volume_id("rpi4"));
        let root = fs.root_dir();
        let mut names: Vec<String> = root
            .iter()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "." && n != "..")
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "bcm2711-rpi-4-b.dtb",
                "bcm2712-rpi-5-b.dtb",
                "bootcode.bin",
                "cmdline.txt",
                "config.txt",
                "fixup4.dat",
                "initrd.img",
                "kiln.yaml",
                "overlays",
                "start4.elf",
                "vmlinuz"
            ]
        );
        let read = |p: &str| {
            let mut s = String::new();
            root.open_file(p).unwrap().read_to_string(&mut s).unwrap();
            s
        };
        assert_eq!(read("overlays/pi4-spidev.dtbo"), "overlays/pi4-spidev.dtbo");
        assert_eq!(read("vmlinuz"), "KERNEL");
        let config = read("config.txt");
        for line in [
            "arm_64bit=1",
            "kernel=vmlinuz",
            "initramfs initrd.img followkernel",
            "enable_uart=1",
        ] {
            assert!(config.lines().any(|l| l == line), "{line} in {config}");
        }
        let cmdline = read("cmdline.txt");
        assert!(
            cmdline.contains(&format!("kiln.root=PARTUUID={:08x}-02 ", disk_id("rpi4"))),
            "{cmdline}"
        );
        assert_eq!(cmdline.lines().count(), 1);
    }

    #[test]
    fn missing_firmware_is_named() {
        let e = boot_files(
            &Tree::new(),
            "6.1-arm64",
            Content::from(&b""[..]),
            Content::from(&b""[..]),
            "",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("raspi-firmware"), "{e}");
    }

    #[test]
    fn ids_derive_from_the_name() {
        assert_eq!(disk_id("rpi4"), disk_id("rpi4"));
        assert_ne!(disk_id("rpi4"), disk_id("rpi5"));
        assert_ne!(disk_id("rpi4"), volume_id("rpi4"));
        assert_eq!(partuuid(0xab, 2), "000000ab-02");
    }
}
