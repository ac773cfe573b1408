//! `kiln flash IMAGE DEVICE`: writes a disk image (a kiln SD-card image, or
//! any raw disk image) to a block device or a regular file, with the node's
//! settings put into the image's FAT boot partition on the way, without
//! mounting anything; then syncs, reads everything back and checks it.
//!
//! The settings ([`Settings`]) become `kiln.yaml` at the root of partition 1
//! (FAT, MBR disks only). The image file itself is never changed: the edit
//! goes to an in-memory copy-on-write [`Overlay`] of the image, and the
//! stream written to the target is the image with the overlay's blocks.
//!
//! A block device is refused when it is a partition, the disk the running
//! system is on, mounted (it or one of its partitions), used as swap, held
//! by device mapper or RAID (holders), read-only, or smaller than the image
//! ([`check_block_device`], over parsed facts so it is tested without
//! devices). Unless `--yes`, the user confirms on a terminal first.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::fat;
use crate::sdcard::{MIB, SETTINGS_FILE};

// ---------------------------------------------------------------------------
// Settings: kiln.yaml on the boot partition.

/// The first line of a settings file written by `kiln flash`.
pub const HEADER: &str = "# kiln node settings, written by kiln flash";

/// The top-level keys a settings file may hold.
const KEYS: &[&str] = &["hostname", "role", "server", "data_disk", "k3s"];

/// Node settings: kiln's node config (README, "The node config") plus
/// `server`, the `kiln serve` the node asks for the rest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    pub hostname: Option<String>,
    /// "server" or "agent".
    pub role: Option<String>,
    /// URL of a `kiln serve` (http:// or https://).
    pub server: Option<String>,
    /// A /dev/ path: the disk the node makes its data partition on.
    pub data_disk: Option<String>,
    /// k3s config.yaml keys and values, in the order given.
    pub k3s: Vec<(String, serde_json::Value)>,
}

/// The settings given on the command line; each overrides or adds a
/// top-level key.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub hostname: Option<String>,
    pub role: Option<String>,
    pub server: Option<String>,
}

impl Flags {
    pub fn is_empty(&self) -> bool {
        self.hostname.is_none() && self.role.is_none() && self.server.is_none()
    }
}

/// Why `h` is not an RFC 1123 host name label, if it is not.
fn hostname_problem(h: &str) -> Option<String> {
    if h.is_empty() {
        return Some("is empty".into());
    }
    if h.len() > 63 {
        return Some(format!("is {} characters long; at most 63", h.len()));
    }
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some(format!(
            "has upper-case letters: host names are lower case, use {:?}",
            h.to_ascii_lowercase()
        ));
    }
    if let Some(c) = h
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!(
            "holds {c:?}: a host name is a-z, 0-9 and '-' only (one DNS label, no dots)"
        ));
    }
    if h.starts_with('-') || h.ends_with('-') {
        return Some("starts or ends with '-'".into());
    }
    None
}

/// Characters the node's shell parser (`kiln_yaml_scalar`, which does not
/// undo JSON escapes) cannot read back from a quoted scalar.
fn unsafe_scalar_char(s: &str) -> Option<char> {
    s.chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\'))
}

fn check_hostname(h: &str, origin: &str) -> Result<()> {
    match hostname_problem(h) {
        Some(why) => bail!("{origin}: hostname {h:?} {why}"),
        None => Ok(()),
    }
}

fn check_role(r: &str, origin: &str) -> Result<()> {
    if r != "server" && r != "agent" {
        bail!("{origin}: role {r:?} is not a kiln role: use \"server\" or \"agent\"");
    }
    Ok(())
}

fn check_server(s: &str, origin: &str) -> Result<()> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    let Some(rest) = rest else {
        bail!(
            "{origin}: server {s:?} is not the URL of a kiln serve: it must start with \
             http:// or https://, e.g. http://10.0.0.1:8080"
        );
    };
    if let Some(c) = unsafe_scalar_char(s) {
        bail!("{origin}: server {s:?} holds {c:?}, which a URL here may not hold");
    }
    if rest.is_empty() || rest.starts_with('/') {
        bail!("{origin}: server {s:?} names no host");
    }
    Ok(())
}

fn check_data_disk(d: &str, origin: &str) -> Result<()> {
    if !d.starts_with("/dev/") || d.len() == "/dev/".len() {
        bail!("{origin}: data_disk {d:?} is not a /dev/ path, e.g. /dev/sda or /dev/nvme0n1");
    }
    if let Some(c) = unsafe_scalar_char(d) {
        bail!("{origin}: data_disk {d:?} holds {c:?}, which a device path here may not hold");
    }
    Ok(())
}

/// k3s config keys are flag names (`node-label`, `write-kubeconfig-mode`):
/// they are written unquoted, so they must stay plain.
fn check_k3s_key(k: &str, origin: &str) -> Result<()> {
    let plain = k
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if k.is_empty() || !plain || !k.as_bytes()[0].is_ascii_alphanumeric() {
        bail!(
            "{origin}: k3s key {k:?} is not a k3s config key (letters, digits, '-', '_' and '.', \
             e.g. node-label)"
        );
    }
    Ok(())
}

impl Settings {
    /// Parses and checks a settings file (kiln's node config format);
    /// `origin` (the file's name) starts every error.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Settings> {
        use serde_yaml_ng::Value as Y;
        let doc: Y = serde_yaml_ng::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        let map = match doc {
            Y::Null => return Ok(Settings::default()),
            Y::Mapping(m) => m,
            _ => bail!("{origin}: not a node config: expected a mapping of keys (hostname, role, ...) at the top"),
        };
        let mut s = Settings::default();
        for (k, v) in &map {
            let Some(key) = k.as_str() else {
                bail!("{origin}: a top-level key is not a string ({k:?})");
            };
            let string = || -> Result<String> {
                match v {
                    Y::String(x) => Ok(x.clone()),
                    other => bail!(
                        "{origin}: {key} must be a string (quote it), not {}",
                        yaml_kind(other)
                    ),
                }
            };
            match key {
                "hostname" => {
                    let h = string()?;
                    check_hostname(&h, origin)?;
                    s.hostname = Some(h);
                }
                "role" => {
                    let r = string()?;
                    check_role(&r, origin)?;
                    s.role = Some(r);
                }
                "server" => {
                    let u = string()?;
                    check_server(&u, origin)?;
                    s.server = Some(u);
                }
                "data_disk" => {
                    let d = string()?;
                    check_data_disk(&d, origin)?;
                    s.data_disk = Some(d);
                }
                "k3s" => match v {
                    Y::Null => {}
                    Y::Mapping(m) => {
                        for (k, v) in m {
                            let Some(k) = k.as_str() else {
                                bail!("{origin}: a k3s key is not a string ({k:?})");
                            };
                            check_k3s_key(k, origin)?;
                            let v = serde_json::to_value(v)
                                .with_context(|| format!("{origin}: k3s key {k}"))?;
                            s.k3s.push((k.to_string(), v));
                        }
                    }
                    other => bail!(
                        "{origin}: k3s must be a mapping of k3s config keys to values, not {}",
                        yaml_kind(other)
                    ),
                },
                other => bail!(
                    "{origin}: unknown key {other:?} (a node's settings hold {})",
                    KEYS.join(", ")
                ),
            }
        }
        Ok(s)
    }

    /// Reads and checks a settings file.
    pub fn load(path: &Path) -> Result<Settings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the node config", path.display()))?;
        Settings::from_yaml(&text, &path.display().to_string())
    }

    /// Lays the command line's settings over these; checks each.
    pub fn apply(&mut self, f: &Flags) -> Result<()> {
        if let Some(h) = &f.hostname {
            check_hostname(h, "--hostname")?;
            self.hostname = Some(h.clone());
        }
        if let Some(r) = &f.role {
            check_role(r, "--role")?;
            self.role = Some(r.clone());
        }
        if let Some(u) = &f.server {
            check_server(u, "--server")?;
            self.server = Some(u.clone());
        }
        Ok(())
    }

    /// The settings file: a header comment, the set top-level keys as JSON
    /// strings, then `k3s:` with one `  key: <JSON value>` line per entry
    /// (left out when there is none), as the node's shell parser reads it.
    pub fn to_yaml(&self) -> String {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let mut out = format!("{HEADER}\n");
        for (key, value) in [
            ("hostname", &self.hostname),
            ("role", &self.role),
            ("server", &self.server),
            ("data_disk", &self.data_disk),
        ] {
            if let Some(v) = value {
                out.push_str(&format!("{key}: {}\n", q(v)));
            }
        }
        if !self.k3s.is_empty() {
            out.push_str("k3s:\n");
            for (k, v) in &self.k3s {
                out.push_str(&format!("  {k}: {v}\n"));
            }
        }
        out
    }

    /// One line for people: "hostname pi-07, role agent, ...".
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (key, value) in [
            ("hostname", &self.hostname),
            ("role", &self.role),
            ("server", &self.server),
            ("data_disk", &self.data_disk),
        ] {
            if let Some(v) = value {
                parts.push(format!("{key} {v}"));
            }
        }
        if !self.k3s.is_empty() {
            let keys: Vec<&str> = self.k3s.iter().map(|(k, _)| k.as_str()).collect();
            parts.push(format!("k3s {}", keys.join(" ")));
        }
        if parts.is_empty() {
            "no keys set".into()
        } else {
            parts.join(", ")
        }
    }
}

fn yaml_kind(v: &serde_yaml_ng::Value) -> &'static str {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::Null => "empty",
        Y::Bool(_) => "a boolean",
        Y::Number(_) => "a number",
        Y::String(_) => "a string",
        Y::Sequence(_) => "a list",
        Y::Mapping(_) => "a mapping",
        Y::Tagged(_) => "a tagged value",
    }
}

// ---------------------------------------------------------------------------
// The image: its MBR, its boot partition, and the copy-on-write overlay.

const SECTOR: u64 = 512;
/// FAT partition types: FAT32 (CHS), FAT32 (LBA), FAT16 (LBA).
const FAT_TYPES: &[u8] = &[0x0b, 0x0c, 0x0e];

/// Partition 1 of an MBR disk image, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootPartition {
    pub start: u64,
    pub size: u64,
    pub kind: u8,
}

/// How much of an image's start `boot_partition` reads: the MBR, and a
/// GPT's header and first 128 entries.
pub const HEAD: usize = 34 * SECTOR as usize;

/// The `kind` of a GPT disk's EFI system partition in [`BootPartition`].
pub const KIND_ESP: u8 = 0xef;

/// Partition 1 of the image whose first bytes are `mbr` (up to [`HEAD`]):
/// on an MBR disk (an SD card) when it is FAT, on a GPT disk (a kiln disk
/// image) when it is the EFI system partition; it must lie within the
/// image's `image_len` bytes. Else an error naming the image and what it
/// holds.
pub fn boot_partition(mbr: &[u8], image_len: u64, image: &str) -> Result<BootPartition> {
    let why = "settings go into partition 1 of an MBR disk image, which must be FAT, \
               or of a GPT disk image, which must be the EFI system partition";
    if mbr.len() < 512 || mbr[510..512] != [0x55, 0xaa] {
        bail!(
            "{image} has no MBR partition table (no 0x55aa signature in its first sector): {why}"
        );
    }
    let e = &mbr[446..462];
    let kind = e[4];
    let start = u64::from(u32::from_le_bytes([e[8], e[9], e[10], e[11]])) * SECTOR;
    let size = u64::from(u32::from_le_bytes([e[12], e[13], e[14], e[15]])) * SECTOR;
    if kind == 0xee {
        return gpt_boot_partition(mbr, image_len, image, why);
    }
    if kind == 0 || size == 0 {
        bail!("{image}: partition 1 of its MBR is empty: {why}");
    }
    if !FAT_TYPES.contains(&kind) {
        bail!("{image}: partition 1 has type {kind:#04x}, not FAT (0x0b, 0x0c or 0x0e): {why}");
    }
    if start == 0 || start + size > image_len {
        bail!(
            "{image}: partition 1 (bytes {start}..{}) does not lie within the image ({image_len} bytes)",
            start + size
        );
    }
    Ok(BootPartition { start, size, kind })
}

/// Partition 1 of a GPT disk (see `boot_partition`): the header at LBA 1
/// names where the entries are; entry 1 must be the EFI system partition.
fn gpt_boot_partition(
    head: &[u8],
    image_len: u64,
    image: &str,
    why: &str,
) -> Result<BootPartition> {
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    if head.len() < 2 * SECTOR as usize || &head[512..520] != b"EFI PART" {
        bail!("{image} has a protective MBR but no GPT header at LBA 1: {why}");
    }
    let h = &head[512..1024];
    let entries = u64_at(h, 72) * SECTOR;
    let entry_size = u64::from(u32::from_le_bytes(h[84..88].try_into().expect("4 bytes")));
    let at = usize::try_from(entries).unwrap_or(usize::MAX);
    if entry_size < 128 || at.saturating_add(128) > head.len() {
        bail!(
            "{image}: its GPT's entries (at byte {entries}) are not where kiln reads them: {why}"
        );
    }
    let e = &head[at..at + 128];
    let esp = crate::disk::guid_bytes(crate::disk::TYPE_ESP).expect("a GUID");
    if e[..16] == [0u8; 16] {
        bail!("{image}: partition 1 of its GPT is empty: {why}");
    }
    if e[..16] != esp {
        bail!(
            "{image}: partition 1 of its GPT has type {}, not the EFI system partition: {why}",
            crate::disk::guid_text(e[..16].try_into().expect("16 bytes"))
        );
    }
    let start = u64_at(e, 32) * SECTOR;
    let end = (u64_at(e, 40) + 1) * SECTOR;
    if start == 0 || end <= start || end > image_len {
        bail!(
            "{image}: partition 1 (bytes {start}..{end}) does not lie within the image ({image_len} bytes)"
        );
    }
    Ok(BootPartition {
        start,
        size: end - start,
        kind: KIND_ESP,
    })
}

/// The overlay's block size.
const BLOCK: u64 = 4096;

/// A copy-on-write view of a stream: reads come from `base` except where
/// something was written, which is kept in memory by 4 KiB block. The base
/// is never written.
pub struct Overlay<B> {
    base: B,
    len: u64,
    pos: u64,
    blocks: BTreeMap<u64, Box<[u8]>>,
}

impl<B: Read + Seek> Overlay<B> {
    pub fn new(base: B, len: u64) -> Overlay<B> {
        Overlay {
            base,
            len,
            pos: 0,
            blocks: BTreeMap::new(),
        }
    }

    /// How many bytes differ from the base at most (changed blocks).
    pub fn changed_bytes(&self) -> u64 {
        self.blocks.len() as u64 * BLOCK
    }
}

/// Reads until `buf` is full or the stream ends; returns the count.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl<B: Read + Seek> Read for Overlay<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        self.base.seek(SeekFrom::Start(self.pos))?;
        let got = read_full(&mut self.base, &mut buf[..n])?;
        if got == 0 {
            return Ok(0);
        }
        let (pos, end) = (self.pos, self.pos + got as u64);
        for (&i, block) in self.blocks.range(pos / BLOCK..=(end - 1) / BLOCK) {
            let b0 = i * BLOCK;
            let (s, e) = (b0.max(pos), (b0 + BLOCK).min(end));
            buf[(s - pos) as usize..(e - pos) as usize]
                .copy_from_slice(&block[(s - b0) as usize..(e - b0) as usize]);
        }
        self.pos = end;
        Ok(got)
    }
}

impl<B: Read + Seek> Write for Overlay<B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let left = self.len.saturating_sub(self.pos);
        if left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the image",
            ));
        }
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let mut done = 0;
        while done < n {
            let at = self.pos + done as u64;
            let (i, off) = (at / BLOCK, (at % BLOCK) as usize);
            let k = (BLOCK as usize - off).min(n - done);
            let block = match self.blocks.entry(i) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let mut b = vec![0u8; BLOCK as usize];
                    self.base.seek(SeekFrom::Start(i * BLOCK))?;
                    read_full(&mut self.base, &mut b)?;
                    v.insert(b.into_boxed_slice())
                }
            };
            block[off..off + k].copy_from_slice(&buf[done..done + k]);
            done += k;
        }
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<B> Seek for Overlay<B> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let p = new
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        self.pos = p;
        Ok(p)
    }
}

/// One fixed time for every FAT timestamp flash writes.
#[derive(Debug)]
struct FixedTime(fatfs::DateTime);

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

/// Replaces kiln.yaml at the root of the FAT volume in `part` of `disk`
/// with `yaml`, dated like the image's own kiln.yaml (or the default
/// SOURCE_DATE_EPOCH when it has none), and reads it back.
pub fn write_settings<D: Read + Write + Seek>(
    disk: &mut D,
    part: BootPartition,
    yaml: &str,
    image: &str,
) -> Result<()> {
    let mut vol = fat::Slice::new(disk, part.start, part.size)?;
    let ctx = || format!("{image}: partition 1");
    let when = {
        vol.seek(SeekFrom::Start(0))?;
        let fs = fatfs::FileSystem::new(&mut vol, fatfs::FsOptions::new())
            .with_context(|| format!("{}: not a FAT file system", ctx()))?;
        let found = fs
            .root_dir()
            .iter()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().eq_ignore_ascii_case(SETTINGS_FILE))
            .map(|e| e.modified());
        found
    }
    .unwrap_or_else(|| fat::dos_time(crate::build::DEFAULT_SOURCE_DATE_EPOCH));
    // fatfs wants a 'static time provider: one small value per flash.
    let clock: &'static FixedTime = Box::leak(Box::new(FixedTime(when)));
    let options = || {
        fatfs::FsOptions::new()
            .time_provider(clock)
            .update_accessed_date(false)
    };
    {
        vol.seek(SeekFrom::Start(0))?;
        let fs = fatfs::FileSystem::new(&mut vol, options())
            .with_context(|| format!("{}: not a FAT file system", ctx()))?;
        {
            let root = fs.root_dir();
            let mut f = root
                .create_file(SETTINGS_FILE)
                .with_context(|| format!("{}: creating {SETTINGS_FILE}", ctx()))?;
            f.truncate()
                .and_then(|()| f.write_all(yaml.as_bytes()))
                .and_then(|()| f.flush())
                .with_context(|| {
                    format!(
                        "{}: writing {SETTINGS_FILE} ({} bytes; is the volume full?)",
                        ctx(),
                        yaml.len()
                    )
                })?;
        }
        fs.unmount()
            .with_context(|| format!("{}: closing the FAT volume", ctx()))?;
    }
    vol.seek(SeekFrom::Start(0))?;
    let fs = fatfs::FileSystem::new(&mut vol, fatfs::FsOptions::new())
        .with_context(|| format!("{}: reopening the FAT volume", ctx()))?;
    let mut back = String::new();
    fs.root_dir()
        .open_file(SETTINGS_FILE)
        .and_then(|mut f| f.read_to_string(&mut back))
        .with_context(|| format!("{}: reading {SETTINGS_FILE} back", ctx()))?;
    if back != yaml {
        bail!(
            "{}: {SETTINGS_FILE} read back differs from what was written",
            ctx()
        );
    }
    Ok(())
}

/// The name of a compression format whose magic starts `head`, if any.
fn compressed(head: &[u8]) -> Option<&'static str> {
    const MAGIC: &[(&[u8], &str)] = &[
        (b"\xfd7zXZ\0", "xz"),
        (b"\x1f\x8b", "gzip"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"BZh", "bzip2"),
        (b"PK\x03\x04", "zip"),
    ];
    MAGIC
        .iter()
        .find(|(m, _)| head.starts_with(m))
        .map(|(_, n)| *n)
}

// ---------------------------------------------------------------------------
// Writing and reading back.

/// What is written to: a block device, a file, or (in tests) memory.
pub trait Target: Read + Write + Seek {
    /// Makes everything written durable (fsync).
    fn sync(&mut self) -> io::Result<()>;
    /// Drops cached pages so that the next reads come from the medium.
    fn drop_cache(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Sync every this many bytes while writing (so the progress bar shows
    /// the medium's pace, not the page cache's).
    fn sync_every(&self) -> Option<u64> {
        None
    }
}

impl Target for io::Cursor<Vec<u8>> {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A block device or a regular file.
pub struct FileTarget {
    file: File,
    block: bool,
}

impl Read for FileTarget {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for FileTarget {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for FileTarget {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.file.seek(to)
    }
}

impl Target for FileTarget {
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }
    fn drop_cache(&mut self) -> io::Result<()> {
        rustix::fs::fadvise(&self.file, 0, None, rustix::fs::Advice::DontNeed)?;
        if self.block {
            // BLKFLSBUF also drops the device's buffer cache (needs
            // CAP_SYS_ADMIN); DONTNEED above is the fallback.
            const BLKFLSBUF: rustix::ioctl::Opcode = rustix::ioctl::opcode::none(0x12, 97);
            // SAFETY: BLKFLSBUF takes no argument.
            let r = unsafe {
                rustix::ioctl::ioctl(&self.file, rustix::ioctl::NoArg::<BLKFLSBUF>::new())
            };
            if let Err(e) = r {
                tracing::debug!("BLKFLSBUF: {e}");
            }
        }
        Ok(())
    }
    fn sync_every(&self) -> Option<u64> {
        self.block.then_some(64 * MIB)
    }
}

/// The size of an open block device (BLKGETSIZE64).
fn block_size(f: &File) -> io::Result<u64> {
    const BLKGETSIZE64: rustix::ioctl::Opcode = rustix::ioctl::opcode::read::<usize>(0x12, 114);
    // SAFETY: BLKGETSIZE64 writes one u64, the size in bytes.
    let n = unsafe { rustix::ioctl::ioctl(f, rustix::ioctl::Getter::<BLKGETSIZE64, u64>::new()) }?;
    Ok(n)
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copied {
    pub bytes: u64,
    /// sha256 (hex) of the bytes written, read back and found equal.
    pub sha256: String,
}

/// The copy's chunk: one hash per MiB.
const CHUNK: u64 = MIB;

fn bytes_bar(len: u64, prefix: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = crate::progress::bar(len, prefix);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    b
}

/// Writes the first `len` bytes of `source` to the start of `target`,
/// hashing each MiB; syncs, drops the target's cache and reads the `len`
/// bytes back, comparing each MiB's sha256. Errors name the target and the
/// byte offset of the first MiB that differs.
pub fn copy_and_verify<S: Read, T: Target>(
    source: &mut S,
    source_name: &str,
    len: u64,
    target: &mut T,
    target_name: &str,
    show_progress: bool,
) -> Result<Copied> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut whole = Sha256::new();
    let mut chunks: Vec<[u8; 32]> = Vec::with_capacity(len.div_ceil(CHUNK) as usize);
    target
        .seek(SeekFrom::Start(0))
        .with_context(|| format!("seeking to the start of {target_name}"))?;

    let bar = bytes_bar(len, "writing", show_progress);
    let mut done = 0u64;
    let mut since_sync = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        let got = read_full(source, &mut buf[..n])
            .with_context(|| format!("reading {source_name} at byte {done}"))?;
        if got < n {
            bail!(
                "{source_name} ends at byte {}, before its {len} bytes: did it change while it was written?",
                done + got as u64
            );
        }
        whole.update(&buf[..n]);
        chunks.push(Sha256::digest(&buf[..n]).into());
        target
            .write_all(&buf[..n])
            .with_context(|| format!("writing {target_name} at byte {done}"))?;
        done += n as u64;
        since_sync += n as u64;
        if let Some(every) = target.sync_every() {
            if since_sync >= every {
                target
                    .sync()
                    .with_context(|| format!("syncing {target_name}"))?;
                since_sync = 0;
            }
        }
        bar.set_position(done);
    }
    bar.finish_and_clear();
    let spin = if show_progress {
        crate::progress::spinner(&format!("syncing {target_name}"))
    } else {
        indicatif::ProgressBar::hidden()
    };
    target
        .flush()
        .and_then(|()| target.sync())
        .with_context(|| format!("syncing {target_name}"))?;
    target
        .drop_cache()
        .with_context(|| format!("dropping the page cache of {target_name}"))?;
    spin.finish_and_clear();

    target
        .seek(SeekFrom::Start(0))
        .with_context(|| format!("seeking to the start of {target_name}"))?;
    let bar = bytes_bar(len, "verifying", show_progress);
    for (i, want) in chunks.iter().enumerate() {
        let off = i as u64 * CHUNK;
        let n = (len - off).min(CHUNK) as usize;
        let got = read_full(target, &mut buf[..n])
            .with_context(|| format!("reading {target_name} back at byte {off}"))?;
        if got < n {
            bail!(
                "reading {target_name} back: it ends at byte {}, before the {len} bytes written",
                off + got as u64
            );
        }
        let have: [u8; 32] = Sha256::digest(&buf[..n]).into();
        if &have != want {
            bail!(
                "verifying {target_name}: the MiB at byte offset {off} reads back differently \
                 from what was written (expected sha256 {}, read {}): the device may be faulty \
                 or fake (smaller than it claims)",
                hex::encode(want),
                hex::encode(have)
            );
        }
        bar.set_position(off + n as u64);
    }
    bar.finish_and_clear();
    Ok(Copied {
        bytes: len,
        sha256: hex::encode(whole.finalize()),
    })
}

// ---------------------------------------------------------------------------
// Block devices: the facts, and the decision.

/// What sysfs says about a block device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockDevice {
    /// As the user named it, e.g. /dev/sdb or /dev/disk/by-id/...
    pub path: PathBuf,
    /// The kernel's name, e.g. sdb.
    pub name: String,
    /// Major and minor number.
    pub dev: (u32, u32),
    /// The whole disk's name when this is a partition.
    pub partition_of: Option<String>,
    /// In bytes.
    pub size: u64,
    pub read_only: bool,
    pub removable: bool,
    /// Vendor and model, when the device says.
    pub model: Option<String>,
    /// Its partitions: name and major:minor.
    pub partitions: Vec<(String, (u32, u32))>,
    /// (device or partition name, holder name): device mapper, RAID.
    pub holders: Vec<(String, String)>,
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn dir_names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl BlockDevice {
    /// Reads the facts of the block device `dev` (named `path`) from sysfs
    /// mounted at `sys` (/sys).
    pub fn read(path: &Path, dev: (u32, u32), sys: &Path) -> Result<BlockDevice> {
        let link = sys.join(format!("dev/block/{}:{}", dev.0, dev.1));
        let dir = std::fs::canonicalize(&link).with_context(|| {
            format!(
                "{}: no {} (is sysfs mounted?)",
                path.display(),
                link.display()
            )
        })?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let partition_of = if dir.join("partition").exists() {
            dir.parent()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned())
        } else {
            None
        };
        let sectors: u64 = read_trimmed(&dir.join("size"))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{}: no size in {}", path.display(), dir.display()))?;
        let model = [
            read_trimmed(&dir.join("device/vendor")),
            read_trimmed(&dir.join("device/model")),
        ]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
        let mut partitions = Vec::new();
        for n in dir_names(&dir) {
            let p = dir.join(&n);
            if p.join("partition").exists() {
                if let Some(d) = read_trimmed(&p.join("dev")).and_then(|s| parse_dev(&s)) {
                    partitions.push((n, d));
                }
            }
        }
        let mut holders = Vec::new();
        for (n, d) in std::iter::once((name.clone(), dir.clone()))
            .chain(partitions.iter().map(|(n, _)| (n.clone(), dir.join(n))))
        {
            for h in dir_names(&d.join("holders")) {
                holders.push((n.clone(), h));
            }
        }
        Ok(BlockDevice {
            path: path.to_path_buf(),
            name,
            dev,
            partition_of,
            size: sectors * 512,
            read_only: read_trimmed(&dir.join("ro")).as_deref() == Some("1"),
            removable: read_trimmed(&dir.join("removable")).as_deref() == Some("1"),
            model: (!model.is_empty()).then_some(model),
            partitions,
            holders,
        })
    }

    /// "/dev/sdb (31.9 GB, Generic SD Card, removable)".
    pub fn describe(&self) -> String {
        let mut parts = vec![gb(self.size)];
        if let Some(m) = &self.model {
            parts.push(m.clone());
        }
        if self.removable {
            parts.push("removable".into());
        }
        if !self.partitions.is_empty() {
            let names: Vec<&str> = self.partitions.iter().map(|(n, _)| n.as_str()).collect();
            parts.push(format!("partitions {}", names.join(" ")));
        }
        format!("{} ({})", self.path.display(), parts.join(", "))
    }
}

fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

/// The whole disks under the block device `dev`: itself, or the disk of a
/// partition, and through device mapper or RAID (slaves/) the disks below.
pub fn whole_disks(dev: (u32, u32), sys: &Path) -> Vec<String> {
    fn walk(dir: &Path, sys: &Path, depth: u32, out: &mut Vec<String>) {
        if depth > 8 {
            return;
        }
        let disk = if dir.join("partition").exists() {
            dir.parent().map(Path::to_path_buf)
        } else {
            Some(dir.to_path_buf())
        };
        let Some(disk) = disk else { return };
        let slaves = dir_names(&disk.join("slaves"));
        if slaves.is_empty() {
            if let Some(n) = disk.file_name() {
                let n = n.to_string_lossy().into_owned();
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        for s in slaves {
            if let Ok(d) = std::fs::canonicalize(sys.join("class/block").join(&s)) {
                walk(&d, sys, depth + 1, out);
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::canonicalize(sys.join(format!("dev/block/{}:{}", dev.0, dev.1))) {
        walk(&dir, sys, 0, &mut out);
    }
    out
}

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub dev: (u32, u32),
    pub mount_point: String,
    pub source: String,
}

/// Undoes mountinfo's octal escapes (\040 for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (i + 3 < b.len() && b[i] == b'\\')
            .then(|| &b[i + 1..i + 4])
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0')))
            .and_then(|n| u8::try_from(n).ok());
        if let Some(c) = octal {
            out.push(c);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/self/mountinfo.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            Some(Mount {
                dev: parse_dev(f.get(2)?)?,
                mount_point: unescape(f.get(4)?),
                source: unescape(f.get(dash + 2)?),
            })
        })
        .collect()
}

/// The swap areas in /proc/swaps (their file names).
pub fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(unescape))
        .collect()
}

/// What the running system uses.
#[derive(Clone, Debug, Default)]
pub struct SystemState {
    /// /proc/self/mountinfo.
    pub mountinfo: String,
    /// /proc/swaps.
    pub swaps: String,
    /// (whole disk name, mount point): the disks holding /, /boot, /usr.
    pub system_disks: Vec<(String, String)>,
}

impl SystemState {
    /// The running system's state (read-only look-ups in /proc and /sys).
    pub fn read(sys: &Path) -> SystemState {
        let mut system_disks = Vec::new();
        for m in ["/", "/boot", "/usr", "/boot/firmware", "/boot/efi"] {
            let Ok(meta) = std::fs::metadata(m) else {
                continue;
            };
            let dev = (rustix::fs::major(meta.dev()), rustix::fs::minor(meta.dev()));
            if dev.0 == 0 {
                continue; // a virtual file system (overlay, tmpfs, btrfs subvolume)
            }
            for d in whole_disks(dev, sys) {
                system_disks.push((d, m.to_string()));
            }
        }
        SystemState {
            mountinfo: std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
            swaps: std::fs::read_to_string("/proc/swaps").unwrap_or_default(),
            system_disks,
        }
    }
}

/// Whether `d` may be overwritten with an image of `image_len` bytes; the
/// error says why not.
pub fn check_block_device(d: &BlockDevice, image_len: u64, s: &SystemState) -> Result<()> {
    let path = d.path.display();
    if let Some(disk) = &d.partition_of {
        bail!(
            "{path} is a partition ({} on /dev/{disk}): an image goes onto a whole disk; \
             name the whole disk, e.g. /dev/{disk}",
            d.name
        );
    }
    if let Some((_, m)) = s.system_disks.iter().find(|(n, _)| *n == d.name) {
        bail!(
            "{path} is the disk the running system is on ({m} is on /dev/{}): refusing to overwrite it",
            d.name
        );
    }
    let mut names = vec![(d.name.clone(), d.dev)];
    names.extend(d.partitions.iter().cloned());
    for m in parse_mountinfo(&s.mountinfo) {
        if let Some((n, _)) = names
            .iter()
            .find(|(n, dev)| *dev == m.dev || m.source == format!("/dev/{n}"))
        {
            let what = if *n == d.name {
                format!("{path} is mounted")
            } else {
                format!("{path}: /dev/{n} is mounted")
            };
            bail!(
                "{what} on {}: unmount it first (umount {})",
                m.mount_point,
                m.mount_point
            );
        }
    }
    for sw in parse_swaps(&s.swaps) {
        if let Some((n, _)) = names.iter().find(|(n, _)| sw == format!("/dev/{n}")) {
            bail!("{path}: /dev/{n} is in use as swap: swapoff /dev/{n} first");
        }
    }
    if let Some((n, h)) = d.holders.first() {
        bail!(
            "{path}: /dev/{n} is in use by /dev/{h} (device mapper: LVM or dm-crypt, or RAID): \
             stop that first"
        );
    }
    if d.read_only {
        bail!("{path} is read-only (an SD card's lock switch?)");
    }
    if d.size == 0 {
        bail!("{path} has no medium (its size is 0): is the card in the reader?");
    }
    if d.size < image_len {
        bail!(
            "{path} holds {} bytes ({}), less than the image's {image_len} bytes ({})",
            d.size,
            gb(d.size),
            gb(image_len)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Confirmation.

/// Asks on `out` whether to overwrite `what`, reading the answer from
/// `input`; only "y" or "yes" goes on. With `yes`, asks nothing; without a
/// terminal (`interactive` false) refuses.
pub fn confirm(
    what: &str,
    target: &str,
    yes: bool,
    interactive: bool,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !interactive {
        bail!("refusing to overwrite {target} without --yes (stdin is not a terminal)");
    }
    write!(
        out,
        "kiln flash will overwrite {what}.\nEverything on it will be lost. Continue? [y/N] "
    )?;
    out.flush()?;
    let mut line = String::new();
    input.read_line(&mut line).context("reading the answer")?;
    match line.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => bail!("not confirmed: {target} was left as it was"),
    }
}

// ---------------------------------------------------------------------------
// The command.

/// `kiln flash`'s arguments.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub image: PathBuf,
    /// A block device (whole disk) or a regular file.
    pub target: PathBuf,
    pub flags: Flags,
    /// A node config file whose keys the flags override.
    pub config: Option<PathBuf>,
    /// Overwrite without asking.
    pub yes: bool,
}

/// What `kiln flash` did.
#[derive(Clone, Debug)]
pub struct Report {
    pub image: PathBuf,
    pub target: PathBuf,
    pub copied: Copied,
    /// The settings written as kiln.yaml; None: the image's own.
    pub settings: Option<Settings>,
}

impl Report {
    pub fn render(&self) -> String {
        let settings = match &self.settings {
            Some(s) => format!("{SETTINGS_FILE} ({})", s.summary()),
            None => "the image's own".into(),
        };
        format!(
            "flashed {} to {}\n  written:  {} bytes ({}), read back and verified\n  sha256:   {}\n  settings: {settings}\n",
            self.image.display(),
            self.target.display(),
            self.copied.bytes,
            gb(self.copied.bytes),
            self.copied.sha256,
        )
    }
}

/// Where the image goes.
enum Dest {
    NewFile,
    File { len: u64 },
    Block(BlockDevice),
}

/// Whether `p` (which may not exist yet) is in /dev.
fn under_dev(p: &Path) -> bool {
    let real = std::fs::canonicalize(p).ok().or_else(|| {
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::canonicalize(parent).ok()
    });
    real.is_some_and(|r| r.starts_with("/dev"))
}

/// The node settings the options ask for; None when they ask for none.
pub fn settings_of(o: &Options) -> Result<Option<Settings>> {
    if o.config.is_none() && o.flags.is_empty() {
        return Ok(None);
    }
    let mut s = match &o.config {
        Some(p) => Settings::load(p)?,
        None => Settings::default(),
    };
    s.apply(&o.flags)?;
    Ok(Some(s))
}

/// `kiln flash`: checks everything, asks (unless `yes`), writes, reads back.
pub fn flash(o: &Options) -> Result<Report> {
    let image_name = o.image.display().to_string();
    let target_name = o.target.display().to_string();
    let settings = settings_of(o)?;

    let mut image =
        File::open(&o.image).with_context(|| format!("opening the image {image_name}"))?;
    let meta = image
        .metadata()
        .with_context(|| format!("reading {image_name}"))?;
    if !meta.is_file() {
        bail!("{image_name} is not a regular file (an image made by kiln build, e.g. out/rpi4/sdcard.img)");
    }
    let len = meta.len();
    if len == 0 {
        bail!("{image_name} is empty");
    }
    let mut head = vec![0u8; HEAD];
    let got = read_full(&mut image, &mut head).with_context(|| format!("reading {image_name}"))?;
    if let Some(kind) = compressed(&head[..got]) {
        bail!("{image_name} is compressed ({kind}): decompress it first, then flash the raw image");
    }

    // The settings go into an overlay of the image; the image is not changed.
    let mut source = Overlay::new(image, len);
    if let Some(s) = &settings {
        let part = boot_partition(&head[..got], len, &image_name)?;
        write_settings(&mut source, part, &s.to_yaml(), &image_name)?;
        source.seek(SeekFrom::Start(0))?;
    }

    let dest = match std::fs::metadata(&o.target) {
        // A device that is not there (a card not in its reader, a typo)
        // must not become a file in /dev.
        Err(e) if e.kind() == io::ErrorKind::NotFound && under_dev(&o.target) => {
            bail!(
                "{target_name}: no such device (is the card in the reader? lsblk lists the disks)"
            )
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Dest::NewFile,
        Err(e) => return Err(e).with_context(|| format!("looking at {target_name}")),
        Ok(m) if m.is_file() && under_dev(&o.target) => {
            bail!("{target_name} is a regular file in /dev, not a device: name a whole disk, e.g. /dev/sdb")
        }
        Ok(m) if m.is_file() => {
            if (m.dev(), m.ino()) == (meta.dev(), meta.ino()) {
                bail!(
                    "{target_name} is the image {image_name} itself: name another file or a device"
                );
            }
            Dest::File { len: m.len() }
        }
        Ok(m) if m.file_type().is_block_device() => {
            let rdev = m.rdev();
            let dev = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
            let sys = Path::new("/sys");
            let d = BlockDevice::read(&o.target, dev, sys)?;
            check_block_device(&d, len, &SystemState::read(sys))?;
            Dest::Block(d)
        }
        Ok(m) => {
            let kind = if m.is_dir() {
                "a directory"
            } else if m.file_type().is_char_device() {
                "a character device"
            } else {
                "neither a block device nor a regular file"
            };
            bail!("{target_name} is {kind}: name a whole disk (e.g. /dev/sdb) or a file");
        }
    };

    let what = match &dest {
        Dest::NewFile => None,
        Dest::File { len } => Some(format!("the file {target_name} ({len} bytes)")),
        Dest::Block(d) => Some(format!("the disk {}", d.describe())),
    };
    if let Some(what) = what {
        let stdin = io::stdin();
        confirm(
            &what,
            &target_name,
            o.yes,
            stdin.is_terminal(),
            &mut stdin.lock(),
            &mut io::stderr(),
        )?;
    }

    let mut open = std::fs::OpenOptions::new();
    open.read(true).write(true);
    match &dest {
        Dest::NewFile => {
            open.create_new(true);
        }
        Dest::File { .. } => {}
        // O_EXCL on a block device: fails (EBUSY) while the kernel has it
        // mounted or another program holds it exclusively.
        Dest::Block(_) => {
            open.custom_flags(rustix::fs::OFlags::EXCL.bits() as i32);
        }
    }
    let file = open.open(&o.target).map_err(|e| {
        let hint = if e.raw_os_error() == Some(16) {
            " (busy: mounted, or in use by another program)"
        } else {
            ""
        };
        anyhow::Error::new(e).context(format!("opening {target_name} for writing{hint}"))
    })?;
    let block = matches!(dest, Dest::Block(_));
    if block {
        let size =
            block_size(&file).with_context(|| format!("reading the size of {target_name}"))?;
        if size < len {
            bail!("{target_name} holds {size} bytes, less than the image's {len} bytes");
        }
    }
    tracing::debug!(
        "{image_name}: the settings changed {} bytes (4 KiB blocks)",
        source.changed_bytes()
    );
    let mut target = FileTarget { file, block };
    let copied = copy_and_verify(
        &mut source,
        &image_name,
        len,
        &mut target,
        &target_name,
        io::stderr().is_terminal(),
    )?;
    if block {
        // Let the kernel see the new partitions (/dev/sdb1 to edit
        // kiln.yaml later); best effort: it fails while a partition is busy.
        const BLKRRPART: rustix::ioctl::Opcode = rustix::ioctl::opcode::none(0x12, 95);
        // SAFETY: BLKRRPART takes no argument.
        let r =
            unsafe { rustix::ioctl::ioctl(&target.file, rustix::ioctl::NoArg::<BLKRRPART>::new()) };
        if let Err(e) = r {
            tracing::debug!("{target_name}: re-reading the partition table: {e}");
        }
    }
    Ok(Report {
        image: o.image.clone(),
        target: o.target.clone(),
        copied,
        settings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn lib_sh() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../overlays/base/usr/lib/kiln/lib.sh")
    }

    /// Runs the node's shell parser on `yaml`: `kiln_yaml_scalar KEY` or
    /// `kiln_yaml_block KEY`.
    fn node_reads(yaml: &str, func: &str, key: &str) -> String {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("node.yaml");
        std::fs::write(&f, yaml).unwrap();
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(". \"$0\"; {func} {key} < \"$1\""))
            .arg(lib_sh())
            .arg(&f)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8(o.stdout).unwrap()
    }

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn settings_parse_render_and_read_back_in_the_node_shell() {
        let text = "hostname: pi-07\nrole: agent\nserver: \"http://10.9.8.7:8080\"\n\
                    data_disk: /dev/sda\nk3s:\n  token: \"s3cret\"\n  node-label:\n    - zone=a\n    - \"rack=2\"\n  disable-network-policy: true\n";
        let s = Settings::from_yaml(text, "node.yaml").unwrap();
        assert_eq!(s.hostname.as_deref(), Some("pi-07"));
        assert_eq!(s.role.as_deref(), Some("agent"));
        let y = s.to_yaml();
        assert_eq!(
            y,
            "# kiln node settings, written by kiln flash\nhostname: \"pi-07\"\nrole: \"agent\"\n\
             server: \"http://10.9.8.7:8080\"\ndata_disk: \"/dev/sda\"\nk3s:\n  token: \"s3cret\"\n\
             \x20 node-label: [\"zone=a\",\"rack=2\"]\n  disable-network-policy: true\n"
        );
        // Its own output parses back to the same settings.
        assert_eq!(Settings::from_yaml(&y, "again").unwrap(), s);
        // And the node's parser reads it.
        assert_eq!(node_reads(&y, "kiln_yaml_scalar", "hostname"), "pi-07\n");
        assert_eq!(node_reads(&y, "kiln_yaml_scalar", "role"), "agent\n");
        assert_eq!(
            node_reads(&y, "kiln_yaml_scalar", "server"),
            "http://10.9.8.7:8080\n"
        );
        assert_eq!(
            node_reads(&y, "kiln_yaml_scalar", "data_disk"),
            "/dev/sda\n"
        );
        let k3s = node_reads(&y, "kiln_yaml_block", "k3s");
        assert_eq!(
            k3s,
            "token: \"s3cret\"\nnode-label: [\"zone=a\",\"rack=2\"]\ndisable-network-policy: true\n"
        );
        let again: serde_yaml_ng::Value = serde_yaml_ng::from_str(&k3s).unwrap();
        assert_eq!(again["node-label"][1], "rack=2");
        assert_eq!(s.summary(), "hostname pi-07, role agent, server http://10.9.8.7:8080, data_disk /dev/sda, k3s token node-label disable-network-policy");
    }

    #[test]
    fn flags_override_and_add_and_empty_settings_render_no_k3s() {
        let mut s = Settings::from_yaml("hostname: \"a\"\nrole: server\n", "c.yaml").unwrap();
        s.apply(&Flags {
            hostname: Some("b".into()),
            role: None,
            server: Some("https://kiln.example:8443/".into()),
        })
        .unwrap();
        assert_eq!(
            s.to_yaml(),
            format!("{HEADER}\nhostname: \"b\"\nrole: \"server\"\nserver: \"https://kiln.example:8443/\"\n")
        );
        assert_eq!(Settings::from_yaml("", "e").unwrap(), Settings::default());
        assert_eq!(
            Settings::from_yaml("# only\n", "e").unwrap(),
            Settings::default()
        );
        assert_eq!(
            Settings::from_yaml("k3s:\n", "e").unwrap(),
            Settings::default()
        );
        assert_eq!(Settings::default().summary(), "no keys set");
        // YAML 1.2: a leading zero keeps a mode a string.
        let s = Settings::from_yaml("k3s:\n  write-kubeconfig-mode: 0644\n", "m").unwrap();
        assert!(s
            .to_yaml()
            .ends_with("k3s:\n  write-kubeconfig-mode: \"0644\"\n"));
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = |t: &str| err(Settings::from_yaml(t, "node.yaml"));
        let e = bad("role: master\n");
        assert!(
            e.contains("node.yaml: role \"master\"") && e.contains("\"agent\""),
            "{e}"
        );
        let e = bad("hostname: Pi-07\n");
        assert!(
            e.contains("node.yaml: hostname \"Pi-07\" has upper-case") && e.contains("\"pi-07\""),
            "{e}"
        );
        for h in ["-a", "a-", "a.b", "a_b", &"x".repeat(64), ""] {
            let e = bad(&format!("hostname: \"{h}\"\n"));
            assert!(e.contains("node.yaml: hostname"), "{h}: {e}");
        }
        assert!(hostname_problem(&"x".repeat(63)).is_none());
        assert!(hostname_problem("0-pi-9").is_none());
        let e = bad("hostname: 7\n");
        assert!(e.contains("hostname must be a string"), "{e}");
        let e = bad("colour: blue\n");
        assert!(
            e.contains("node.yaml: unknown key \"colour\"")
                && e.contains("hostname, role, server, data_disk, k3s"),
            "{e}"
        );
        let e = bad("k3s: [a, b]\n");
        assert!(
            e.contains("node.yaml: k3s must be a mapping") && e.contains("a list"),
            "{e}"
        );
        let e = bad("k3s: token\n");
        assert!(e.contains("k3s must be a mapping"), "{e}");
        let e = bad("k3s:\n  \"a b\": 1\n");
        assert!(e.contains("k3s key \"a b\""), "{e}");
        let e = bad("server: 10.0.0.1:8080\n");
        assert!(e.contains("must start with http:// or https://"), "{e}");
        let e = bad("server: \"http://a b\"\n");
        assert!(e.contains("holds ' '"), "{e}");
        let e = bad("server: \"http://\"\n");
        assert!(e.contains("names no host"), "{e}");
        let e = bad("data_disk: sda\n");
        assert!(e.contains("not a /dev/ path"), "{e}");
        let e = bad("- a\n- b\n");
        assert!(e.contains("expected a mapping"), "{e}");
        let e = bad("hostname: [\n");
        assert!(e.starts_with("node.yaml: "), "{e}");
        let e = bad("role: agent\nrole: server\n");
        assert!(e.contains("node.yaml") && e.contains("duplicate"), "{e}");

        let mut s = Settings::default();
        let e = err(s.apply(&Flags {
            role: Some("worker".into()),
            ..Flags::default()
        }));
        assert!(e.starts_with("--role: role \"worker\""), "{e}");
        let e = err(s.apply(&Flags {
            hostname: Some("PI".into()),
            ..Flags::default()
        }));
        assert!(e.starts_with("--hostname: hostname \"PI\""), "{e}");
        let e = err(s.apply(&Flags {
            server: Some("ftp://x".into()),
            ..Flags::default()
        }));
        assert!(e.starts_with("--server: server \"ftp://x\""), "{e}");
    }

    fn mbr_with(kind: u8, lba: u32, sectors: u32) -> Vec<u8> {
        let mut m = vec![0u8; 512];
        m[446 + 4] = kind;
        m[446 + 8..446 + 12].copy_from_slice(&lba.to_le_bytes());
        m[446 + 12..446 + 16].copy_from_slice(&sectors.to_le_bytes());
        m[510] = 0x55;
        m[511] = 0xaa;
        m
    }

    #[test]
    fn the_boot_partition_must_be_fat_on_an_mbr_disk() {
        let p = boot_partition(&mbr_with(0x0c, 8192, 2048), 10 * MIB, "a.img").unwrap();
        assert_eq!(
            p,
            BootPartition {
                start: 4 * MIB,
                size: MIB,
                kind: 0x0c
            }
        );
        let e = err(boot_partition(&vec![0u8; 512], MIB, "a.img"));
        assert!(e.contains("a.img has no MBR"), "{e}");
        let e = err(boot_partition(&mbr_with(0xee, 1, 100), MIB, "a.img"));
        assert!(
            e.contains("a.img has a protective MBR but no GPT header"),
            "{e}"
        );
        let e = err(boot_partition(
            &mbr_with(0x83, 2048, 100),
            10 * MIB,
            "a.img",
        ));
        assert!(
            e.contains("a.img: partition 1 has type 0x83, not FAT"),
            "{e}"
        );
        let e = err(boot_partition(&mbr_with(0, 0, 0), MIB, "a.img"));
        assert!(e.contains("partition 1 of its MBR is empty"), "{e}");
        let e = err(boot_partition(
            &mbr_with(0x0c, 2048, 4096),
            2 * MIB,
            "a.img",
        ));
        assert!(e.contains("does not lie within the image"), "{e}");
    }

    /// A kiln disk image (GPT): the settings go into its ESP, where the
    /// node reads kiln.yaml from partition 1 as on a card.
    #[test]
    fn settings_go_into_the_esp_of_a_gpt_disk() {
        use crate::tree::{Content, Entry, Tree};
        let d = tempfile::tempdir().unwrap();
        let mut t = Tree::new();
        t.mkdir_p(crate::disk::SYSTEMD_BOOT_DIR).unwrap();
        t.insert(
            &format!("{}/systemd-bootx64.efi", crate::disk::SYSTEMD_BOOT_DIR),
            Entry::file(b"MZ".to_vec(), 0o644),
        )
        .unwrap();
        let esp = crate::disk::esp_files(
            &t,
            crate::spec::Arch::X86_64,
            "metal",
            1_735_689_600,
            Content::from(&b"K"[..]),
            Content::from(&b"I"[..]),
        )
        .unwrap();
        let rootfs = d.path().join("rootfs");
        std::fs::write(&rootfs, noise(200_000)).unwrap();
        let img = d.path().join("disk.raw");
        crate::disk::write(
            &img,
            &crate::disk::Disk {
                image: "metal",
                arch: crate::spec::Arch::X86_64,
                epoch: 1_735_689_600,
                esp: &esp,
                rootfs: &rootfs,
            },
        )
        .unwrap();
        let before = std::fs::read(&img).unwrap();
        let p = boot_partition(&before[..HEAD], before.len() as u64, "disk.raw").unwrap();
        assert_eq!((p.start, p.size, p.kind), (MIB, 256 * MIB, KIND_ESP));
        let out = d.path().join("server-disk.img");
        let o = Options {
            image: img.clone(),
            target: out.clone(),
            flags: Flags {
                hostname: Some("rack-1-node-3".into()),
                role: Some("server".into()),
                server: None,
            },
            config: None,
            yes: false,
        };
        flash(&o).unwrap();
        let after = std::fs::read(&out).unwrap();
        let (s, _) = read_settings(&after);
        assert_eq!(s, o.flags_settings_yaml());
        let (a, b) = (p.start as usize, (p.start + p.size) as usize);
        assert!(before[..a] == after[..a] && before[b..] == after[b..]);
        // The ESP still boots: systemd-boot and the entries are there.
        let part = &after[a..b];
        let fs =
            fatfs::FileSystem::new(Cursor::new(part.to_vec()), fatfs::FsOptions::new()).unwrap();
        fs.root_dir().open_file("EFI/BOOT/BOOTX64.EFI").unwrap();
        fs.root_dir()
            .open_file("loader/entries/kiln-a.conf")
            .unwrap();

        // Partition 1 of a GPT that is not an ESP is named.
        let mut other = before.clone();
        other[1024..1040]
            .copy_from_slice(&crate::disk::guid_bytes(crate::disk::TYPE_LINUX_DATA).unwrap());
        let e = err(boot_partition(&other[..HEAD], other.len() as u64, "x.raw"));
        assert!(e.contains("not the EFI system partition"), "{e}");
    }

    #[test]
    fn an_overlay_keeps_writes_and_leaves_the_base_alone() {
        let base: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let mut o = Overlay::new(Cursor::new(base.clone()), base.len() as u64);
        o.seek(SeekFrom::Start(4090)).unwrap();
        o.write_all(&[0xff; 10]).unwrap(); // across two blocks
        o.seek(SeekFrom::Start(19_999)).unwrap();
        assert_eq!(o.write(&[1, 2]).unwrap(), 1);
        assert!(o.write(&[1]).is_err());
        o.seek(SeekFrom::Start(0)).unwrap();
        let mut all = Vec::new();
        // Small reads, to cross block edges at odd places.
        let mut buf = [0u8; 777];
        loop {
            let n = o.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        let mut want = base.clone();
        want[4090..4100].fill(0xff);
        want[19_999] = 1;
        assert_eq!(all, want);
        assert_eq!(o.changed_bytes(), 3 * BLOCK);
        assert_eq!(o.base.get_ref(), &base);
    }

    /// Pseudo-random bytes (xorshift), so that every MiB differs.
    fn noise(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A target in memory that flips one bit of what is written at `at`.
    struct Corrupting {
        inner: Cursor<Vec<u8>>,
        at: u64,
        synced: bool,
    }

    impl Read for Corrupting {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            assert!(self.synced, "read back before the sync");
            self.inner.read(buf)
        }
    }
    impl Write for Corrupting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let pos = self.inner.position();
            let n = self.inner.write(buf)?;
            if (pos..pos + n as u64).contains(&self.at) {
                self.inner.get_mut()[self.at as usize] ^= 0x10;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Seek for Corrupting {
        fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
            self.inner.seek(to)
        }
    }
    impl Target for Corrupting {
        fn sync(&mut self) -> io::Result<()> {
            self.synced = true;
            Ok(())
        }
    }

    #[test]
    fn a_clean_copy_reads_back_equal() {
        let img = noise(8 * MIB as usize + 12_345);
        let mut target = Cursor::new(vec![0xa5u8; 10 * MIB as usize]);
        let c = copy_and_verify(
            &mut Cursor::new(&img),
            "img",
            img.len() as u64,
            &mut target,
            "dev",
            false,
        )
        .unwrap();
        assert_eq!(c.bytes, img.len() as u64);
        assert_eq!(c.sha256, crate::sha256_hex(&img));
        let t = target.into_inner();
        assert_eq!(
            t.len(),
            10 * MIB as usize,
            "a larger target keeps its length"
        );
        assert!(t[..img.len()] == img[..]);
        assert!(t[img.len()..].iter().all(|&b| b == 0xa5));
    }

    #[test]
    fn a_bad_byte_on_the_target_is_found_and_its_mib_named() {
        let img = noise(8 * MIB as usize);
        let at = 5 * MIB + 7;
        let mut target = Corrupting {
            inner: Cursor::new(Vec::new()),
            at,
            synced: false,
        };
        let e = err(copy_and_verify(
            &mut Cursor::new(&img),
            "img",
            img.len() as u64,
            &mut target,
            "/dev/sdz",
            false,
        ));
        let mib = &img[5 * MIB as usize..6 * MIB as usize];
        let mut bad = mib.to_vec();
        bad[7] ^= 0x10;
        assert!(
            e.contains("verifying /dev/sdz: the MiB at byte offset 5242880 reads back differently"),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "expected sha256 {}, read {}",
                crate::sha256_hex(mib),
                crate::sha256_hex(&bad)
            )),
            "{e}"
        );
    }

    #[test]
    fn a_short_source_or_target_is_an_error() {
        let img = noise(3 * MIB as usize);
        let e = err(copy_and_verify(
            &mut Cursor::new(&img),
            "img",
            4 * MIB,
            &mut Cursor::new(Vec::new()),
            "t",
            false,
        ));
        assert!(
            e.contains("img ends at byte 3145728, before its 4194304 bytes"),
            "{e}"
        );
    }

    fn dev(name: &str, dev: (u32, u32), size: u64) -> BlockDevice {
        BlockDevice {
            path: PathBuf::from(format!("/dev/{name}")),
            name: name.into(),
            dev,
            size,
            ..BlockDevice::default()
        }
    }

    const MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 8:17 / /media/my\\040card rw,relatime - vfat /dev/sdb1 rw
41 27 0:45 / /mnt/b rw,relatime - btrfs /dev/sdc2 rw
";
    const SWAPS: &str = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/dev/sdd3                               partition\t1000\t0\t-2\n/swapfile file 10 0 -3\n";

    fn system() -> SystemState {
        SystemState {
            mountinfo: MOUNTINFO.into(),
            swaps: SWAPS.into(),
            system_disks: vec![("vda".into(), "/".into())],
        }
    }

    #[test]
    fn mountinfo_and_swaps_parse() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[2],
            Mount {
                dev: (8, 17),
                mount_point: "/media/my card".into(),
                source: "/dev/sdb1".into()
            }
        );
        assert_eq!(parse_swaps(SWAPS), ["/dev/sdd3", "/swapfile"]);
        assert_eq!(unescape("a\\040b\\134c\\777\\04"), "a b\\c\\777\\04");
    }

    #[test]
    fn refusals_of_block_devices() {
        let s = system();
        let gib = 1 << 30;
        // A free card is fine.
        let mut ok = dev("sde", (8, 64), 32 * gib);
        ok.partitions = vec![("sde1".into(), (8, 65))];
        check_block_device(&ok, gib, &s).unwrap();

        let mut p = dev("sde1", (8, 65), gib);
        p.partition_of = Some("sde".into());
        let e = err(check_block_device(&p, MIB, &s));
        assert!(
            e.contains("/dev/sde1 is a partition")
                && e.contains("name the whole disk, e.g. /dev/sde"),
            "{e}"
        );

        let e = err(check_block_device(
            &dev("vda", (254, 0), 100 * gib),
            MIB,
            &s,
        ));
        assert!(
            e.contains("/dev/vda is the disk the running system is on (/ is on /dev/vda)"),
            "{e}"
        );

        // Mounted: a partition by its number, or by name (btrfs' anonymous dev).
        let mut b = dev("sdb", (8, 16), 32 * gib);
        b.partitions = vec![("sdb1".into(), (8, 17))];
        let e = err(check_block_device(&b, MIB, &s));
        assert!(
            e.contains("/dev/sdb: /dev/sdb1 is mounted on /media/my card"),
            "{e}"
        );
        let mut c = dev("sdc", (8, 32), 32 * gib);
        c.partitions = vec![("sdc1".into(), (8, 33)), ("sdc2".into(), (8, 34))];
        let e = err(check_block_device(&c, MIB, &s));
        assert!(e.contains("/dev/sdc2 is mounted on /mnt/b"), "{e}");

        let mut d = dev("sdd", (8, 48), 32 * gib);
        d.partitions = vec![("sdd3".into(), (8, 51))];
        let e = err(check_block_device(&d, MIB, &s));
        assert!(e.contains("/dev/sdd3 is in use as swap"), "{e}");

        let mut h = ok.clone();
        h.holders = vec![("sde1".into(), "dm-0".into())];
        let e = err(check_block_device(&h, MIB, &s));
        assert!(e.contains("/dev/sde1 is in use by /dev/dm-0"), "{e}");

        let mut r = ok.clone();
        r.read_only = true;
        assert!(err(check_block_device(&r, MIB, &s)).contains("read-only"));
        let e = err(check_block_device(&dev("sdf", (8, 80), 0), MIB, &s));
        assert!(e.contains("has no medium"), "{e}");
        let e = err(check_block_device(&ok, 33 * gib, &s));
        assert!(
            e.contains("/dev/sde holds 34359738368 bytes (34.4 GB), less than the image's"),
            "{e}"
        );
    }

    /// A fake /sys: sdx (8:16) with partitions sdx1 and sdx2, sdx2 held by
    /// dm-0 (253:0), whose slave it is.
    fn fake_sys() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let s = t.path();
        let w = |p: &str, v: &str| {
            let p = s.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        };
        let disk = "devices/pci0/usb1/block/sdx";
        w(&format!("{disk}/size"), "62333952\n");
        w(&format!("{disk}/ro"), "0\n");
        w(&format!("{disk}/removable"), "1\n");
        w(&format!("{disk}/device/vendor"), "Generic \n");
        w(&format!("{disk}/device/model"), "SD Card\n");
        std::fs::create_dir_all(s.join(disk).join("holders")).unwrap();
        for (n, minor) in [(1, 17), (2, 18)] {
            w(&format!("{disk}/sdx{n}/partition"), &format!("{n}\n"));
            w(&format!("{disk}/sdx{n}/dev"), &format!("8:{minor}\n"));
            w(&format!("{disk}/sdx{n}/size"), "1000\n");
            std::fs::create_dir_all(s.join(format!("{disk}/sdx{n}/holders"))).unwrap();
        }
        std::fs::create_dir_all(s.join(format!("{disk}/sdx2/holders/dm-0"))).unwrap();
        w("devices/virtual/block/dm-0/size", "1000\n");
        std::fs::create_dir_all(s.join("devices/virtual/block/dm-0/slaves/sdx2")).unwrap();
        std::fs::create_dir_all(s.join("dev/block")).unwrap();
        std::fs::create_dir_all(s.join("class/block")).unwrap();
        let link = |from: &str, to: &str| std::os::unix::fs::symlink(to, s.join(from)).unwrap();
        link("dev/block/8:16", &format!("../../{disk}"));
        link("dev/block/8:17", &format!("../../{disk}/sdx1"));
        link("dev/block/8:18", &format!("../../{disk}/sdx2"));
        link("dev/block/253:0", "../../devices/virtual/block/dm-0");
        link("class/block/sdx2", &format!("../../{disk}/sdx2"));
        t
    }

    #[test]
    fn block_device_facts_come_from_sysfs() {
        let sys = fake_sys();
        let d = BlockDevice::read(Path::new("/dev/sdx"), (8, 16), sys.path()).unwrap();
        assert_eq!(d.name, "sdx");
        assert_eq!(d.partition_of, None);
        assert_eq!(d.size, 62_333_952 * 512);
        assert!(d.removable && !d.read_only);
        assert_eq!(d.model.as_deref(), Some("Generic SD Card"));
        assert_eq!(
            d.partitions,
            [("sdx1".to_string(), (8, 17)), ("sdx2".to_string(), (8, 18))]
        );
        assert_eq!(d.holders, [("sdx2".to_string(), "dm-0".to_string())]);
        assert_eq!(
            d.describe(),
            "/dev/sdx (31.9 GB, Generic SD Card, removable, partitions sdx1 sdx2)"
        );
        let e = err(check_block_device(&d, MIB, &SystemState::default()));
        assert!(e.contains("/dev/sdx2 is in use by /dev/dm-0"), "{e}");

        let p = BlockDevice::read(Path::new("/dev/sdx1"), (8, 17), sys.path()).unwrap();
        assert_eq!(p.partition_of.as_deref(), Some("sdx"));
        let e = err(check_block_device(&p, MIB, &SystemState::default()));
        assert!(e.contains("e.g. /dev/sdx"), "{e}");

        // The system's disk through a partition, and through device mapper.
        assert_eq!(whole_disks((8, 17), sys.path()), ["sdx"]);
        assert_eq!(whole_disks((253, 0), sys.path()), ["sdx"]);
        assert!(whole_disks((9, 9), sys.path()).is_empty());
        let s = SystemState {
            system_disks: vec![("sdx".into(), "/".into())],
            ..SystemState::default()
        };
        let mut free = d.clone();
        free.holders.clear();
        let e = err(check_block_device(&free, MIB, &s));
        assert!(e.contains("running system"), "{e}");
    }

    #[test]
    fn the_running_systems_disk_is_refused() {
        // Read-only look-ups of this machine: whatever disk holds / (none in
        // some containers) is refused.
        let sys = Path::new("/sys");
        let state = SystemState::read(sys);
        let root = std::fs::metadata("/").unwrap().dev();
        let root = (rustix::fs::major(root), rustix::fs::minor(root));
        if root.0 != 0
            && sys
                .join(format!("dev/block/{}:{}", root.0, root.1))
                .exists()
        {
            assert!(!state.system_disks.is_empty(), "/ is on {root:?}");
        }
        for (disk, _) in &state.system_disks {
            let Some(dev) = read_trimmed(&sys.join("class/block").join(disk).join("dev"))
                .and_then(|s| parse_dev(&s))
            else {
                continue;
            };
            let d = BlockDevice::read(&Path::new("/dev").join(disk), dev, sys).unwrap();
            let e = err(check_block_device(&d, 1, &state));
            assert!(e.contains("running system") || e.contains("mounted"), "{e}");
        }
    }

    #[test]
    fn confirmation() {
        let mut out = Vec::new();
        confirm("x", "/dev/sdz", true, false, &mut &b""[..], &mut out).unwrap();
        let e = err(confirm(
            "x",
            "/dev/sdz",
            false,
            false,
            &mut &b"y\n"[..],
            &mut out,
        ));
        assert_eq!(
            e,
            "refusing to overwrite /dev/sdz without --yes (stdin is not a terminal)"
        );
        assert!(out.is_empty());
        for yes in ["y\n", "YES\n", " yes "] {
            confirm(
                "the disk /dev/sdz (1 GB)",
                "/dev/sdz",
                false,
                true,
                &mut yes.as_bytes(),
                &mut out,
            )
            .unwrap();
        }
        let asked = String::from_utf8(out).unwrap();
        assert!(
            asked.starts_with("kiln flash will overwrite the disk /dev/sdz (1 GB).\n"),
            "{asked}"
        );
        assert!(asked.ends_with("[y/N] "), "{asked}");
        for no in ["\n", "n\n", "", "yep\n"] {
            let e = err(confirm(
                "x",
                "/dev/sdz",
                false,
                true,
                &mut no.as_bytes(),
                &mut Vec::new(),
            ));
            assert!(e.contains("not confirmed"), "{e}");
        }
    }

    /// A small kiln card in `dir`.
    fn card(dir: &Path) -> PathBuf {
        let img = dir.join("card.img");
        crate::sdcard::write_sample(&img, "t", &noise(300_000)).unwrap();
        img
    }

    fn read_settings(img: &[u8]) -> (String, fatfs::DateTime) {
        let p = boot_partition(&img[..HEAD], img.len() as u64, "t").unwrap();
        let part = &img[p.start as usize..(p.start + p.size) as usize];
        let fs =
            fatfs::FileSystem::new(Cursor::new(part.to_vec()), fatfs::FsOptions::new()).unwrap();
        let root = fs.root_dir();
        let mut s = String::new();
        root.open_file(SETTINGS_FILE)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        let e = root
            .iter()
            .map(Result::unwrap)
            .find(|e| e.file_name() == SETTINGS_FILE)
            .unwrap();
        (s, e.modified())
    }

    #[test]
    fn flash_to_a_new_file_writes_the_settings_and_leaves_the_image_alone() {
        let d = tempfile::tempdir().unwrap();
        let img = card(d.path());
        let before = std::fs::read(&img).unwrap();
        let out = d.path().join("out.img");
        let o = Options {
            image: img.clone(),
            target: out.clone(),
            flags: Flags {
                hostname: Some("pi-07".into()),
                role: Some("agent".into()),
                server: Some("http://10.9.8.7:8080".into()),
            },
            config: None,
            yes: false, // a new file needs no confirmation
        };
        let r = flash(&o).unwrap();
        assert_eq!(std::fs::read(&img).unwrap(), before, "the image changed");
        let after = std::fs::read(&out).unwrap();
        assert_eq!(after.len(), before.len());
        assert_eq!(r.copied.sha256, crate::sha256_hex(&after));
        let (s, when) = read_settings(&after);
        assert_eq!(s, o.flags_settings_yaml());
        let (_, was) = read_settings(&before);
        assert_eq!(when, was, "kiln.yaml keeps the image's time");
        // Only the boot partition differs.
        let p = boot_partition(&before[..512], before.len() as u64, "t").unwrap();
        let (a, b) = (p.start as usize, (p.start + p.size) as usize);
        assert!(before[..a] == after[..a] && before[b..] == after[b..]);
        let text = r.render();
        assert!(
            text.contains(
                "settings: kiln.yaml (hostname pi-07, role agent, server http://10.9.8.7:8080)"
            ),
            "{text}"
        );

        // Again over the same file, now without settings: the image as it is.
        let r = flash(&Options {
            flags: Flags::default(),
            yes: true,
            ..o.clone()
        })
        .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), before);
        assert!(r.render().contains("settings: the image's own"));
    }

    impl Options {
        fn flags_settings_yaml(&self) -> String {
            settings_of(self).unwrap().unwrap().to_yaml()
        }
    }

    #[test]
    fn flash_refuses_the_image_itself_other_kinds_and_settings_on_non_mbr_images() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("raw.img");
        std::fs::write(&raw, noise(100_000)).unwrap();
        let o = |target: &Path, hostname: Option<&str>| Options {
            image: raw.clone(),
            target: target.to_path_buf(),
            flags: Flags {
                hostname: hostname.map(String::from),
                ..Flags::default()
            },
            yes: true,
            ..Options::default()
        };
        let e = err(flash(&o(&raw, None)));
        assert!(e.contains("is the image") && e.contains("itself"), "{e}");
        let link = d.path().join("hard.img");
        std::fs::hard_link(&raw, &link).unwrap();
        assert!(err(flash(&o(&link, None))).contains("itself"));
        let e = err(flash(&o(d.path(), None)));
        assert!(e.contains("is a directory"), "{e}");
        let e = err(flash(&o(Path::new("/dev/null"), None)));
        assert!(e.contains("is a character device"), "{e}");
        let missing = Path::new("/dev/kiln-flash-test-no-such-disk");
        let e = err(flash(&o(missing, None)));
        assert!(e.contains("no such device"), "{e}");
        assert!(!missing.exists());
        assert!(under_dev(Path::new("/dev/sdz1")) && !under_dev(&d.path().join("x")));
        let e = err(flash(&o(&d.path().join("new.img"), Some("pi"))));
        assert!(e.contains("raw.img has no MBR partition table"), "{e}");
        assert!(!d.path().join("new.img").exists());
        // Without settings a raw image is written as it is.
        flash(&o(&d.path().join("new.img"), None)).unwrap();
        assert_eq!(
            std::fs::read(d.path().join("new.img")).unwrap(),
            std::fs::read(&raw).unwrap()
        );
        let xz = d.path().join("c.img.xz");
        std::fs::write(&xz, b"\xfd7zXZ\0rest").unwrap();
        let e = err(flash(&Options {
            image: xz,
            ..o(&d.path().join("x.img"), None)
        }));
        assert!(e.contains("is compressed (xz)"), "{e}");
    }
}
