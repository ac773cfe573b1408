//! FAT32 volumes, written reproducibly with the `fatfs` crate: the volume id
//! and label are given, every timestamp (created, modified, accessed, the
//! volume label entry) is one fixed time (SOURCE_DATE_EPOCH), and files are
//! written in sorted order, so the same files give the same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Seek, SeekFrom, Write};

use anyhow::{bail, Context, Result};

use crate::tree::Content;

/// A window `[start, start + len)` of a larger stream (a partition of a disk
/// image), seen as a stream of its own.
pub struct Slice<'a, F> {
    inner: &'a mut F,
    start: u64,
    len: u64,
    pos: u64,
}

impl<'a, F: Seek> Slice<'a, F> {
    pub fn new(inner: &'a mut F, start: u64, len: u64) -> io::Result<Self> {
        inner.seek(SeekFrom::Start(start))?;
        Ok(Slice {
            inner,
            start,
            len,
            pos: 0,
        })
    }
}

impl<F: Read + Seek> Read for Slice<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<F: Write + Seek> Write for Slice<'_, F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let put = self.inner.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<F: Seek> Seek for Slice<'_, F> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the partition",
            )),
        }
    }
}

/// One fixed time for every FAT timestamp.
#[derive(Debug)]
pub struct FixedTime(fatfs::DateTime);

/// fatfs options whose every timestamp is the Unix time `epoch` (fatfs'
/// default leaves dates zero, 1980-00-00, which UEFI's FAT driver refuses
/// when a file is renamed). The time provider lives as long as the program.
pub fn options_at(epoch: u64) -> fatfs::FsOptions {
    let clock: &'static FixedTime = Box::leak(Box::new(FixedTime(dos_time(epoch))));
    fatfs::FsOptions::new()
        .time_provider(clock)
        .update_accessed_date(false)
}

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

/// The FAT date and time of a Unix time (UTC), clamped to what FAT can hold
/// (1980-01-01 to 2107-12-31); seconds are rounded down to even ones.
pub fn dos_time(epoch: u64) -> fatfs::DateTime {
    const MIN: u64 = 315_532_800; // 1980-01-01T00:00:00Z
    const MAX: u64 = 4_354_819_198; // 2107-12-31T23:59:58Z
    let t = epoch.clamp(MIN, MAX);
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    let (y, m, d) = civil_from_days(days);
    fatfs::DateTime {
        date: fatfs::Date {
            year: y as u16,
            month: m as u16,
            day: d as u16,
        },
        time: fatfs::Time {
            hour: (secs / 3600) as u16,
            min: (secs / 60 % 60) as u16,
            sec: (secs % 60 / 2 * 2) as u16,
            millis: 0,
        },
    }
}

/// Year, month (1-12), day (1-31) of a day count since 1970-01-01
/// (proleptic Gregorian calendar, 400-year eras).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // day of the era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the year from March 1st
    let mp = (5 * doy + 2) / 153; // month from March, 0..11
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// FAT's packed 16-bit date and time.
pub fn packed(t: &fatfs::DateTime) -> (u16, u16) {
    let date = ((t.date.year - 1980) << 9) | (t.date.month << 5) | t.date.day;
    let time = (t.time.hour << 11) | (t.time.min << 5) | (t.time.sec / 2);
    (date, time)
}

/// What goes on a FAT volume.
pub struct Volume<'a> {
    pub volume_id: u32,
    /// Up to 11 characters: A-Z, 0-9, '-', '_'.
    pub label: &'a str,
    /// SOURCE_DATE_EPOCH: every timestamp.
    pub epoch: u64,
    /// Sectors before the volume on its disk (the partition's start LBA).
    pub hidden_sectors: u32,
    /// Files by path ('/'-separated, no leading '/'); parents are made.
    pub files: &'a BTreeMap<String, Content>,
}

/// Formats `disk` (the whole stream: a partition seen through [`Slice`]) as
/// FAT32 and writes the volume's files.
pub fn write_fat32<D: Read + Write + Seek>(disk: &mut D, v: &Volume) -> Result<()> {
    if v.label.is_empty()
        || v.label.len() > 11
        || !v
            .label
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        bail!("{:?} is not a FAT volume label", v.label);
    }
    let mut label = [b' '; 11];
    label[..v.label.len()].copy_from_slice(v.label.as_bytes());
    let when = dos_time(v.epoch);

    // FAT32 needs at least 65525 clusters: the largest cluster (up to 4 KiB)
    // that leaves a margin over that.
    let size = disk.seek(SeekFrom::End(0))?;
    let mut cluster: u32 = 4096;
    while cluster > 512 && size / u64::from(cluster) < 70_000 {
        cluster /= 2;
    }
    if size / u64::from(cluster) < 70_000 {
        bail!("{size} bytes is too small for a FAT32 volume (at least 35 MiB)");
    }
    disk.seek(SeekFrom::Start(0))?;
    fatfs::format_volume(
        &mut *disk,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat32)
            .bytes_per_cluster(cluster)
            .volume_id(v.volume_id)
            .volume_label(label),
    )
    .context("formatting the FAT32 volume")?;
    stamp_label_entry(disk, &when).context("dating the volume label")?;
    set_hidden_sectors(disk, v.hidden_sectors).context("setting the hidden sectors")?;

    // Directories: every parent of a file, parents before children.
    let mut dirs = BTreeSet::new();
    for path in v.files.keys() {
        if path.is_empty() || path.starts_with('/') || path.split('/').any(str::is_empty) {
            bail!("{path:?} is not a relative file path");
        }
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            dirs.insert(&path[..at + i]);
            at += i + 1;
        }
    }
    if dirs.iter().any(|d| v.files.contains_key(*d)) {
        bail!("a file and a directory have the same path");
    }

    let options = || options_at(v.epoch);
    // Pass 1: the directories (BTreeSet order: a parent before its
    // children), whose "." and ".." entries are then rewritten (fatfs 0.3
    // gives them long-name entries and points ".." of a top-level directory
    // at the root's cluster instead of 0, which fsck.vfat rejects).
    if !dirs.is_empty() {
        disk.seek(SeekFrom::Start(0))?;
        let fs = fatfs::FileSystem::new(&mut *disk, options())
            .context("opening the new FAT32 volume")?;
        for dir in &dirs {
            fs.root_dir()
                .create_dir(dir)
                .with_context(|| format!("making the directory {dir}"))?;
        }
        fs.unmount().context("closing the FAT32 volume")?;
        fix_dot_entries(disk).context("rewriting the directories' . and .. entries")?;
    }
    // Pass 2: the files, in sorted order.
    disk.seek(SeekFrom::Start(0))?;
    let fs =
        fatfs::FileSystem::new(&mut *disk, options()).context("opening the new FAT32 volume")?;
    {
        let root = fs.root_dir();
        for (path, bytes) in v.files {
            let mut f = root
                .create_file(path)
                .with_context(|| format!("creating {path}"))?;
            f.truncate()?;
            f.write_all(bytes)
                .with_context(|| format!("writing {path} ({} bytes)", bytes.len()))?;
            f.flush()?;
        }
    }
    // Counting the free clusters fills in FSInfo's free count, written at unmount.
    fs.stats().context("counting the free clusters")?;
    fs.unmount().context("closing the FAT32 volume")?;
    disk.flush()?;
    disk.seek(SeekFrom::Start(0))?;
    Ok(())
}

/// Records where the volume starts on its disk in the boot sector and its
/// backup (BPB hidden sectors; fatfs writes 0).
fn set_hidden_sectors<D: Read + Write + Seek>(disk: &mut D, hidden: u32) -> Result<()> {
    let mut bs = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut bs)?;
    let bytes_per_sector = u64::from(u16::from_le_bytes([bs[11], bs[12]]));
    let backup = u64::from(u16::from_le_bytes([bs[50], bs[51]]));
    for sector in [0, backup] {
        disk.seek(SeekFrom::Start(sector * bytes_per_sector + 28))?;
        disk.write_all(&hidden.to_le_bytes())?;
    }
    Ok(())
}

/// The geometry of a FAT32 volume, from its boot sector.
struct Geometry {
    cluster_size: u64,
    data_start: u64,
    root_cluster: u64,
}

impl Geometry {
    fn read<D: Read + Seek>(disk: &mut D) -> Result<Geometry> {
        let mut bs = [0u8; 512];
        disk.seek(SeekFrom::Start(0))?;
        disk.read_exact(&mut bs)?;
        let u16_at = |o: usize| u64::from(u16::from_le_bytes([bs[o], bs[o + 1]]));
        let u32_at =
            |o: usize| u64::from(u32::from_le_bytes([bs[o], bs[o + 1], bs[o + 2], bs[o + 3]]));
        let bytes_per_sector = u16_at(11);
        let sectors_per_cluster = u64::from(bs[13]);
        let reserved = u16_at(14);
        let fats = u64::from(bs[16]);
        let sectors_per_fat = u32_at(36);
        let root_cluster = u32_at(44);
        if bytes_per_sector == 0 || sectors_per_cluster == 0 || root_cluster < 2 {
            bail!("not a FAT32 boot sector");
        }
        Ok(Geometry {
            cluster_size: bytes_per_sector * sectors_per_cluster,
            data_start: (reserved + fats * sectors_per_fat) * bytes_per_sector,
            root_cluster,
        })
    }

    fn offset(&self, cluster: u64) -> u64 {
        self.data_start + (cluster - 2) * self.cluster_size
    }
}

/// Rewrites the first cluster of every directory (made by pass 1, so it
/// holds only "." and "..", their long-name entries, and its
/// subdirectories' entries): "." (its own cluster) and ".." (its parent's;
/// 0 for the root), dated like the directory's own entry, then its
/// subdirectories' entries as they were, long names and all.
fn fix_dot_entries<D: Read + Write + Seek>(disk: &mut D) -> Result<()> {
    let g = Geometry::read(disk)?;
    let mut root = vec![0u8; g.cluster_size as usize];
    disk.seek(SeekFrom::Start(g.offset(g.root_cluster)))?;
    disk.read_exact(&mut root)?;
    // (directory listing, the cluster its subdirectories' ".." names).
    let mut todo = vec![(root, 0u64)];
    while let Some((listing, parent)) = todo.pop() {
        let mut ended = false;
        for e in listing.chunks_exact(32) {
            if e[0] == 0 {
                ended = true;
                break;
            }
            let attr = e[11];
            if e[0] == 0xe5 || attr == 0x0f || attr & 0x08 != 0 || attr & 0x10 == 0 {
                continue;
            }
            if &e[..2] == b". " || &e[..3] == b".. " {
                continue;
            }
            let cluster = u64::from(u16::from_le_bytes([e[20], e[21]])) << 16
                | u64::from(u16::from_le_bytes([e[26], e[27]]));
            if cluster < 2 {
                bail!("a directory entry has no cluster");
            }
            let mut old = vec![0u8; g.cluster_size as usize];
            disk.seek(SeekFrom::Start(g.offset(cluster)))?;
            disk.read_exact(&mut old)?;
            let mut dir = vec![0u8; g.cluster_size as usize];
            for (i, name) in [&b".          "[..], &b"..         "[..]]
                .iter()
                .enumerate()
            {
                let d = &mut dir[i * 32..i * 32 + 32];
                d[..11].copy_from_slice(name);
                d[11] = 0x10;
                d[13..20].copy_from_slice(&e[13..20]); // created, accessed
                d[22..26].copy_from_slice(&e[22..26]); // modified
                let points_to = if i == 0 { cluster } else { parent };
                d[20..22].copy_from_slice(&((points_to >> 16) as u16).to_le_bytes());
                d[26..28].copy_from_slice(&(points_to as u16).to_le_bytes());
            }
            // Keep the subdirectories' entries (each with the long-name
            // entries just before it); drop "." and ".." and theirs.
            let mut at = 64;
            let mut pending: Vec<&[u8]> = Vec::new();
            let mut sub_ended = false;
            for x in old.chunks_exact(32) {
                if x[0] == 0 {
                    sub_ended = true;
                    break;
                }
                if x[11] == 0x0f {
                    pending.push(x);
                    continue;
                }
                let dot = &x[..2] == b". " || &x[..3] == b".. ";
                if !dot {
                    for y in pending.iter().copied().chain(std::iter::once(x)) {
                        dir[at..at + 32].copy_from_slice(y);
                        at += 32;
                    }
                }
                pending.clear();
            }
            if !sub_ended {
                bail!("a directory outgrew its first cluster");
            }
            disk.seek(SeekFrom::Start(g.offset(cluster)))?;
            disk.write_all(&dir)?;
            todo.push((dir, cluster));
        }
        if !ended {
            bail!("a directory outgrew its first cluster");
        }
    }
    Ok(())
}

/// fatfs writes the root directory's volume label entry with zero times:
/// give it the fixed time too. The entry is the first of the root directory,
/// which format_volume places at the root cluster.
fn stamp_label_entry<D: Read + Write + Seek>(disk: &mut D, when: &fatfs::DateTime) -> Result<()> {
    let g = Geometry::read(disk)?;
    let root = g.offset(g.root_cluster);
    let mut entry = [0u8; 32];
    disk.seek(SeekFrom::Start(root))?;
    disk.read_exact(&mut entry)?;
    if entry[11] & 0x08 == 0 {
        bail!("the root directory does not start with the volume label");
    }
    let (date, time) = packed(when);
    entry[13] = 0; // creation time, 10 ms units
    entry[14..16].copy_from_slice(&time.to_le_bytes());
    entry[16..18].copy_from_slice(&date.to_le_bytes());
    entry[18..20].copy_from_slice(&date.to_le_bytes());
    entry[22..24].copy_from_slice(&time.to_le_bytes());
    entry[24..26].copy_from_slice(&date.to_le_bytes());
    disk.seek(SeekFrom::Start(root))?;
    disk.write_all(&entry)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn dos_times_of_known_instants() {
        let t = dos_time(1_735_689_600); // 2025-01-01T00:00:00Z
        assert_eq!(
            (t.date.year, t.date.month, t.date.day, t.time.hour),
            (2025, 1, 1, 0)
        );
        let t = dos_time(951_825_599); // 2000-02-29T11:59:59Z
        assert_eq!(
            (
                t.date.year,
                t.date.month,
                t.date.day,
                t.time.hour,
                t.time.min,
                t.time.sec
            ),
            (2000, 2, 29, 11, 59, 58)
        );
        let t = dos_time(0); // before FAT's epoch: clamped
        assert_eq!((t.date.year, t.date.month, t.date.day), (1980, 1, 1));
    }

    #[test]
    fn a_volume_reads_back_with_its_files_id_and_times() {
        let mut files = BTreeMap::new();
        files.insert(
            "config.txt".to_string(),
            Content::from(&b"arm_64bit=1\n"[..]),
        );
        files.insert(
            "overlays/a.dtbo".to_string(),
            Content::from(vec![7u8; 5000]),
        );
        let mut disk = Cursor::new(vec![0u8; 64 << 20]);
        let v = Volume {
            volume_id: 0x1234_5678,
            label: "KILN-BOOT",
            epoch: 1_735_689_600,
            hidden_sectors: 2048,
            files: &files,
        };
        write_fat32(&mut disk, &v).unwrap();
        let first = disk.get_ref().clone();
        assert_eq!(&first[28..32], &2048u32.to_le_bytes());
        assert_eq!(&first[6 * 512 + 28..6 * 512 + 32], &2048u32.to_le_bytes());

        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat32);
        assert_eq!(fs.volume_id(), 0x1234_5678);
        assert_eq!(fs.volume_label(), "KILN-BOOT");
        let root = fs.root_dir();
        let mut s = String::new();
        root.open_file("config.txt")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "arm_64bit=1\n");
        let mut b = Vec::new();
        root.open_file("overlays/a.dtbo")
            .unwrap()
            .read_to_end(&mut b)
            .unwrap();
        assert_eq!(b, vec![7u8; 5000]);
        for e in root.iter().map(Result::unwrap) {
            let m = e.modified();
            assert_eq!((m.date.year, m.date.month, m.date.day), (2025, 1, 1));
            assert_eq!(e.created().date.year, 2025);
        }
        drop(root);
        drop(fs);

        let mut again = Cursor::new(vec![0u8; 64 << 20]);
        write_fat32(&mut again, &v).unwrap();
        assert!(again.get_ref() == &first, "two writes differ");
    }

    /// An ESP's tree (EFI/BOOT, loader/entries, two slots' kernels): nested
    /// directories read back, and fsck.vfat finds the volume clean.
    #[test]
    fn nested_directories_are_clean() {
        let mut files = BTreeMap::new();
        for (p, n) in [
            ("EFI/BOOT/BOOTX64.EFI", 70_000),
            ("EFI/systemd/systemd-bootx64.efi", 70_000),
            ("loader/loader.conf", 30),
            ("loader/entries/kiln-a.conf", 200),
            ("kiln/a/vmlinuz", 9000),
            ("kiln/b/vmlinuz", 9000),
            ("kiln/a/initrd.img", 5000),
        ] {
            files.insert(p.to_string(), Content::from(vec![p.len() as u8; n]));
        }
        let mut disk = Cursor::new(vec![0u8; 64 << 20]);
        let v = Volume {
            volume_id: 0x0bad_cafe,
            label: "KILN-ESP",
            epoch: 1_735_689_600,
            hidden_sectors: 2048,
            files: &files,
        };
        write_fat32(&mut disk, &v).unwrap();
        let bytes = disk.get_ref().clone();
        {
            let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).unwrap();
            for (p, c) in &files {
                let mut b = Vec::new();
                fs.root_dir()
                    .open_file(p)
                    .unwrap()
                    .read_to_end(&mut b)
                    .unwrap();
                assert_eq!(&b[..], &c[..], "{p}");
            }
            let names = |dir: &str| -> Vec<String> {
                let d = fs.root_dir().open_dir(dir).unwrap();
                let mut n: Vec<String> = d.iter().map(|e| e.unwrap().file_name()).collect();
                n.sort();
                n
            };
            assert_eq!(names("EFI"), [".", "..", "BOOT", "systemd"]);
            assert_eq!(names("kiln"), [".", "..", "a", "b"]);
        }
        let fsck = std::path::Path::new("/sbin/fsck.vfat");
        if fsck.exists() {
            let tmp = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(tmp.path(), &bytes).unwrap();
            let out = std::process::Command::new(fsck)
                .arg("-n")
                .arg(tmp.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "fsck.vfat: {out:?}");
        } else {
            eprintln!("SKIP nested_directories_are_clean fsck: fsck.vfat is not installed (apt-get install dosfstools)");
        }
        let mut files2 = files.clone();
        files2.insert("EFI".into(), Content::from(&b"x"[..]));
        let v2 = Volume {
            files: &files2,
            ..v
        };
        assert!(write_fat32(&mut Cursor::new(vec![0u8; 64 << 20]), &v2).is_err());
    }

    #[test]
    fn a_slice_confines_reads_writes_and_seeks() {
        let mut c = Cursor::new(vec![0u8; 16]);
        let mut s = Slice::new(&mut c, 4, 8).unwrap();
        assert_eq!(s.seek(SeekFrom::End(0)).unwrap(), 8);
        s.seek(SeekFrom::Start(6)).unwrap();
        assert_eq!(s.write(b"abcd").unwrap(), 2);
        assert!(s.write(b"x").is_err());
        s.seek(SeekFrom::Start(0)).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"\0\0\0\0\0\0ab");
        assert_eq!(&c.get_ref()[10..12], b"ab");
        assert_eq!(c.get_ref()[12], 0);
    }
}
