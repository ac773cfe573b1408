//! Output "disk": `disk.raw`, a GPT disk for clouds and servers that boot
//! from disk (UEFI).
//!
//! | # | name | type | holds |
//! | - | ---- | ---- | ----- |
//! | 1 | `kiln-esp` | EFI System | FAT32 `KILN-ESP`: systemd-boot (`EFI/BOOT/BOOT<ARCH>.EFI`), `loader/loader.conf`, `loader/entries/kiln-a.conf`, `kiln/a/vmlinuz`, `kiln/a/initrd.img` and the same for slot b |
//! | 2 | `kiln-root-a` | root (x86-64 or AArch64, the discoverable partitions spec) | `rootfs.squashfs` |
//! | 3 | `kiln-root-b` | the same | a copy of root A |
//!
//! The data partition (4, `kiln-data`) is made by the node at first boot in
//! the rest of the disk. Every GUID (disk, partitions) derives from the spec
//! name and the partition's name, the ESP's volume id from the name, every
//! FAT time is SOURCE_DATE_EPOCH: the same spec and inputs give the same
//! bytes.
//!
//! Slot A boots by default (`loader/entries/kiln-a.conf`, no boot counter:
//! it is known good, and its version is the newest); `kiln-b.conf` (one
//! version older) boots slot B, whose files are a copy of A's until an update
//! writes B with an entry that counts its tries (`kiln-b+3.conf`).

use std::collections::BTreeMap;

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::fat;
use crate::spec::Arch;
use crate::tree::{Content, Kind, Tree};

pub const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// The ESP: 1 MiB in, 256 MiB (two slots' kernels and initramfs fit with
/// room to spare; FAT32 needs at least ~33 MiB).
pub const ESP_START: u64 = MIB;
pub const ESP_SIZE: u64 = 256 * MIB;
/// Where Debian's systemd-boot-efi puts the boot loader.
pub const SYSTEMD_BOOT_DIR: &str = "usr/lib/systemd/boot/efi";

/// GPT partition type GUIDs.
pub const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const TYPE_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
pub const TYPE_ROOT_ARM64: &str = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE";
pub const TYPE_LINUX_DATA: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// The partitions' names (GPT partition labels: `kiln.root=PARTLABEL=`).
pub const ESP_NAME: &str = "kiln-esp";
pub const ROOT_A: &str = "kiln-root-a";
pub const ROOT_B: &str = "kiln-root-b";

/// A GUID in its on-disk (mixed-endian) byte order, from its text form.
pub fn guid_bytes(text: &str) -> Result<[u8; 16]> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || text.len() != 36 {
        bail!("{text:?} is not a GUID");
    }
    let b = hex::decode(&hex).with_context(|| format!("{text:?} is not a GUID"))?;
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&[b[3], b[2], b[1], b[0]]);
    out[4..6].copy_from_slice(&[b[5], b[4]]);
    out[6..8].copy_from_slice(&[b[7], b[6]]);
    out[8..16].copy_from_slice(&b[8..16]);
    Ok(out)
}

/// The text form (upper case) of on-disk GUID bytes.
pub fn guid_text(b: &[u8; 16]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
        b[14], b[15]
    )
}

/// A GUID (version 4 and variant bits set, on-disk order) derived from the
/// image name and what it names: `disk` or a partition's name.
pub fn derived_guid(image: &str, what: &str) -> [u8; 16] {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("kiln disk guid\0{image}\0{what}").as_bytes());
    let mut g = [0u8; 16];
    g.copy_from_slice(&h[..16]);
    // Text bytes 6-7 are on disk at 6-7 swapped: the version nibble is the
    // high nibble of on-disk byte 7; the variant is on-disk byte 8.
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

/// The ESP's FAT volume id.
pub fn esp_volume_id(image: &str) -> u32 {
    let g = derived_guid(image, "esp volume id");
    u32::from_le_bytes([g[0], g[1], g[2], g[3]]).max(1)
}

/// The UEFI removable-media path of the boot loader and Debian's name for it.
fn loader_names(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::X86_64 => ("EFI/BOOT/BOOTX64.EFI", "systemd-bootx64.efi"),
        Arch::Aarch64 => ("EFI/BOOT/BOOTAA64.EFI", "systemd-bootaa64.efi"),
    }
}

/// The kernel command line of a slot: the root by its partition name and
/// the consoles clouds log (the last is /dev/console).
pub fn slot_cmdline(arch: Arch, slot: char) -> String {
    let serial = match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    };
    format!(
        "kiln.root=PARTLABEL=kiln-root-{slot} kiln.onfail=reboot console=tty0 console={serial},115200 rootwait"
    )
}

/// A slot's loader entry (Boot Loader Specification, type 1).
pub fn entry(image: &str, slot: char, version: &str, cmdline: &str) -> String {
    format!(
        "title kiln {image} (slot {slot})\n\
         sort-key kiln\n\
         version {version}\n\
         linux /kiln/{slot}/vmlinuz\n\
         initrd /kiln/{slot}/initrd.img\n\
         options {cmdline}\n"
    )
}

/// loader.conf: boot the preferred kiln entry at once (the newest version
/// among those not marked bad by boot counting), no editor.
pub fn loader_conf() -> String {
    "timeout 0\ndefault kiln-*\neditor no\nauto-entries no\nauto-firmware no\n".to_string()
}

/// The ESP's files: systemd-boot from the root (Debian's systemd-boot-efi),
/// loader.conf, slot A's entry, and both slots' kernel and initramfs.
pub fn esp_files(
    tree: &Tree,
    arch: Arch,
    image: &str,
    version: u64,
    vmlinuz: Content,
    initrd: Content,
) -> Result<BTreeMap<String, Content>> {
    let (removable, debian_name) = loader_names(arch);
    let path = format!("{SYSTEMD_BOOT_DIR}/{debian_name}");
    let loader = match tree.get(&path).map(|e| &e.kind) {
        Some(Kind::File(c)) => c.clone(),
        _ => bail!(
            "the root has no /{path}: a disk image needs the systemd-boot-efi package in [debian] packages"
        ),
    };
    let mut files = BTreeMap::new();
    files.insert(removable.to_string(), loader.clone());
    files.insert(format!("EFI/systemd/{debian_name}"), loader);
    files.insert(
        "loader/loader.conf".into(),
        Content::from(loader_conf().as_bytes()),
    );
    // Slot A boots; slot B (the same files until an update) is the older,
    // second entry of the menu.
    files.insert(
        "loader/entries/kiln-a.conf".into(),
        Content::from(entry(image, 'a', &version.to_string(), &slot_cmdline(arch, 'a')).as_bytes()),
    );
    files.insert(
        "loader/entries/kiln-b.conf".into(),
        Content::from(
            entry(
                image,
                'b',
                &version.saturating_sub(1).to_string(),
                &slot_cmdline(arch, 'b'),
            )
            .as_bytes(),
        ),
    );
    for slot in ["a", "b"] {
        files.insert(format!("kiln/{slot}/vmlinuz"), vmlinuz.clone());
        files.insert(format!("kiln/{slot}/initrd.img"), initrd.clone());
    }
    Ok(files)
}

/// One partition, in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub name: &'static str,
    pub type_guid: &'static str,
    pub start: u64,
    pub size: u64,
}

/// The partitions for a root of `root_len` bytes, and the disk's size (the
/// backup GPT in the last MiB).
pub fn layout(arch: Arch, root_len: u64) -> ([Partition; 3], u64) {
    let root_type = match arch {
        Arch::X86_64 => TYPE_ROOT_X86_64,
        Arch::Aarch64 => TYPE_ROOT_ARM64,
    };
    let root_size = root_len.div_ceil(MIB).max(1) * MIB;
    let a = ESP_START + ESP_SIZE;
    let parts = [
        Partition {
            name: ESP_NAME,
            type_guid: TYPE_ESP,
            start: ESP_START,
            size: ESP_SIZE,
        },
        Partition {
            name: ROOT_A,
            type_guid: root_type,
            start: a,
            size: root_size,
        },
        Partition {
            name: ROOT_B,
            type_guid: root_type,
            start: a + root_size,
            size: root_size,
        },
    ];
    (parts, a + 2 * root_size + MIB)
}

/// What goes on the disk.
pub struct Disk<'a> {
    pub image: &'a str,
    pub arch: Arch,
    pub epoch: u64,
    pub esp: &'a BTreeMap<String, Content>,
    /// The root squashfs, written to root A and root B.
    pub rootfs: &'a Path,
}

/// Writes the disk image to `path`; returns its partitions.
pub fn write(path: &Path, disk: &Disk) -> Result<[Partition; 3]> {
    let root_len = std::fs::metadata(disk.rootfs)
        .with_context(|| format!("opening {}", disk.rootfs.display()))?
        .len();
    let (parts, size) = layout(disk.arch, root_len);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;

    let mut gpt = gptman::GPT::new_from(&mut f, SECTOR, derived_guid(disk.image, "disk"))
        .context("making the GPT")?;
    for (i, p) in parts.iter().enumerate() {
        gpt[(i + 1) as u32] = gptman::GPTPartitionEntry {
            partition_type_guid: guid_bytes(p.type_guid)?,
            unique_partition_guid: derived_guid(disk.image, p.name),
            starting_lba: p.start / SECTOR,
            ending_lba: (p.start + p.size) / SECTOR - 1,
            attribute_bits: 0,
            partition_name: p.name.into(),
        };
    }
    gpt.write_into(&mut f).context("writing the GPT")?;
    gptman::GPT::write_protective_mbr_into(&mut f, SECTOR).context("writing the protective MBR")?;

    {
        let mut esp = fat::Slice::new(&mut f, parts[0].start, parts[0].size)?;
        fat::write_fat32(
            &mut esp,
            &fat::Volume {
                volume_id: esp_volume_id(disk.image),
                label: "KILN-ESP",
                epoch: disk.epoch,
                hidden_sectors: (parts[0].start / SECTOR) as u32,
                files: disk.esp,
            },
        )
        .context("writing the EFI system partition")?;
    }
    crate::sdcard::copy_root(&mut f, disk.rootfs, &[parts[1].start, parts[2].start])?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Entry;

    #[test]
    fn guids_round_trip_and_derive_from_names() {
        let g = guid_bytes(TYPE_ESP).unwrap();
        assert_eq!(
            g,
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
        assert_eq!(guid_text(&g), TYPE_ESP);
        let a = derived_guid("cloud", ROOT_A);
        assert_eq!(a, derived_guid("cloud", ROOT_A));
        assert_ne!(a, derived_guid("cloud", ROOT_B));
        assert_ne!(a, derived_guid("other", ROOT_A));
        let t = guid_text(&a);
        assert_eq!(&t[14..15], "4", "version 4: {t}");
        assert!("89AB".contains(&t[19..20]), "variant: {t}");
        assert!(guid_bytes("nope").is_err());
    }

    fn small_disk(dir: &Path, name: &str) -> (Vec<u8>, [Partition; 3]) {
        let mut t = Tree::new();
        t.mkdir_p(SYSTEMD_BOOT_DIR).unwrap();
        t.insert(
            &format!("{SYSTEMD_BOOT_DIR}/systemd-bootx64.efi"),
            Entry::file(b"MZ systemd-boot".to_vec(), 0o644),
        )
        .unwrap();
        let esp = esp_files(
            &t,
            Arch::X86_64,
            "cloud",
            1_735_689_600,
            Content::from(&b"KERNEL"[..]),
            Content::from(&b"INITRD"[..]),
        )
        .unwrap();
        let rootfs = dir.join("rootfs.squashfs");
        std::fs::write(&rootfs, vec![0x5au8; 1_500_000]).unwrap();
        let img = dir.join(name);
        let parts = write(
            &img,
            &Disk {
                image: "cloud",
                arch: Arch::X86_64,
                epoch: 1_735_689_600,
                esp: &esp,
                rootfs: &rootfs,
            },
        )
        .unwrap();
        (std::fs::read(&img).unwrap(), parts)
    }

    #[test]
    fn the_gpt_has_the_esp_and_two_roots_and_two_writes_are_identical() {
        let d = tempfile::tempdir().unwrap();
        let (img, parts) = small_disk(d.path(), "a.raw");
        let (again, _) = small_disk(d.path(), "b.raw");
        assert!(img == again, "two writes differ");
        let gpt = gptman::GPT::find_from(&mut std::io::Cursor::new(&img)).unwrap();
        assert_eq!(gpt.header.disk_guid, derived_guid("cloud", "disk"));
        let used: Vec<_> = gpt.iter().filter(|(_, p)| p.is_used()).collect();
        assert_eq!(used.len(), 3);
        for ((_, e), p) in used.iter().zip(&parts) {
            assert_eq!(e.partition_name.as_str(), p.name);
            assert_eq!(e.starting_lba * 512, p.start);
            assert_eq!(e.unique_partition_guid, derived_guid("cloud", p.name));
            assert_eq!(e.starting_lba * 512 % MIB, 0);
        }
        assert_eq!(
            used[1].1.partition_type_guid,
            guid_bytes(TYPE_ROOT_X86_64).unwrap()
        );
        // Protective MBR.
        assert_eq!(img[450], 0xee);
        assert_eq!(&img[510..512], &[0x55, 0xaa]);

        let esp = &img[parts[0].start as usize..(parts[0].start + parts[0].size) as usize];
        let fs =
            fatfs::FileSystem::new(std::io::Cursor::new(esp.to_vec()), fatfs::FsOptions::new())
                .unwrap();
        assert_eq!(fs.volume_label(), "KILN-ESP");
        let read = |p: &str| {
            use std::io::Read;
            let mut s = String::new();
            fs.root_dir()
                .open_file(p)
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            s
        };
        assert_eq!(read("EFI/BOOT/BOOTX64.EFI"), "MZ systemd-boot");
        assert_eq!(read("kiln/b/vmlinuz"), "KERNEL");
        let a = read("loader/entries/kiln-a.conf");
        assert!(a.contains("linux /kiln/a/vmlinuz\n"), "{a}");
        assert!(
            a.contains(
                "options kiln.root=PARTLABEL=kiln-root-a kiln.onfail=reboot console=tty0 console=ttyS0,115200"
            ),
            "{a}"
        );
        assert!(read("loader/loader.conf").contains("default kiln-*\n"));
        let b = read("loader/entries/kiln-b.conf");
        assert!(
            b.contains("version 1735689599\n") && b.contains("kiln.root=PARTLABEL=kiln-root-b "),
            "{b}"
        );
    }

    #[test]
    fn missing_systemd_boot_is_named() {
        let e = esp_files(
            &Tree::new(),
            Arch::Aarch64,
            "x",
            1,
            Content::from(&b""[..]),
            Content::from(&b""[..]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("systemd-bootaa64.efi") && e.contains("systemd-boot-efi"),
            "{e}"
        );
    }
}
