//! Raspberry Pi network boot over TFTP: the files a Pi 4 or Pi 5 bootloader
//! asks for, under `<serial>/` (its default TFTP prefix) and without it.
//!
//! # Where the boot files come from
//!
//! A Pi image is what `kiln build` writes for an `sdcard` output:
//! `<images>/<image>/sdcard.img` and its `manifest.json`. The card's
//! partition 1 (found in its MBR, not assumed at 4 MiB) is the FAT boot
//! partition with the firmware (start4.elf, fixup4.dat, ...), the DTBs,
//! overlays/, the kernel, the initramfs, config.txt and cmdline.txt. Those
//! files are read from it with `fatfs` (names are case-insensitive, as on
//! FAT); nothing is unpacked to disk.
//!
//! Nothing is served from a card before the card has been checked against
//! its manifest (size and sha256). The check runs once per version of the
//! file (device, inode, size, mtime, and the sha256 the manifest expects) and
//! its verdict is kept: a card that does not match serves nothing (TFTP
//! ERROR 2 "access violation"), and one error line in the log names the
//! image and the expected and actual sha256. Hashing a card takes seconds:
//! [`PiFiles::from_config`] starts it on a thread of its own for the images
//! Pis boot (the default and the inventory's), and a request that comes
//! first waits for it (the TFTP server calls `open` on tokio's blocking
//! pool). The card's file stays open from the check on, so what is read is
//! what was hashed even when `kiln build` renames a new card over it; the
//! next request then sees the new file and checks it. Files read from a card
//! are kept in memory (only the ones a Pi asked for), so the next Pi's boot
//! does not read the FAT again.
//!
//! `<images>/<image>/boot/`, when it exists, overrides the card wholly (a
//! file it lacks is not looked for on the card): its files are served as
//! they are, through [`RootDir`] (no path leaves the directory), and
//! unchecked (they are not in the manifest). It is there to try other
//! firmware or a hand-written config.txt without rebuilding the image.
//!
//! Two files are made per machine:
//!
//! - `config.txt`: the image's own (or a minimal one: 64-bit, kernel and
//!   initramfs), under a comment naming the machine;
//! - `cmdline.txt`: the image's `cmdline.txt` (console settings; its own
//!   `kiln.*` arguments, such as an SD card's `kiln.root=PARTUUID=...`,
//!   dropped) followed by the `kiln.*` arguments that make its initramfs
//!   fetch the root by HTTP from this server, as the iPXE script does for
//!   PCs. That needs `rootfs.squashfs` in the manifest: a Pi image built
//!   with `outputs = ["sdcard"]` alone has its root only inside the card, so
//!   a Pi image meant for network boot is built with `["pxe", "sdcard"]`.
//!
//! Which machine asks: the serial prefix names it (the DHCP server records
//! each Pi's serial and MAC from option 97); without a prefix, the client's
//! address is looked up in the kernel's neighbour table (/proc/net/arp). Its
//! inventory entry (by MAC or serial) chooses the image; otherwise the default.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use kiln_builder::manifest::{Artifact, LoadError, Manifest};

use crate::config::Machine;
use crate::state::State;
use crate::tftp::files::{sanitize_path, FileSource, RootDir, TftpError, TftpFile};

/// The `config.txt` of a Pi image that brings none.
pub const DEFAULT_CONFIG_TXT: &str =
    "arm_64bit=1\nkernel=vmlinuz\ninitramfs initrd.img followkernel\n";

/// The SD-card image (an artifact of the image) whose boot partition a Pi
/// boots from.
pub const SDCARD: &str = "sdcard.img";

/// The directory that, when an image has it, overrides its card.
pub const BOOT_DIR: &str = "boot";

/// Raspberry Pi boot files, per machine.
pub struct PiFiles {
    pub images: PathBuf,
    pub default_image: String,
    pub machines: Vec<Machine>,
    /// Under `allowlist`, Pis outside the inventory get no files.
    pub admission: crate::config::Admission,
    pub state: Arc<State>,
    pub public_url: String,
    pub kernel_args: BTreeMap<String, String>,
    /// The MAC of a client address (the neighbour table; tests replace it).
    pub neighbour: fn(IpAddr) -> Option<String>,
    /// The images' checked cards and the files read from them.
    pub cards: Arc<Cards>,
}

// ---------------------------------------------------------------- cards

use crate::artifacts::FileId;

/// Why a card's files are not served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    /// The card is not the one its manifest describes.
    #[error(
        "{path} does not match manifest.json: its {what} is {actual}, the manifest says \
         {expected}; its boot files are not served (rebuild the image)"
    )]
    Mismatch {
        path: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    /// The card cannot be read, or its boot partition is not FAT.
    #[error("{0}")]
    Unreadable(String),
}

/// The checked boot partitions of images' cards, by path, with the files
/// read from them. One per [`PiFiles`], shared with its background check.
#[derive(Default)]
pub struct Cards {
    entries: Mutex<HashMap<PathBuf, Arc<CardEntry>>>,
}

struct CardEntry {
    id: FileId,
    /// What the manifest says the card is.
    sha256: String,
    size: u64,
    /// Filled once by the first request; later ones wait for it.
    verdict: OnceLock<Result<Arc<BootPartition>, CardError>>,
}

/// A card's boot partition, its card checked against the manifest.
pub struct BootPartition {
    /// The checked card, kept open: a card renamed over it later is another
    /// file, checked on its own.
    file: File,
    start: u64,
    len: u64,
    /// Files read so far, by lower-case path (FAT names are
    /// case-insensitive).
    files: Mutex<HashMap<String, Bytes>>,
}

impl Cards {
    /// The boot partition of `image`'s card at `path`, which its manifest
    /// lists as `want`: checked the first time this version of the file is
    /// asked for (blocking: seconds for a real card), the verdict kept.
    pub fn boot(
        &self,
        image: &str,
        path: &Path,
        want: &Artifact,
    ) -> Result<Arc<BootPartition>, CardError> {
        let unreadable = |e: io::Error| CardError::Unreadable(format!("{}: {e}", path.display()));
        let file = File::open(path).map_err(unreadable)?;
        let id = FileId::of(&file.metadata().map_err(unreadable)?);
        let entry = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let fresh = entries
                .get(path)
                .is_some_and(|e| e.id == id && e.sha256 == want.sha256 && e.size == want.size);
            if !fresh {
                entries.insert(
                    path.to_path_buf(),
                    Arc::new(CardEntry {
                        id,
                        sha256: want.sha256.clone(),
                        size: want.size,
                        verdict: OnceLock::new(),
                    }),
                );
            }
            entries[path].clone()
        };
        entry
            .verdict
            .get_or_init(|| {
                let started = Instant::now();
                tracing::info!(%image, card = %path.display(), size = id.size, "tftp: checking the Raspberry Pi image's {SDCARD} against its manifest");
                let verdict = check(path, file, id, want).map(Arc::new);
                match &verdict {
                    Ok(p) => tracing::info!(
                        %image,
                        card = %path.display(),
                        boot_partition_start = p.start,
                        boot_partition_size = p.len,
                        ms = started.elapsed().as_millis() as u64,
                        "tftp: {SDCARD} matches its manifest; serving its boot partition"
                    ),
                    Err(CardError::Mismatch {
                        what,
                        expected,
                        actual,
                        ..
                    }) => tracing::error!(
                        %image,
                        card = %path.display(),
                        %expected,
                        %actual,
                        "tftp: image {image}: {SDCARD} does not match manifest.json ({what} {actual}, the manifest says {expected}): its boot files are not served; rebuild the image"
                    ),
                    Err(e) => tracing::error!(%image, "tftp: image {image}: {e}: its boot files are not served"),
                }
                verdict
            })
            .clone()
    }
}

/// Checks the card (size, sha256) through the open `file` whose identity
/// is `id`, then finds its FAT boot partition.
fn check(path: &Path, file: File, id: FileId, want: &Artifact) -> Result<BootPartition, CardError> {
    let mismatch = |what, expected: String, actual: String| CardError::Mismatch {
        path: path.display().to_string(),
        what,
        expected,
        actual,
    };
    let unreadable = |e: String| CardError::Unreadable(format!("{}: {e}", path.display()));
    if id.size != want.size {
        return Err(mismatch(
            "size",
            format!("{} bytes", want.size),
            format!("{} bytes", id.size),
        ));
    }
    let sha256 = sha256_of(&file, id.size).map_err(|e| unreadable(format!("hashing: {e}")))?;
    if sha256 != want.sha256 {
        return Err(mismatch("sha256", want.sha256.clone(), sha256));
    }
    let now = file
        .metadata()
        .map_err(|e| unreadable(format!("reading its metadata: {e}")))?;
    if FileId::of(&now) != id {
        return Err(unreadable("changed while it was checked".into()));
    }
    let (start, len) = boot_partition(&file, id.size).map_err(unreadable)?;
    let part = BootPartition {
        file,
        start,
        len,
        files: Mutex::default(),
    };
    part.mount(|_| Ok(()))
        .map_err(|e| unreadable(format!("partition 1 is not a FAT volume: {e}")))?;
    Ok(part)
}

/// sha256 (hex) of the first `size` bytes of `file`, read by position.
fn sha256_of(file: &File, size: u64) -> io::Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        let want = buf
            .len()
            .min(usize::try_from(size - pos).unwrap_or(usize::MAX));
        let n = file.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file ended early",
            ));
        }
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Start and length in bytes of partition 1 of the disk in `file` (`size`
/// bytes): the FAT boot partition of a card, as `kiln flash` finds it.
fn boot_partition(file: &File, size: u64) -> Result<(u64, u64), String> {
    let mut head = vec![0u8; kiln_builder::flash::HEAD.min(size as usize)];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| format!("reading its partition table: {e}"))?;
    let p = kiln_builder::flash::boot_partition(&head, size, "the card")
        .map_err(|e| format!("{e:#}"))?;
    Ok((p.start, p.size))
}

/// A read-only stream over a shared file by positioned reads (`pread`), so
/// that threads reading one card never move each other's offset. Writes
/// fail (fatfs wants a writable stream; it writes nothing when it only
/// reads).
struct ReadAt<'f> {
    file: &'f File,
    pos: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ReadAt<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.file.metadata()?.len().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

impl Write for ReadAt<'_> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the card is read-only here",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

type Fat<'a, 'f> = fatfs::FileSystem<kiln_builder::fat::Slice<'a, ReadAt<'f>>>;

impl BootPartition {
    /// Runs `f` on the boot partition's FAT volume.
    fn mount<T>(&self, f: impl FnOnce(&Fat) -> io::Result<T>) -> io::Result<T> {
        let mut disk = ReadAt {
            file: &self.file,
            pos: 0,
        };
        let part = kiln_builder::fat::Slice::new(&mut disk, self.start, self.len)?;
        let fs = fatfs::FileSystem::new(part, fatfs::FsOptions::new())?;
        f(&fs)
    }

    /// The file at `rel` (a sanitized path), or `None` if the partition has
    /// no such file. Read from the FAT the first time, then from memory.
    pub fn read(&self, rel: &str) -> io::Result<Option<Bytes>> {
        let key = rel.to_ascii_lowercase();
        let cached = |files: &Mutex<HashMap<String, Bytes>>| {
            files
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .cloned()
        };
        if let Some(b) = cached(&self.files) {
            return Ok(Some(b));
        }
        let Some(bytes) = self.mount(|fs| {
            let Some(entry) = find(fs.root_dir(), rel)? else {
                return Ok(None);
            };
            let mut data = Vec::with_capacity(usize::try_from(entry.len()).unwrap_or(0));
            entry.to_file().read_to_end(&mut data)?;
            Ok(Some(Bytes::from(data)))
        })?
        else {
            return Ok(None);
        };
        // Two first readers at once: both read, one copy is kept.
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Some(files.entry(key).or_insert(bytes).clone()))
    }
}

/// The regular file at `rel` ('/'-separated) below `dir`, names compared
/// case-insensitively (long or 8.3 name), as FAT does.
fn find<'a, T: fatfs::ReadWriteSeek>(
    mut dir: fatfs::Dir<'a, T>,
    rel: &str,
) -> io::Result<Option<fatfs::DirEntry<'a, T>>> {
    let mut parts = rel.split('/').peekable();
    while let Some(name) = parts.next() {
        let mut found = None;
        for e in dir.iter() {
            let e = e?;
            if e.file_name().eq_ignore_ascii_case(name)
                || e.short_file_name().eq_ignore_ascii_case(name)
            {
                found = Some(e);
                break;
            }
        }
        let Some(e) = found else { return Ok(None) };
        if parts.peek().is_none() {
            return Ok(e.is_file().then_some(e));
        }
        if !e.is_dir() {
            return Ok(None);
        }
        dir = e.to_dir();
    }
    Ok(None)
}

/// Where an image's boot files are.
enum Boot {
    /// Its `boot/` directory (the override).
    Dir(RootDir),
    /// Its card's boot partition, checked.
    Card(Arc<BootPartition>),
}

impl Boot {
    fn open(&self, client: SocketAddr, image: &str, file: &str) -> Result<TftpFile, TftpError> {
        match self {
            Boot::Dir(root) => root.open(client, file),
            Boot::Card(card) => match card.read(file) {
                Ok(Some(b)) => Ok(TftpFile::Memory(b)),
                Ok(None) => Err(TftpError::not_found("file not found")),
                Err(e) => {
                    tracing::error!(%image, file, "tftp: reading {file} from image {image}'s {SDCARD}: {e}");
                    Err(TftpError::other(format!(
                        "cannot read {file} from image {image}'s {SDCARD}"
                    )))
                }
            },
        }
    }
}

/// `<images>/<image>/manifest.json`, or the TFTP error for its absence.
fn load_manifest(images: &Path, image: &str) -> Result<Manifest, TftpError> {
    Manifest::load(&images.join(image)).map_err(|e| {
        tracing::error!("tftp: image {image}: {e}");
        match e {
            LoadError::Missing(_) => TftpError::not_found(format!("no image {image}")),
            _ => TftpError::other(format!("image {image} has a bad manifest")),
        }
    })
}

/// An image's boot files: its `boot/` directory if it has one, else its
/// card's boot partition once the card matches the manifest.
fn boot_files(images: &Path, cards: &Cards, image: &str) -> Result<Boot, TftpError> {
    let dir = images.join(image);
    let boot = dir.join(BOOT_DIR);
    if boot.is_dir() {
        return RootDir::new(&boot)
            .map(Boot::Dir)
            .map_err(|_| TftpError::not_found("no boot files"));
    }
    let card = dir.join(SDCARD);
    if !card.is_file() {
        return Err(TftpError::not_found(format!(
            "image {image} has no Raspberry Pi boot files"
        )));
    }
    let m = load_manifest(images, image)?;
    let Some(want) = m.artifact(SDCARD) else {
        tracing::error!(%image, "tftp: image {image} has a {SDCARD} that its manifest.json does not list: its boot files are not served");
        return Err(TftpError::access_violation(format!(
            "image {image}: {SDCARD} is not in its manifest"
        )));
    };
    cards
        .boot(image, &card, want)
        .map(Boot::Card)
        .map_err(|e| match e {
            CardError::Mismatch { .. } => TftpError::access_violation(format!(
                "image {image}: {SDCARD} does not match its manifest"
            )),
            CardError::Unreadable(_) => {
                TftpError::other(format!("image {image}: {SDCARD} cannot be read"))
            }
        })
}

/// Splits a sanitized path into the serial prefix, if its first component is
/// one (8 hex digits), and the rest.
pub fn split_serial(path: &str) -> (Option<String>, &str) {
    match path.split_once('/') {
        Some((first, rest)) if first.len() == 8 && first.bytes().all(|b| b.is_ascii_hexdigit()) => {
            (Some(first.to_ascii_lowercase()), rest)
        }
        _ => (None, path),
    }
}

/// The MAC the neighbour table `/proc/net/arp` (its text) gives `ip`, if it
/// has a complete entry.
pub fn mac_in_arp_table(table: &str, ip: IpAddr) -> Option<String> {
    let ip = ip.to_string();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // IP address, HW type, Flags, HW address, Mask, Device; flag 0x2 = complete.
        let complete = f
            .get(2)
            .and_then(|x| u32::from_str_radix(x.trim_start_matches("0x"), 16).ok())
            .is_some_and(|flags| flags & 0x2 != 0);
        (f.first() == Some(&ip.as_str()) && complete)
            .then(|| f.get(3).map(|m| m.to_ascii_lowercase()))?
    })
}

/// The neighbour table of this host.
pub fn system_neighbour(ip: IpAddr) -> Option<String> {
    mac_in_arp_table(&std::fs::read_to_string("/proc/net/arp").ok()?, ip)
}

impl PiFiles {
    /// The Raspberry Pi files of `kiln serve`'s config: its images, inventory,
    /// admission policy and kernel arguments.
    pub fn from_config(
        cfg: &crate::config::ServeConfig,
        state: Arc<State>,
        public_url: &str,
        neighbour: fn(IpAddr) -> Option<String>,
    ) -> PiFiles {
        let pi = PiFiles {
            images: cfg.images.clone(),
            default_image: cfg.default_image.clone(),
            machines: cfg.machines.clone(),
            admission: cfg.admission,
            state,
            public_url: public_url.to_string(),
            kernel_args: cfg.kernel_args.clone(),
            neighbour,
            cards: Arc::default(),
        };
        pi.check_cards_in_background();
        pi
    }

    /// Checks, on a thread of its own, the cards of the images Pis boot (the
    /// default and the inventory's, unless a `boot/` directory overrides
    /// one), so that the first Pi does not wait for the hash. Each verdict
    /// is logged and kept; a request that comes first waits for it.
    pub fn check_cards_in_background(&self) {
        let mut names: Vec<String> = std::iter::once(self.default_image.clone())
            .chain(self.machines.iter().filter_map(|m| m.image.clone()))
            .collect();
        names.sort();
        names.dedup();
        names.retain(|image| {
            let dir = self.images.join(image);
            !dir.join(BOOT_DIR).is_dir() && dir.join(SDCARD).is_file()
        });
        if names.is_empty() {
            return;
        }
        let (images, cards) = (self.images.clone(), self.cards.clone());
        let spawned = std::thread::Builder::new()
            .name("kiln-pi-cards".into())
            .spawn(move || {
                for image in names {
                    // The verdict is logged and kept by `boot_files`.
                    let _ = boot_files(&images, &cards, &image);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("tftp: cannot start checking the Raspberry Pi cards ahead: {e}; the first request checks them");
        }
    }

    /// The machine (MAC if known) and image a request is for; `None` when the
    /// admission policy keeps it out.
    fn whose(&self, client: SocketAddr, serial: Option<&str>) -> Option<(Option<String>, String)> {
        let mac = match serial {
            Some(s) => self.state.mac_of_serial(s).ok().flatten(),
            None => None,
        }
        .or_else(|| (self.neighbour)(client.ip()));
        let entry =
            crate::http::inventory_entry(&self.state, &self.machines, mac.as_deref(), serial)
                .unwrap_or_else(|e| {
                    tracing::error!("tftp: looking the machine up: {e:#}");
                    None
                });
        if !self.admission.admits(entry) {
            return None;
        }
        let image = entry
            .and_then(|m| m.image.clone())
            .unwrap_or_else(|| self.default_image.clone());
        Some((mac, image))
    }

    fn manifest(&self, image: &str) -> Result<Manifest, TftpError> {
        load_manifest(&self.images, image)
    }
}

impl FileSource for PiFiles {
    fn open(&self, client: SocketAddr, path: &str) -> Result<TftpFile, TftpError> {
        let rel = sanitize_path(path)?;
        let (serial, file) = split_serial(&rel);
        let Some((mac, image)) = self.whose(client, serial.as_deref()) else {
            tracing::info!(%client, serial = serial.as_deref().unwrap_or("-"), "tftp: a Raspberry Pi outside the inventory (allowlist)");
            return Err(TftpError::access_violation("not in the inventory"));
        };
        let boot = boot_files(&self.images, &self.cards, &image)?;
        let who = format!(
            "serial {} mac {}",
            serial.as_deref().unwrap_or("-"),
            mac.as_deref().unwrap_or("-")
        );
        let own = |name: &str| match boot.open(client, &image, name) {
            Ok(TftpFile::Memory(b)) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
            Ok(TftpFile::File { file, .. }) => std::io::read_to_string(file)
                .map(Some)
                .map_err(|e| TftpError::other(format!("reading {name}: {e}"))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        };
        let rendered = match file {
            "config.txt" => {
                let body = own("config.txt")?.unwrap_or_else(|| DEFAULT_CONFIG_TXT.to_string());
                format!("# kiln: {who} boots {image}\n{body}")
            }
            "cmdline.txt" => {
                if let Some(mac) = &mac {
                    if let Err(e) = self.state.mark_netboot(mac) {
                        tracing::error!("tftp: {e:#}");
                    }
                }
                let console = own("cmdline.txt")?.unwrap_or_default();
                let m = self.manifest(&image)?;
                let args = crate::http::kiln_args(
                    &self.public_url,
                    &image,
                    &m,
                    self.kernel_args.get(&image),
                )
                .map_err(|e| {
                    tracing::error!(%image, "tftp: {e}: a Pi loads its root by HTTP, so a Pi image for network boot is built with outputs = [\"pxe\", \"sdcard\"]");
                    TftpError::not_found(e)
                })?;
                // cmdline.txt is one line. The image's own kiln.* arguments
                // (an SD card's `kiln.root=PARTUUID=...`) give way to this
                // server's.
                let console = console
                    .split_whitespace()
                    .filter(|w| !w.starts_with("kiln."))
                    .collect::<Vec<_>>()
                    .join(" ");
                format!(
                    "{}{args}\n",
                    if console.is_empty() {
                        String::new()
                    } else {
                        console + " "
                    }
                )
            }
            _ => {
                tracing::debug!(%client, %who, %image, file, "tftp: Raspberry Pi file");
                return boot.open(client, &image, file);
            }
        };
        tracing::info!(%client, %who, %image, file, "tftp: Raspberry Pi {file} rendered");
        Ok(TftpFile::Memory(Bytes::from(rendered)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_prefixes() {
        assert_eq!(
            split_serial("e5ef6e9d/start4.elf"),
            (Some("e5ef6e9d".into()), "start4.elf")
        );
        assert_eq!(
            split_serial("E5EF6E9D/overlays/a.dtbo"),
            (Some("e5ef6e9d".into()), "overlays/a.dtbo")
        );
        assert_eq!(split_serial("start4.elf"), (None, "start4.elf"));
        assert_eq!(split_serial("overlays/a.dtbo"), (None, "overlays/a.dtbo"));
        assert_eq!(
            split_serial("e5ef6e9x/start4.elf"),
            (None, "e5ef6e9x/start4.elf")
        );
    }

    #[test]
    fn neighbour_table() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device\n\
                     10.0.0.5         0x1         0x2         DC:A6:32:01:02:03     *        eth0\n\
                     10.0.0.6         0x1         0x0         00:00:00:00:00:00     *        eth0\n";
        let ip = |s: &str| s.parse().unwrap();
        assert_eq!(
            mac_in_arp_table(table, ip("10.0.0.5")).as_deref(),
            Some("dc:a6:32:01:02:03")
        );
        assert_eq!(mac_in_arp_table(table, ip("10.0.0.6")), None);
        assert_eq!(mac_in_arp_table(table, ip("10.0.0.7")), None);
    }

    fn read(f: TftpFile) -> Vec<u8> {
        match f {
            TftpFile::Memory(b) => b.to_vec(),
            TftpFile::File { file, .. } => {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut &file, &mut v).unwrap();
                v
            }
        }
    }

    fn image(dir: &std::path::Path, name: &str, config: Option<&str>) {
        let boot = dir.join(name).join("boot");
        std::fs::create_dir_all(boot.join("overlays")).unwrap();
        for f in [
            "start4.elf",
            "fixup4.dat",
            "bcm2711-rpi-4-b.dtb",
            "vmlinuz",
            "initrd.img",
        ] {
            std::fs::write(boot.join(f), format!("{name} {f}")).unwrap();
        }
        std::fs::write(boot.join("overlays/vc4-kms-v3d.dtbo"), "overlay").unwrap();
        std::fs::write(
            boot.join("cmdline.txt"),
            "console=serial0,115200\n console=tty1 kiln.root=PARTUUID=0badcafe-02 rootwait\n",
        )
        .unwrap();
        if let Some(c) = config {
            std::fs::write(boot.join("config.txt"), c).unwrap();
        }
        let m = serde_json::json!({
            "name": name, "arch": "aarch64", "kiln_version": "0", "spec_sha256": "00", "source_date_epoch": 0,
            "kernel": {"package": "linux-image-arm64", "version": "6.12.0"}, "k3s": null,
            "artifacts": [{"name": "rootfs.squashfs", "sha256": "ab".repeat(32), "size": 1}],
            "packages": []
        });
        std::fs::write(dir.join(name).join("manifest.json"), m.to_string()).unwrap();
    }

    #[test]
    fn pis_get_their_images_files_and_rendered_config() {
        let d = tempfile::tempdir().unwrap();
        image(d.path(), "rpi4", None);
        image(
            d.path(),
            "rpi4-gpu",
            Some("arm_64bit=1\ndtoverlay=vc4-kms-v3d\n"),
        );
        let state = Arc::new(State::in_memory().unwrap());
        // What the DHCP server records from the Pi's option 97.
        state
            .record_identity("dc:a6:32:00:00:02", "rpi4", Some("00000002"), None, 1)
            .unwrap();
        let machine = |serial: &str, image: &str| Machine {
            serial: Some(serial.into()),
            image: Some(image.into()),
            ..Machine::default()
        };
        let pi = PiFiles {
            images: d.path().to_path_buf(),
            default_image: "rpi4".into(),
            machines: vec![machine("00000002", "rpi4-gpu")],
            admission: crate::config::Admission::Auto,
            state,
            public_url: "http://10.0.0.1:8080/".into(),
            kernel_args: [("rpi4-gpu".to_string(), "quiet".to_string())].into(),
            neighbour: |ip| (ip.to_string() == "10.0.0.9").then(|| "dc:a6:32:00:00:09".into()),
            cards: Arc::default(),
        };
        let client: SocketAddr = "10.0.0.9:49152".parse().unwrap();
        let get = |p: &str| pi.open(client, p).map(read);
        let text = |p: &str| String::from_utf8(get(p).unwrap()).unwrap();

        // An unknown Pi, with and without its prefix: the default image.
        assert_eq!(get("00000001/start4.elf").unwrap(), b"rpi4 start4.elf");
        assert_eq!(
            get("/bcm2711-rpi-4-b.dtb").unwrap(),
            b"rpi4 bcm2711-rpi-4-b.dtb"
        );
        assert_eq!(
            get("00000001/overlays/vc4-kms-v3d.dtbo").unwrap(),
            b"overlay"
        );
        assert_eq!(
            text("00000001/config.txt"),
            format!(
                "# kiln: serial 00000001 mac dc:a6:32:00:00:09 boots rpi4\n{DEFAULT_CONFIG_TXT}"
            )
        );
        assert_eq!(
            text("00000001/cmdline.txt"),
            format!(
                "console=serial0,115200 console=tty1 rootwait kiln.root=http://10.0.0.1:8080/images/rpi4/rootfs.squashfs \
                 kiln.root_sha256={} kiln.server=http://10.0.0.1:8080\n",
                "ab".repeat(32)
            )
        );
        // The inventory's Pi (by serial): its image, its config, its args.
        assert_eq!(get("00000002/start4.elf").unwrap(), b"rpi4-gpu start4.elf");
        let config = text("00000002/config.txt");
        assert!(
            config.starts_with("# kiln: serial 00000002 mac dc:a6:32:00:00:02 boots rpi4-gpu\n"),
            "{config}"
        );
        assert!(config.ends_with("dtoverlay=vc4-kms-v3d\n"), "{config}");
        let cmdline = text("00000002/cmdline.txt");
        assert!(
            cmdline.contains("/images/rpi4-gpu/rootfs.squashfs") && cmdline.ends_with(" quiet\n"),
            "{cmdline}"
        );

        // Missing files and escapes.
        assert!(get("00000001/start.elf").unwrap_err().is_not_found());
        for bad in [
            "00000001/../rpi4-gpu/boot/start4.elf",
            "../rpi4/manifest.json",
            "00000001/../../x",
        ] {
            let e = get(bad).unwrap_err();
            assert_eq!(
                e.code,
                crate::tftp::packet::ErrorCode::AccessViolation,
                "{bad}"
            );
        }
        // Under allowlist, only the inventory's Pi gets files.
        let strict = PiFiles {
            admission: crate::config::Admission::Allowlist,
            ..pi
        };
        let e = strict
            .open(client, "00000001/start4.elf")
            .map(read)
            .unwrap_err();
        assert_eq!(e.code, crate::tftp::packet::ErrorCode::AccessViolation);
        assert_eq!(
            read(strict.open(client, "00000002/start4.elf").unwrap()),
            b"rpi4-gpu start4.elf"
        );
        let pi = PiFiles {
            admission: crate::config::Admission::Auto,
            ..strict
        };
        // An image without boot files (a PC image): a clear not-found.
        std::fs::create_dir_all(d.path().join("pxe")).unwrap();
        let pc = PiFiles {
            default_image: "pxe".into(),
            ..pi
        };
        let e = pc
            .open(client, "00000001/start4.elf")
            .map(read)
            .unwrap_err();
        assert!(
            e.message
                .contains("image pxe has no Raspberry Pi boot files"),
            "{e}"
        );
    }

    // ------------------------------------------------------------ cards

    use kiln_builder::sdcard;
    use kiln_builder::tree::{Entry, Tree};

    /// Deterministic test bytes (xorshift64*).
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        seed |= 1;
        while out.len() < len {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            out.extend_from_slice(&seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// What goes into a card's boot partition: firmware and a firmware
    /// overlay, device trees, a kernel and an initramfs spanning many
    /// clusters; `tag` makes one card's bytes differ from another's.
    fn card_root(tag: u64) -> (Tree, Vec<u8>, Vec<u8>) {
        let mut t = Tree::new();
        let fw = sdcard::FIRMWARE_DIR;
        t.mkdir_p(&format!("{fw}/overlays")).unwrap();
        for (i, (f, len)) in [
            ("start4.elf", 100 * 1024 + 7),
            ("fixup4.dat", 7 * 1024),
            ("overlays/vc4-kms-v3d.dtbo", 3000),
        ]
        .into_iter()
        .enumerate()
        {
            t.insert(
                &format!("{fw}/{f}"),
                Entry::file(noise(len, tag * 100 + i as u64), 0o644),
            )
            .unwrap();
        }
        let dtbs = "usr/lib/linux-image-6.12-arm64/broadcom";
        t.mkdir_p(dtbs).unwrap();
        for (i, d) in ["bcm2711-rpi-4-b.dtb", "bcm2712-rpi-5-b.dtb"]
            .into_iter()
            .enumerate()
        {
            t.insert(
                &format!("{dtbs}/{d}"),
                Entry::file(noise(52_593, tag * 100 + 10 + i as u64), 0o644),
            )
            .unwrap();
        }
        (
            t,
            noise(300_001, tag * 100 + 20),
            noise(500_003, tag * 100 + 21),
        )
    }

    /// `<dir>/<name>/sdcard.img` as `kiln build` writes it (the card's own
    /// config.txt and cmdline.txt), with a manifest.json listing it and a
    /// rootfs.squashfs; returns the boot partition's files.
    fn card_image(dir: &std::path::Path, name: &str, tag: u64) -> BTreeMap<String, Vec<u8>> {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let (tree, vmlinuz, initrd) = card_root(tag);
        let disk_id = sdcard::disk_id(name);
        let boot = sdcard::boot_files(
            &tree,
            "6.12-arm64",
            vmlinuz.into(),
            initrd.into(),
            &sdcard::cmdline_txt(disk_id, &[]),
        )
        .unwrap();
        let rootfs = d.join("rootfs.squashfs");
        std::fs::write(&rootfs, noise(70_000, tag)).unwrap();
        // Written beside and renamed in, as kiln build replaces an image.
        let tmp = d.join("sdcard.img.new");
        sdcard::write(
            &tmp,
            &sdcard::Card {
                disk_id,
                volume_id: sdcard::volume_id(name),
                epoch: 1_735_689_600,
                boot: &boot,
                rootfs: &rootfs,
            },
        )
        .unwrap();
        std::fs::rename(&tmp, d.join(SDCARD)).unwrap();
        let artifact = |f: &str| {
            let (sha256, size) = kiln_builder::hash_file(&d.join(f)).unwrap();
            serde_json::json!({"name": f, "sha256": sha256, "size": size})
        };
        let m = serde_json::json!({
            "name": name, "arch": "aarch64", "kiln_version": "0", "spec_sha256": "00", "source_date_epoch": 0,
            "kernel": {"package": "linux-image-arm64", "version": "6.12.0"}, "k3s": null,
            "artifacts": [artifact("rootfs.squashfs"), artifact(SDCARD)],
            "packages": []
        });
        std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
        boot.into_iter().map(|(k, v)| (k, v.to_vec())).collect()
    }

    fn pi_files(images: &std::path::Path) -> PiFiles {
        PiFiles {
            images: images.to_path_buf(),
            default_image: "rpi4".into(),
            machines: Vec::new(),
            admission: crate::config::Admission::Auto,
            state: Arc::new(State::in_memory().unwrap()),
            public_url: "http://10.0.0.1:8080".into(),
            kernel_args: BTreeMap::new(),
            neighbour: |_| Some("dc:a6:32:00:00:09".into()),
            cards: Arc::default(),
        }
    }

    fn client() -> SocketAddr {
        "10.0.0.9:49152".parse().unwrap()
    }

    #[test]
    fn a_card_serves_its_boot_partition() {
        let d = tempfile::tempdir().unwrap();
        let files = card_image(d.path(), "rpi4", 1);
        let pi = pi_files(d.path());
        // Checked ahead, as kiln serve does at start.
        pi.check_cards_in_background();
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        let checked = || {
            let entries = pi.cards.entries.lock().unwrap();
            entries
                .values()
                .any(|e| e.verdict.get().is_some_and(|v| v.is_ok()))
        };
        while !checked() {
            assert!(Instant::now() < deadline, "the card was not checked ahead");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let get = |p: &str| pi.open(client(), p).map(read);
        let want = |f: &str| files.get(f).unwrap_or_else(|| panic!("{f} on the card"));

        for f in [
            "start4.elf",
            "fixup4.dat",
            "bcm2711-rpi-4-b.dtb",
            "bcm2712-rpi-5-b.dtb",
            "overlays/vc4-kms-v3d.dtbo",
            "vmlinuz",
            "initrd.img",
        ] {
            let got = get(&format!("e5ef6e9d/{f}")).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(got == *want(f), "{f}: differs from what went into the card");
            assert!(get(f).unwrap() == *want(f), "{f} without the prefix");
        }
        // FAT names are case-insensitive; other paths as for a directory.
        assert!(get("e5ef6e9d/START4.ELF").unwrap() == *want("start4.elf"));
        assert!(get("\\Overlays\\VC4-KMS-V3D.DTBO").unwrap() == *want("overlays/vc4-kms-v3d.dtbo"));
        for missing in [
            "e5ef6e9d/start.elf",
            "overlays",
            "overlays/none.dtbo",
            "vmlinuz/x",
        ] {
            assert!(get(missing).unwrap_err().is_not_found(), "{missing}");
        }
        let e = get("e5ef6e9d/../manifest.json").unwrap_err();
        assert_eq!(e.code, crate::tftp::packet::ErrorCode::AccessViolation);

        // config.txt and cmdline.txt: the card's own, rendered per machine.
        let text = |p: &str| String::from_utf8(get(p).unwrap()).unwrap();
        let own_config = String::from_utf8(want("config.txt").clone()).unwrap();
        assert_eq!(own_config, sdcard::config_txt());
        assert_eq!(
            text("e5ef6e9d/config.txt"),
            format!("# kiln: serial e5ef6e9d mac dc:a6:32:00:00:09 boots rpi4\n{own_config}")
        );
        let own_cmdline = String::from_utf8(want("cmdline.txt").clone()).unwrap();
        assert!(
            own_cmdline.contains(" kiln.root=PARTUUID="),
            "{own_cmdline}"
        );
        let m = Manifest::load(&d.path().join("rpi4")).unwrap();
        assert_eq!(
            text("e5ef6e9d/cmdline.txt"),
            format!(
                "console=tty1 console=ttyAMA10,115200 console=ttyS1,115200 rootwait \
                 kiln.root=http://10.0.0.1:8080/images/rpi4/rootfs.squashfs \
                 kiln.root_sha256={} kiln.server=http://10.0.0.1:8080\n",
                m.artifact("rootfs.squashfs").unwrap().sha256
            )
        );

        // Read once: the next Pi gets the same bytes from memory.
        let mem = |p: &str| match pi.open(client(), p).unwrap() {
            TftpFile::Memory(b) => b,
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(mem("vmlinuz").as_ptr(), mem("e5ef6e9d/VMLINUZ").as_ptr());
        // One card entry, checked once.
        assert_eq!(pi.cards.entries.lock().unwrap().len(), 1);

        // A card the manifest does not list: refused.
        let listed = std::fs::read_to_string(d.path().join("rpi4/manifest.json")).unwrap();
        std::fs::write(
            d.path().join("rpi4/manifest.json"),
            listed.replace("\"sdcard.img\"", "\"other.img\""),
        )
        .unwrap();
        let e = get("start4.elf").unwrap_err();
        assert_eq!(e.code, crate::tftp::packet::ErrorCode::AccessViolation);
        assert!(
            e.message
                .contains("image rpi4: sdcard.img is not in its manifest"),
            "{e}"
        );
    }

    #[test]
    fn a_card_altered_after_its_manifest_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let files = card_image(d.path(), "rpi4", 2);
        let card = d.path().join("rpi4").join(SDCARD);
        let m = Manifest::load(&d.path().join("rpi4")).unwrap();
        let listed = m.artifact(SDCARD).unwrap().clone();
        // One byte of the boot partition changed in place (same size).
        let f = std::fs::OpenOptions::new().write(true).open(&card).unwrap();
        f.write_all_at(b"X", sdcard::BOOT_START + 3 * sdcard::MIB + 17)
            .unwrap();
        drop(f);
        let (actual, _) = kiln_builder::hash_file(&card).unwrap();

        let pi = pi_files(d.path());
        for p in [
            "start4.elf",
            "e5ef6e9d/vmlinuz",
            "e5ef6e9d/config.txt",
            "e5ef6e9d/cmdline.txt",
        ] {
            let e = pi.open(client(), p).map(read).unwrap_err();
            assert_eq!(
                e.code,
                crate::tftp::packet::ErrorCode::AccessViolation,
                "{p}"
            );
            assert_eq!(
                e.message, "image rpi4: sdcard.img does not match its manifest",
                "{p}"
            );
        }
        // The verdict (logged once) names the card and both sha256.
        let verdict = pi.cards.boot("rpi4", &card, &listed).err().unwrap();
        assert_eq!(
            verdict,
            CardError::Mismatch {
                path: card.display().to_string(),
                what: "sha256",
                expected: listed.sha256.clone(),
                actual: actual.clone(),
            }
        );
        let said = verdict.to_string();
        assert!(
            said.contains(&listed.sha256) && said.contains(&actual) && said.contains("sdcard.img"),
            "{said}"
        );

        // A card of another size: refused before hashing.
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&card)
            .unwrap();
        f.set_len(listed.size + 512).unwrap();
        drop(f);
        match pi.cards.boot("rpi4", &card, &listed) {
            Err(CardError::Mismatch { what: "size", .. }) => {}
            other => panic!("{:?}", other.err()),
        }

        // Rebuilt (a new card renamed over it, a new manifest): served.
        let files2 = card_image(d.path(), "rpi4", 3);
        assert!(files2["vmlinuz"] != files["vmlinuz"]);
        assert!(read(pi.open(client(), "vmlinuz").unwrap()) == files2["vmlinuz"]);
        assert!(read(pi.open(client(), "start4.elf").unwrap()) == files2["start4.elf"]);
    }

    #[test]
    fn a_boot_directory_overrides_the_card() {
        let d = tempfile::tempdir().unwrap();
        let files = card_image(d.path(), "rpi4", 4);
        let boot = d.path().join("rpi4").join(BOOT_DIR);
        std::fs::create_dir_all(&boot).unwrap();
        std::fs::write(boot.join("start4.elf"), "by hand").unwrap();
        std::fs::write(boot.join("config.txt"), "arm_64bit=1\n").unwrap();
        let pi = pi_files(d.path());
        let get = |p: &str| pi.open(client(), p).map(read);
        assert_eq!(get("e5ef6e9d/start4.elf").unwrap(), b"by hand");
        assert_eq!(
            get("e5ef6e9d/config.txt").unwrap(),
            b"# kiln: serial e5ef6e9d mac dc:a6:32:00:00:09 boots rpi4\narm_64bit=1\n"
        );
        // The whole directory: what it lacks, the card does not fill in.
        assert!(get("vmlinuz").unwrap_err().is_not_found());
        assert!(
            pi.cards.entries.lock().unwrap().is_empty(),
            "the card was read"
        );

        // Without the directory: the card.
        std::fs::remove_dir_all(&boot).unwrap();
        assert!(get("start4.elf").unwrap() == files["start4.elf"]);
        assert!(get("vmlinuz").unwrap() == files["vmlinuz"]);
    }
}
