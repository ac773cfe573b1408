//! `kiln update DISK IMAGE`: A/B updates of a kiln disk (see `disk`).
//!
//! The new image's `disk.raw` (checked against its manifest.json first)
//! gives the new root (its root A partition: the squashfs, as long as its
//! superblock says), kernel and initramfs (its ESP's `kiln/a/`). They go
//! into the slot of DISK that is not the one it boots now, and a loader
//! entry with a boot counter, `loader/entries/kiln-<slot>+3.conf`, with a
//! higher version than any other, makes systemd-boot try it next:
//!
//! - each try decrements the counter (systemd-boot renames the file,
//!   `kiln-b+2-1.conf`); a node whose slot fails restarts
//!   (`kiln.onfail=reboot`), and after three failed tries the entry is bad
//!   (`kiln-b+0-3.conf`), sorted last: the other slot boots again;
//! - a node whose k3s starts marks its slot good (renames the entry to
//!   `kiln-b.conf`, `/usr/lib/kiln/data.sh`).
//!
//! The root is written and read back first, then the kernel and initramfs,
//! and the entry last: an update cut short leaves the disk booting what it
//! booted before. A slot still on trial (an entry with tries left) is not
//! overwritten, nor is the only good slot.
//!
//! DISK is a disk image file or a block device: a VM's disk, a server's
//! disk seen from another system, or the disk a node runs from (its root is
//! the other slot; the ESP and the slot written must not be mounted).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::disk::{self, ESP_NAME, ROOT_A, ROOT_B};
use crate::fat::Slice;
use crate::manifest::Manifest;

/// How many tries a new slot gets.
pub const TRIES: u32 = 3;

/// One loader entry file of a kiln disk's ESP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub file: String,
    pub slot: char,
    /// (tries left, tries done) when the entry counts its boots.
    pub counter: Option<(u32, u32)>,
    pub version: u64,
}

impl Entry {
    /// Good: no counter (marked good, or never counted).
    pub fn good(&self) -> bool {
        self.counter.is_none()
    }
    /// Bad: its tries are used up.
    pub fn bad(&self) -> bool {
        matches!(self.counter, Some((0, _)))
    }
}

/// Parses an entry's file name (`kiln-a.conf`, `kiln-b+3.conf`,
/// `kiln-b+2-1.conf`) and its `version` line. None for other files.
pub fn parse_entry(file: &str, text: &str) -> Option<Entry> {
    let stem = file.strip_prefix("kiln-")?.strip_suffix(".conf")?;
    let mut chars = stem.chars();
    let slot = chars.next().filter(|c| *c == 'a' || *c == 'b')?;
    let rest = chars.as_str();
    let counter = if rest.is_empty() {
        None
    } else {
        let c = rest.strip_prefix('+')?;
        let (left, done) = match c.split_once('-') {
            Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
            None => (c.parse().ok()?, 0),
        };
        Some((left, done))
    };
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("version "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Some(Entry {
        file: file.to_string(),
        slot,
        counter,
        version,
    })
}

/// Which slot an update writes, from the disk's entries: the slot that is
/// not the one booting now (the good entry of the highest version). Refuses
/// while a slot is on trial.
pub fn target_slot(entries: &[Entry]) -> Result<char> {
    if let Some(e) = entries.iter().find(|e| !e.good() && !e.bad()) {
        bail!(
            "slot {} is on trial ({} has tries left): boot it until it is marked good or bad before the next update",
            e.slot,
            e.file
        );
    }
    let current = entries
        .iter()
        .filter(|e| e.good())
        .max_by_key(|e| (e.version, e.slot))
        .context("no good loader entry on the ESP: is this a kiln disk?")?;
    Ok(if current.slot == 'a' { 'b' } else { 'a' })
}

/// The length of a squashfs from its superblock (bytes_used), checking its
/// magic.
pub fn squashfs_len(superblock: &[u8]) -> Result<u64> {
    if superblock.len() < 48 || &superblock[..4] != b"hsqs" {
        bail!("not a squashfs (no hsqs magic)");
    }
    Ok(u64::from_le_bytes(
        superblock[40..48].try_into().expect("8 bytes"),
    ))
}

/// The partitions (by number) of a block device that are mounted, from its
/// partitions' device numbers and the mount table. Pure: the caller reads
/// /sys and /proc/self/mountinfo.
pub fn mounted_partitions(
    partitions: &[(u32, (u32, u32))],
    mounts: &[crate::flash::Mount],
) -> Vec<(u32, String)> {
    partitions
        .iter()
        .filter_map(|(n, dev)| {
            mounts
                .iter()
                .find(|m| m.dev == *dev)
                .map(|m| (*n, m.mount_point.clone()))
        })
        .collect()
}

/// The partitions of the block device `dev` as (number, device number),
/// from sysfs.
fn sysfs_partitions(dev: &Path) -> Result<Vec<(u32, (u32, u32))>> {
    let real = std::fs::canonicalize(dev)?;
    let name = real
        .file_name()
        .and_then(|n| n.to_str())
        .context("a block device name")?
        .to_string();
    let base = Path::new("/sys/class/block").join(&name);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&base).with_context(|| format!("reading {}", base.display()))? {
        let p = e?.path();
        let (Ok(n), Ok(d)) = (
            std::fs::read_to_string(p.join("partition")),
            std::fs::read_to_string(p.join("dev")),
        ) else {
            continue;
        };
        let (a, b) = d.trim().split_once(':').context("a device number")?;
        out.push((n.trim().parse()?, (a.parse()?, b.parse()?)));
    }
    Ok(out)
}

/// What an update did.
#[derive(Debug)]
pub struct Report {
    pub slot: char,
    pub entry: String,
    pub version: u64,
    pub root_bytes: u64,
    pub root_sha256: String,
}

/// A partition of a GPT disk by name: (start, size) in bytes.
fn partition(gpt: &gptman::GPT, name: &str) -> Option<(u64, u64)> {
    gpt.iter()
        .find(|(_, p)| p.is_used() && p.partition_name.as_str() == name)
        .map(|(_, p)| {
            (
                p.starting_lba * gpt.sector_size,
                (p.ending_lba + 1 - p.starting_lba) * gpt.sector_size,
            )
        })
}

fn read_fat_file<D: Read + Write + Seek>(fs: &fatfs::FileSystem<D>, path: &str) -> Result<Vec<u8>> {
    let mut f = fs
        .root_dir()
        .open_file(path)
        .with_context(|| format!("no {path} on the ESP"))?;
    let mut b = Vec::new();
    f.read_to_end(&mut b)
        .with_context(|| format!("reading {path} from the ESP"))?;
    Ok(b)
}

/// The new image's root, kernel, initramfs and arch, from its disk.raw.
struct NewSlot {
    name: String,
    root: Vec<u8>,
    vmlinuz: Vec<u8>,
    initrd: Vec<u8>,
    root_type: [u8; 16],
    arch: crate::spec::Arch,
}

fn read_new(image: &Path) -> Result<NewSlot> {
    let m = Manifest::load(image)?;
    let raw = image.join("disk.raw");
    let want = m.artifact("disk.raw").with_context(|| {
        format!(
            "{} lists no disk.raw: build the image with outputs = [\"disk\", ...]",
            image.join(crate::manifest::FILE_NAME).display()
        )
    })?;
    let (sha, size) = crate::hash_file(&raw)?;
    if sha != want.sha256 || size != want.size {
        bail!(
            "{} does not match its manifest (sha256 {sha}, {size} bytes; the manifest says {}, {} bytes)",
            raw.display(),
            want.sha256,
            want.size
        );
    }
    let arch = match m.arch.as_str() {
        "x86_64" => crate::spec::Arch::X86_64,
        "aarch64" => crate::spec::Arch::Aarch64,
        a => bail!("{}: unknown arch {a}", image.display()),
    };
    let mut f = File::open(&raw).with_context(|| format!("opening {}", raw.display()))?;
    let gpt =
        gptman::GPT::find_from(&mut f).with_context(|| format!("{}: no GPT", raw.display()))?;
    let (ra, _) = partition(&gpt, ROOT_A)
        .with_context(|| format!("{}: no partition {ROOT_A}", raw.display()))?;
    let root_type = gpt
        .iter()
        .find(|(_, p)| p.partition_name.as_str() == ROOT_A)
        .map(|(_, p)| p.partition_type_guid)
        .unwrap_or_default();
    let mut sb = [0u8; 96];
    f.seek(SeekFrom::Start(ra))?;
    f.read_exact(&mut sb)?;
    let len = squashfs_len(&sb).with_context(|| format!("{}: root A", raw.display()))?;
    let mut root = vec![0u8; usize::try_from(len)?];
    f.seek(SeekFrom::Start(ra))?;
    f.read_exact(&mut root)
        .with_context(|| format!("reading root A of {}", raw.display()))?;
    let (es, el) = partition(&gpt, ESP_NAME)
        .with_context(|| format!("{}: no partition {ESP_NAME}", raw.display()))?;
    let esp = Slice::new(&mut f, es, el)?;
    let fs = fatfs::FileSystem::new(esp, fatfs::FsOptions::new())
        .with_context(|| format!("{}: the ESP is not FAT", raw.display()))?;
    let vmlinuz = read_fat_file(&fs, "kiln/a/vmlinuz")?;
    let initrd = read_fat_file(&fs, "kiln/a/initrd.img")?;
    Ok(NewSlot {
        name: m.name,
        root,
        vmlinuz,
        initrd,
        root_type,
        arch,
    })
}

/// Writes `bytes` into a FAT file, replacing it.
fn write_fat_file<D: Read + Write + Seek>(
    fs: &fatfs::FileSystem<D>,
    path: &str,
    bytes: &[u8],
) -> Result<()> {
    let mut f = fs
        .root_dir()
        .create_file(path)
        .with_context(|| format!("creating {path} on the ESP"))?;
    f.truncate()?;
    f.write_all(bytes)
        .with_context(|| format!("writing {path} on the ESP (is it full?)"))?;
    f.flush()?;
    Ok(())
}

/// Writes the new image into the inactive slot of `target`.
pub fn update(target: &Path, image: &Path) -> Result<Report> {
    let new = read_new(image)?;
    let meta = std::fs::metadata(target).with_context(|| format!("{}", target.display()))?;
    {
        use std::os::unix::fs::FileTypeExt;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            bail!(
                "{} is neither a disk image file nor a block device",
                target.display()
            );
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .with_context(|| format!("opening {} to write", target.display()))?;
    let gpt = gptman::GPT::find_from(&mut f)
        .with_context(|| format!("{}: no GPT (not a kiln disk)", target.display()))?;
    let number = |name: &str| {
        gpt.iter()
            .find(|(_, p)| p.is_used() && p.partition_name.as_str() == name)
            .map(|(i, _)| i)
    };
    // A disk a node runs from: its root (the other slot) and data partition
    // are in use, which is fine; the ESP and the slot written must not be.
    let busy = {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_block_device() {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            mounted_partitions(
                &sysfs_partitions(target)?,
                &crate::flash::parse_mountinfo(&mountinfo),
            )
        } else {
            Vec::new()
        }
    };
    let (es, el) = partition(&gpt, ESP_NAME).with_context(|| {
        format!(
            "{}: no partition {ESP_NAME} (not a kiln disk)",
            target.display()
        )
    })?;

    // The slots, from the ESP's loader entries.
    let entries = {
        let esp = Slice::new(&mut f, es, el)?;
        let fs = fatfs::FileSystem::new(esp, fatfs::FsOptions::new())
            .with_context(|| format!("{}: the ESP is not FAT", target.display()))?;
        let dir = fs
            .root_dir()
            .open_dir("loader/entries")
            .with_context(|| format!("{}: the ESP has no loader/entries", target.display()))?;
        let mut entries = Vec::new();
        for e in dir.iter() {
            let e = e?;
            let name = e.file_name();
            if !e.is_file() {
                continue;
            }
            let mut text = String::new();
            e.to_file().read_to_string(&mut text)?;
            if let Some(entry) = parse_entry(&name, &text) {
                entries.push(entry);
            }
        }
        entries
    };
    let slot = target_slot(&entries).with_context(|| format!("{}", target.display()))?;
    let name = if slot == 'a' { ROOT_A } else { ROOT_B };
    for part in [ESP_NAME, name] {
        if let Some((_, at)) = busy.iter().find(|(n, _)| Some(*n) == number(part)) {
            bail!(
                "{}: {part} is mounted at {at}; unmount it first",
                target.display()
            );
        }
    }
    let (rs, rl) = partition(&gpt, name)
        .with_context(|| format!("{}: no partition {name}", target.display()))?;
    let this_type = gpt
        .iter()
        .find(|(_, p)| p.partition_name.as_str() == name)
        .map(|(_, p)| p.partition_type_guid)
        .unwrap_or_default();
    if this_type != new.root_type {
        bail!(
            "{}: {name} is for another architecture than {} ({})",
            target.display(),
            image.display(),
            new.arch
        );
    }
    if new.root.len() as u64 > rl {
        bail!(
            "the new root ({} bytes) does not fit {name} of {} ({rl} bytes)",
            new.root.len(),
            target.display()
        );
    }

    // 1. The root, read back.
    f.seek(SeekFrom::Start(rs))?;
    f.write_all(&new.root)
        .with_context(|| format!("writing {name} of {}", target.display()))?;
    f.sync_all()?;
    let mut back = vec![0u8; new.root.len()];
    f.seek(SeekFrom::Start(rs))?;
    f.read_exact(&mut back)?;
    let root_sha256 = crate::sha256_hex(&new.root);
    if crate::sha256_hex(&back) != root_sha256 {
        bail!(
            "{name} of {} reads back differently from what was written",
            target.display()
        );
    }

    // 2. Kernel and initramfs; 3. the entry, last.
    let version = entries.iter().map(|e| e.version).max().unwrap_or(0) + 1;
    let entry_file = format!("kiln-{slot}+{TRIES}.conf");
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let esp = Slice::new(&mut f, es, el)?;
        let fs = fatfs::FileSystem::new(esp, crate::fat::options_at(now))?;
        write_fat_file(&fs, &format!("kiln/{slot}/vmlinuz"), &new.vmlinuz)?;
        write_fat_file(&fs, &format!("kiln/{slot}/initrd.img"), &new.initrd)?;
        for e in entries.iter().filter(|e| e.slot == slot) {
            fs.root_dir()
                .remove(&format!("loader/entries/{}", e.file))
                .with_context(|| format!("removing the old entry {}", e.file))?;
        }
        let text = disk::entry(
            &new.name,
            slot,
            &version.to_string(),
            &disk::slot_cmdline(new.arch, slot),
        );
        write_fat_file(
            &fs,
            &format!("loader/entries/{entry_file}"),
            text.as_bytes(),
        )?;
        fs.unmount().context("closing the ESP")?;
    }
    f.sync_all()
        .with_context(|| format!("syncing {}", target.display()))?;
    Ok(Report {
        slot,
        entry: entry_file,
        version,
        root_bytes: new.root.len() as u64,
        root_sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(file: &str, version: u64) -> Entry {
        parse_entry(file, &format!("title x\nversion {version}\n")).unwrap()
    }

    #[test]
    fn entry_names_and_counters() {
        let a = e("kiln-a.conf", 5);
        assert_eq!((a.slot, a.counter, a.version), ('a', None, 5));
        assert!(a.good() && !a.bad());
        let b = e("kiln-b+3.conf", 6);
        assert_eq!(b.counter, Some((3, 0)));
        assert!(!b.good() && !b.bad());
        assert_eq!(e("kiln-b+2-1.conf", 6).counter, Some((2, 1)));
        let bad = e("kiln-b+0-3.conf", 6);
        assert!(bad.bad());
        assert!(parse_entry("other.conf", "").is_none());
        assert!(parse_entry("kiln-c.conf", "").is_none());
        assert!(parse_entry("kiln-a+x.conf", "").is_none());
    }

    #[test]
    fn the_update_goes_to_the_slot_not_booting() {
        assert_eq!(target_slot(&[e("kiln-a.conf", 1)]).unwrap(), 'b');
        assert_eq!(
            target_slot(&[e("kiln-a.conf", 1), e("kiln-b.conf", 2)]).unwrap(),
            'a'
        );
        // B failed its tries: A boots, B is written again.
        assert_eq!(
            target_slot(&[e("kiln-a.conf", 1), e("kiln-b+0-3.conf", 2)]).unwrap(),
            'b'
        );
        let err = target_slot(&[e("kiln-a.conf", 1), e("kiln-b+2-1.conf", 2)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("slot b is on trial"), "{err}");
        assert!(target_slot(&[]).is_err());
        assert!(target_slot(&[e("kiln-a+0-3.conf", 1)]).is_err());
    }

    #[test]
    fn mounted_partitions_are_found_by_device_number() {
        let mounts = crate::flash::parse_mountinfo(
            "22 1 8:3 / / rw - ext4 /dev/sda3 rw\n\
             23 22 8:4 / /var/lib/kiln rw - ext4 /dev/sda4 rw\n",
        );
        let parts = [(1, (8, 1)), (2, (8, 2)), (3, (8, 3)), (4, (8, 4))];
        assert_eq!(
            mounted_partitions(&parts, &mounts),
            [(3, "/".to_string()), (4, "/var/lib/kiln".to_string())]
        );
        assert!(mounted_partitions(&parts[..2], &mounts).is_empty());
    }

    #[test]
    fn squashfs_length_from_the_superblock() {
        let mut sb = vec![0u8; 96];
        sb[..4].copy_from_slice(b"hsqs");
        sb[40..48].copy_from_slice(&123_456u64.to_le_bytes());
        assert_eq!(squashfs_len(&sb).unwrap(), 123_456);
        assert!(squashfs_len(&[0u8; 96]).is_err());
    }
}
