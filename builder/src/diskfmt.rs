//! Disk image container formats made from kiln's raw GPT disk image
//! (`disk.raw`), written beside it in the output directory:
//!
//! - `disk.qcow2`: qcow2 version 3 (compat 1.1), 64 KiB clusters, for QEMU/KVM
//!   and the clouds that take qcow2; all-zero clusters are left unallocated.
//! - `disk.vhd`: a fixed VHD for Azure: the raw bytes padded with zeros to a
//!   whole number of MiB, then the 512-byte VHD footer.
//! - `disk.gce.tar.gz`: what Google Compute Engine imports: a gzip-compressed
//!   old-GNU tar archive with one member, `disk.raw`, a GNU sparse member
//!   when the image has all-zero chunks (as `tar --format=oldgnu -S` makes).
//!
//! Every writer streams the raw image (it is never held in memory), skips the
//! holes of a sparse raw file (`SEEK_DATA`/`SEEK_HOLE`) and all-zero 64 KiB
//! clusters, writes a temporary file in the output's directory and renames it
//! into place (as [`crate::write_atomically`] does for in-memory artifacts),
//! and is deterministic: the same raw image and parameters give the same bytes.
//!
//! qcow2 and VHD are written by hand here. The crates published for them read
//! images but do not write them (qcow2, qcow2-core, qcow, vhd, vhd-core), and
//! the qcow2 writers that exist live inside larger projects (an async
//! VM-image I/O library, a filesystem-image builder) that would bring far more
//! than three tables. Written once, front to back, with no snapshots,
//! compression, encryption or backing file, both formats are small: qcow2 is
//! a header, an L1 table, a refcount table, refcount blocks, L2 tables and the
//! data clusters; a fixed VHD is the raw bytes and a footer. The tar headers
//! (sparse map included) come from the `tar` crate, whose `Builder` cannot
//! write sparse members, and the gzip stream from `flate2`.
//! `builder/tests/diskfmt.rs` checks all three with `qemu-img` and GNU tar.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

const MIB: u64 = 1 << 20;

/// The granularity of zero detection for every format: one qcow2 cluster.
const CHUNK: u64 = QCOW2_CLUSTER_SIZE;

// ---------------------------------------------------------------------------
// Shared plumbing: reading the raw image, writing through a temporary file.
// ---------------------------------------------------------------------------

/// Opens the raw image and returns it with its size (refusing an empty one).
fn open_raw(raw: &Path) -> Result<(File, u64)> {
    let file = File::open(raw).with_context(|| format!("opening {}", raw.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading the metadata of {}", raw.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", raw.display());
    }
    if meta.len() == 0 {
        bail!("{} is empty", raw.display());
    }
    Ok((file, meta.len()))
}

/// The byte ranges of `file` (of size `len`) that may hold data, ascending:
/// its holes left out (`SEEK_DATA`/`SEEK_HOLE`), or the whole file where the
/// file system cannot tell.
fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{seek, SeekFrom};
    let mut extents = Vec::new();
    let mut pos = 0;
    while pos < len {
        let start = match seek(file, SeekFrom::Data(pos)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => break, // only a hole from `pos` on
            Err(_) => return vec![(0, len)],
        };
        if start >= len {
            break;
        }
        let end = match seek(file, SeekFrom::Hole(start)) {
            Ok(end) => end.min(len),
            Err(_) => len,
        };
        if end <= start {
            return vec![(0, len)];
        }
        extents.push((start, end));
        pos = end;
    }
    extents
}

/// Whether a buffer is all zeros: compared with a zero block, which is a
/// `memcmp` (fast in debug builds too).
fn is_zero(buf: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    buf.chunks(ZEROS.len())
        .all(|block| block == &ZEROS[..block.len()])
}

/// Calls `f(index, bytes)` for every 64 KiB chunk of the raw image that holds
/// a non-zero byte, in ascending order; `bytes` is the chunk's content (short
/// for the last chunk when the size is not a multiple of 64 KiB).
fn for_each_nonzero_chunk(
    file: &File,
    len: u64,
    raw: &Path,
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut next = 0; // the first chunk not visited yet
    for (start, end) in data_extents(file, len) {
        let first = (start / CHUNK).max(next);
        let last = end.div_ceil(CHUNK);
        for index in first..last {
            let offset = index * CHUNK;
            let n = (len - offset).min(CHUNK) as usize;
            file.read_exact_at(&mut buf[..n], offset)
                .with_context(|| format!("reading {} at offset {offset}", raw.display()))?;
            if !is_zero(&buf[..n]) {
                f(index, &buf[..n])?;
            }
        }
        next = next.max(last);
    }
    Ok(())
}

/// Creates a temporary file in `out`'s directory, lets `write` fill it, and
/// renames it to `out` (mode 0644) only when `write` succeeded; on an error
/// the temporary file is removed and `out` is left as it was.
fn write_via_temp(out: &Path, write: impl FnOnce(&File) -> Result<()>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".diskfmt-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    write(tmp.as_file()).with_context(|| format!("writing {}", out.display()))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", tmp.path().display()))?;
    tmp.persist(out)
        .with_context(|| format!("renaming into {}", out.display()))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// qcow2
// ---------------------------------------------------------------------------

/// log2 of the qcow2 cluster size.
pub const QCOW2_CLUSTER_BITS: u32 = 16;
/// The qcow2 cluster size: 64 KiB (qemu-img's default).
pub const QCOW2_CLUSTER_SIZE: u64 = 1 << QCOW2_CLUSTER_BITS;
/// Entries of one L2 table (8-byte entries in one cluster).
const L2_ENTRIES: u64 = QCOW2_CLUSTER_SIZE / 8;
/// 16-bit refcounts (refcount_order 4, qemu-img's default).
const REFCOUNT_ORDER: u32 = 4;
/// Refcounts in one refcount block.
const REFCOUNTS_PER_BLOCK: u64 = QCOW2_CLUSTER_SIZE * 8 / (1 << REFCOUNT_ORDER);
/// Offsets in a refcount table cluster.
const REFTABLE_ENTRIES: u64 = QCOW2_CLUSTER_SIZE / 8;
/// L1/L2 entry flag: the cluster's refcount is exactly 1.
const QCOW_OFLAG_COPIED: u64 = 1 << 63;
/// Header length for version 3 with the compression-type byte (and padding).
const QCOW2_HEADER_LENGTH: u32 = 112;

/// Where everything goes in a qcow2 file written front to back:
///
/// ```text
/// cluster 0            header (no extensions, no backing file)
/// l1_clusters          L1 table
/// refcount_table_clusters  refcount table
/// refcount_blocks      refcount blocks (16-bit refcounts)
/// one per l2_tables    L2 tables, in guest order
/// one per data_clusters    the non-zero guest clusters, in guest order
/// ```
///
/// Every cluster of the file is used exactly once (refcount 1, so every L1
/// and L2 entry carries the COPIED flag) and the file ends at the last one.
/// A guest cluster without an L2 entry reads as zeros (no backing file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Layout {
    /// The guest disk size in bytes.
    pub virtual_size: u64,
    /// Entries of the L1 table (header field l1_size).
    pub l1_entries: u64,
    pub l1_clusters: u64,
    pub refcount_table_clusters: u64,
    pub refcount_blocks: u64,
    /// The L1 indexes that get an L2 table, ascending.
    pub l2_tables: Vec<u64>,
    /// The guest clusters stored, ascending: the k-th is at
    /// `data_offset() + k * QCOW2_CLUSTER_SIZE`.
    pub data_clusters: Vec<u64>,
}

impl Qcow2Layout {
    /// The layout for a disk of `virtual_size` bytes whose non-zero clusters
    /// are `data_clusters` (ascending, distinct, inside the disk).
    pub fn new(virtual_size: u64, data_clusters: Vec<u64>) -> Qcow2Layout {
        let guest_clusters = virtual_size.div_ceil(QCOW2_CLUSTER_SIZE);
        assert!(
            data_clusters.windows(2).all(|w| w[0] < w[1]),
            "data clusters must be ascending and distinct"
        );
        assert!(data_clusters.last().is_none_or(|&c| c < guest_clusters));
        let l1_entries = guest_clusters.div_ceil(L2_ENTRIES);
        let l1_clusters = (l1_entries * 8).div_ceil(QCOW2_CLUSTER_SIZE);
        let mut l2_tables: Vec<u64> = data_clusters.iter().map(|c| c / L2_ENTRIES).collect();
        l2_tables.dedup();
        let others = 1 + l1_clusters + l2_tables.len() as u64 + data_clusters.len() as u64;
        let (table, blocks) = qcow2_refcount_clusters(others);
        Qcow2Layout {
            virtual_size,
            l1_entries,
            l1_clusters,
            refcount_table_clusters: table,
            refcount_blocks: blocks,
            l2_tables,
            data_clusters,
        }
    }

    pub fn l1_offset(&self) -> u64 {
        QCOW2_CLUSTER_SIZE
    }

    pub fn refcount_table_offset(&self) -> u64 {
        self.l1_offset() + self.l1_clusters * QCOW2_CLUSTER_SIZE
    }

    pub fn refcount_blocks_offset(&self) -> u64 {
        self.refcount_table_offset() + self.refcount_table_clusters * QCOW2_CLUSTER_SIZE
    }

    pub fn l2_offset(&self) -> u64 {
        self.refcount_blocks_offset() + self.refcount_blocks * QCOW2_CLUSTER_SIZE
    }

    pub fn data_offset(&self) -> u64 {
        self.l2_offset() + self.l2_tables.len() as u64 * QCOW2_CLUSTER_SIZE
    }

    /// Clusters in the file, all of them used.
    pub fn total_clusters(&self) -> u64 {
        self.data_offset() / QCOW2_CLUSTER_SIZE + self.data_clusters.len() as u64
    }

    pub fn file_size(&self) -> u64 {
        self.total_clusters() * QCOW2_CLUSTER_SIZE
    }

    /// Cluster 0: the version 3 header, then zeros (an empty extension list).
    pub fn header(&self) -> Vec<u8> {
        let mut h = vec![0u8; QCOW2_CLUSTER_SIZE as usize];
        h[0..4].copy_from_slice(b"QFI\xfb");
        put_be32(&mut h, 4, 3); // version
        put_be64(&mut h, 8, 0); // backing_file_offset: none
        put_be32(&mut h, 16, 0); // backing_file_size
        put_be32(&mut h, 20, QCOW2_CLUSTER_BITS);
        put_be64(&mut h, 24, self.virtual_size);
        put_be32(&mut h, 32, 0); // crypt_method: none
        put_be32(&mut h, 36, self.l1_entries as u32);
        put_be64(&mut h, 40, self.l1_offset());
        put_be64(&mut h, 48, self.refcount_table_offset());
        put_be32(&mut h, 56, self.refcount_table_clusters as u32);
        put_be32(&mut h, 60, 0); // nb_snapshots
        put_be64(&mut h, 64, 0); // snapshots_offset
        put_be64(&mut h, 72, 0); // incompatible_features (clean, no extended L2)
        put_be64(&mut h, 80, 0); // compatible_features (no lazy refcounts)
        put_be64(&mut h, 88, 0); // autoclear_features
        put_be32(&mut h, 96, REFCOUNT_ORDER);
        put_be32(&mut h, 100, QCOW2_HEADER_LENGTH);
        // 104: compression_type 0 (zlib, unused), 105..112 padding; at 112
        // the header extension list ends at once (type 0, length 0).
        h
    }

    /// The L1 table: for each L1 index with an L2 table, its offset.
    pub fn l1_table(&self) -> Vec<u8> {
        let mut t = vec![0u8; (self.l1_clusters * QCOW2_CLUSTER_SIZE) as usize];
        for (j, &index) in self.l2_tables.iter().enumerate() {
            let offset = self.l2_offset() + j as u64 * QCOW2_CLUSTER_SIZE;
            put_be64(&mut t, index as usize * 8, offset | QCOW_OFLAG_COPIED);
        }
        t
    }

    /// The refcount table: the offsets of the refcount blocks.
    pub fn refcount_table(&self) -> Vec<u8> {
        let mut t = vec![0u8; (self.refcount_table_clusters * QCOW2_CLUSTER_SIZE) as usize];
        for i in 0..self.refcount_blocks {
            let offset = self.refcount_blocks_offset() + i * QCOW2_CLUSTER_SIZE;
            put_be64(&mut t, i as usize * 8, offset);
        }
        t
    }

    /// Refcount block `i`: refcount 1 for each of its clusters in the file.
    pub fn refcount_block(&self, i: u64) -> Vec<u8> {
        let mut b = vec![0u8; QCOW2_CLUSTER_SIZE as usize];
        let first = i * REFCOUNTS_PER_BLOCK;
        let used = self
            .total_clusters()
            .saturating_sub(first)
            .min(REFCOUNTS_PER_BLOCK);
        for k in 0..used as usize {
            b[k * 2..k * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        b
    }

    /// The `j`-th L2 table (for L1 index `l2_tables[j]`): the offsets of the
    /// data clusters it maps.
    pub fn l2_table(&self, j: usize) -> Vec<u8> {
        let mut t = vec![0u8; QCOW2_CLUSTER_SIZE as usize];
        let first_guest = self.l2_tables[j] * L2_ENTRIES;
        let from = self.data_clusters.partition_point(|&c| c < first_guest);
        let to = self
            .data_clusters
            .partition_point(|&c| c < first_guest + L2_ENTRIES);
        for k in from..to {
            let entry = (self.data_clusters[k] - first_guest) as usize;
            let offset = self.data_offset() + k as u64 * QCOW2_CLUSTER_SIZE;
            put_be64(&mut t, entry * 8, offset | QCOW_OFLAG_COPIED);
        }
        t
    }
}

/// The refcount table clusters and refcount blocks for a file of `others`
/// clusters besides them: the blocks count themselves and the table too, so
/// both grow until they cover every cluster of the file.
fn qcow2_refcount_clusters(others: u64) -> (u64, u64) {
    let (mut table, mut blocks) = (1, 1);
    loop {
        let total = others + table + blocks;
        let need_blocks = total.div_ceil(REFCOUNTS_PER_BLOCK).max(blocks);
        let need_table = need_blocks.div_ceil(REFTABLE_ENTRIES).max(table);
        if (need_table, need_blocks) == (table, blocks) {
            return (table, blocks);
        }
        (table, blocks) = (need_table, need_blocks);
    }
}

fn put_be32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn put_be64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// Writes `out` as a qcow2 image (version 3, 64 KiB clusters) holding exactly
/// the raw image's content; all-zero clusters are left unallocated. The raw
/// image is read twice: once to find its non-zero clusters (which fixes the
/// layout, see [`Qcow2Layout`]), once to copy them.
pub fn write_qcow2(raw: &Path, out: &Path) -> Result<()> {
    let (file, len) = open_raw(raw)?;
    if len % 512 != 0 {
        // qemu counts a qcow2 disk in 512-byte sectors and would drop the tail.
        bail!(
            "{} is {len} bytes, not a whole number of 512-byte sectors",
            raw.display()
        );
    }
    let mut clusters = Vec::new();
    for_each_nonzero_chunk(&file, len, raw, |index, _| {
        clusters.push(index);
        Ok(())
    })?;
    let layout = Qcow2Layout::new(len, clusters);
    write_via_temp(out, |f| {
        let mut w = BufWriter::with_capacity(MIB as usize, f);
        w.write_all(&layout.header())?;
        w.write_all(&layout.l1_table())?;
        w.write_all(&layout.refcount_table())?;
        for i in 0..layout.refcount_blocks {
            w.write_all(&layout.refcount_block(i))?;
        }
        for j in 0..layout.l2_tables.len() {
            w.write_all(&layout.l2_table(j))?;
        }
        let mut buf = vec![0u8; QCOW2_CLUSTER_SIZE as usize];
        for &cluster in &layout.data_clusters {
            let offset = cluster * QCOW2_CLUSTER_SIZE;
            let n = (len - offset).min(QCOW2_CLUSTER_SIZE) as usize;
            file.read_exact_at(&mut buf[..n], offset)
                .with_context(|| format!("reading {} at offset {offset}", raw.display()))?;
            buf[n..].fill(0);
            w.write_all(&buf)?;
        }
        w.flush()?;
        let written = f.metadata()?.len();
        if written != layout.file_size() {
            bail!(
                "wrote {written} bytes, the layout says {}",
                layout.file_size()
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// VHD (fixed)
// ---------------------------------------------------------------------------

/// The VHD footer size.
pub const VHD_FOOTER_SIZE: usize = 512;
/// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the VHD epoch.
pub const VHD_EPOCH_OFFSET: u64 = 946_684_800;
/// Creator application written in the footer. Azure and Hyper-V size a
/// fixed VHD by its current-size field. qemu does too for this creator in
/// current releases (10.0 here), but it sizes by the CHS geometry (a little
/// smaller than the disk) for "vpc " and "qemu", and older releases did so
/// for every creator they did not know, which is why `qemu-img convert -o
/// force_size` writes "qem2" and the maximum geometry. Old qemu versions can
/// be told with `-o force_size_calc=current_size` (vpc driver option).
pub const VHD_CREATOR_APP: &[u8; 4] = b"kiln";
/// Creator version: the version of this footer writer (1.0).
pub const VHD_CREATOR_VERSION: u32 = 0x0001_0000;
/// Creator host OS: "Wi2k", as qemu-img writes it.
pub const VHD_CREATOR_HOST_OS: &[u8; 4] = b"Wi2k";
/// Disk type of a fixed hard disk.
pub const VHD_DISK_TYPE_FIXED: u32 = 2;
/// Offset of the checksum field in the footer.
const VHD_CHECKSUM_AT: usize = 64;

/// The VHD spec's CHS geometry for a disk of `size` bytes (cylinders, heads,
/// sectors per track), from the algorithm in the spec's appendix "CHS
/// calculation" (capped at 65535 x 16 x 255).
pub fn vhd_geometry(size: u64) -> (u16, u8, u8) {
    let mut total = size / 512;
    if total > 65535 * 16 * 255 {
        total = 65535 * 16 * 255;
    }
    let (sectors, heads, cylinder_times_heads);
    if total >= 65535 * 16 * 63 {
        sectors = 255;
        heads = 16;
        cylinder_times_heads = total / sectors;
    } else {
        let mut s = 17;
        let mut cth = total / s;
        let mut h = cth.div_ceil(1024).max(4);
        if cth >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            cth = total / s;
        }
        if cth >= h * 1024 {
            s = 63;
            h = 16;
            cth = total / s;
        }
        (sectors, heads, cylinder_times_heads) = (s, h, cth);
    }
    let cylinders = cylinder_times_heads / heads;
    (cylinders as u16, heads as u8, sectors as u8)
}

/// The footer's timestamp: seconds since 2000-01-01 00:00:00 UTC for a Unix
/// time (earlier times give 0, times after 2136 the largest value).
pub fn vhd_timestamp(epoch: u64) -> u32 {
    epoch
        .saturating_sub(VHD_EPOCH_OFFSET)
        .min(u64::from(u32::MAX)) as u32
}

/// A 16-byte unique id derived from `seed`: the first 16 bytes of
/// sha256("kiln vhd unique id\0" + seed), marked as an RFC 9562 version 8
/// (custom) UUID. The same seed gives the same id.
pub fn vhd_unique_id(seed: &str) -> [u8; 16] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"kiln vhd unique id\0");
    h.update(seed.as_bytes());
    let digest = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id[6] = (id[6] & 0x0f) | 0x80; // version 8
    id[8] = (id[8] & 0x3f) | 0x80; // variant 10xx
    id
}

/// The footer checksum: the one's complement of the sum of the footer's
/// bytes, the checksum field counted as zero.
pub fn vhd_checksum(footer: &[u8; VHD_FOOTER_SIZE]) -> u32 {
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(VHD_CHECKSUM_AT..VHD_CHECKSUM_AT + 4).contains(i))
        .fold(0u32, |sum, (_, &b)| sum.wrapping_add(u32::from(b)));
    !sum
}

/// The footer of a fixed VHD whose disk is `size` bytes.
pub fn vhd_footer(size: u64, timestamp: u32, unique_id: [u8; 16]) -> [u8; VHD_FOOTER_SIZE] {
    let mut f = [0u8; VHD_FOOTER_SIZE];
    f[0..8].copy_from_slice(b"conectix");
    put_be32(&mut f, 8, 2); // features: reserved bit, always set
    put_be32(&mut f, 12, 0x0001_0000); // file format version 1.0
    put_be64(&mut f, 16, u64::MAX); // data offset: none for a fixed disk
    put_be32(&mut f, 24, timestamp);
    f[28..32].copy_from_slice(VHD_CREATOR_APP);
    put_be32(&mut f, 32, VHD_CREATOR_VERSION);
    f[36..40].copy_from_slice(VHD_CREATOR_HOST_OS);
    put_be64(&mut f, 40, size); // original size
    put_be64(&mut f, 48, size); // current size
    let (cylinders, heads, sectors) = vhd_geometry(size);
    f[56..58].copy_from_slice(&cylinders.to_be_bytes());
    f[58] = heads;
    f[59] = sectors;
    put_be32(&mut f, 60, VHD_DISK_TYPE_FIXED);
    f[68..84].copy_from_slice(&unique_id);
    f[84] = 0; // saved state: none; 85..512 reserved, zero
    let checksum = vhd_checksum(&f);
    put_be32(&mut f, VHD_CHECKSUM_AT, checksum);
    f
}

/// The VHD disk size for a raw image: its size rounded up to a whole MiB
/// (Azure takes only whole-MiB disks).
pub fn vhd_disk_size(raw_size: u64) -> u64 {
    raw_size.div_ceil(MIB) * MIB
}

/// Writes `out` as a fixed VHD: the raw image, zeros up to a whole MiB, and
/// the footer (timestamp from `epoch`, the Unix time of SOURCE_DATE_EPOCH;
/// unique id from `id_seed`). Zero chunks are skipped with a seek, so the
/// output is as sparse on disk as the raw image; its bytes are the same.
pub fn write_vhd_fixed(raw: &Path, out: &Path, id_seed: &str, epoch: u64) -> Result<()> {
    let (file, len) = open_raw(raw)?;
    let size = vhd_disk_size(len);
    let footer = vhd_footer(size, vhd_timestamp(epoch), vhd_unique_id(id_seed));
    write_via_temp(out, |f| {
        for_each_nonzero_chunk(&file, len, raw, |index, bytes| {
            f.write_all_at(bytes, index * CHUNK)?;
            Ok(())
        })?;
        f.set_len(size)?;
        f.write_all_at(&footer, size)?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// GCE tarball
// ---------------------------------------------------------------------------

/// The tar member's name: Compute Engine imports only `disk.raw`.
pub const GCE_MEMBER: &str = "disk.raw";

/// Sparse map entries in an old-GNU tar header and in each extension block.
const SPARSES_IN_HEADER: usize = 4;
const SPARSES_IN_EXTENSION: usize = 21;

/// The tar headers of the member `disk.raw` (`size` bytes, mode 0644, owner
/// root 0/0, mtime `epoch`, old-GNU magic "ustar  \0"), given the `runs`
/// (offset, length) of the image that hold data, ascending:
///
/// - when the runs cover the whole image, one plain header (type '0');
/// - otherwise a GNU sparse member (type 'S', as `tar --format=oldgnu -S`
///   writes it): the header holds the real size and the first 4 entries of
///   the sparse map, extension blocks of 21 entries each hold the rest, and
///   the member's data is the runs, one after another. A map that ends
///   before the image does ends with the entry (size, 0), which makes
///   extractors extend the file to its size.
pub fn gce_tar_headers(size: u64, epoch: u64, runs: &[(u64, u64)]) -> Result<Vec<u8>> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_path(GCE_MEMBER)?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_username("root")?;
    h.set_groupname("root")?;
    h.set_mtime(epoch);
    if runs == [(0, size)] {
        h.set_cksum();
        return Ok(h.as_bytes().to_vec());
    }
    let mut map = runs.to_vec();
    if map
        .last()
        .is_none_or(|&(offset, length)| offset + length < size)
    {
        map.push((size, 0));
    }
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(runs.iter().map(|r| r.1).sum());
    let (first, rest) = map.split_at(map.len().min(SPARSES_IN_HEADER));
    let gnu = h.as_gnu_mut().context("not a GNU tar header")?;
    gnu.set_real_size(size);
    for (slot, &(offset, length)) in gnu.sparse.iter_mut().zip(first) {
        slot.set_offset(offset);
        slot.set_length(length);
    }
    gnu.isextended[0] = u8::from(!rest.is_empty());
    h.set_cksum();
    let mut headers = h.as_bytes().to_vec();
    let blocks: Vec<_> = rest.chunks(SPARSES_IN_EXTENSION).collect();
    for (i, entries) in blocks.iter().enumerate() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (slot, &(offset, length)) in ext.sparse_mut().iter_mut().zip(entries.iter()) {
            slot.set_offset(offset);
            slot.set_length(length);
        }
        ext.set_is_extended(i + 1 < blocks.len());
        headers.extend_from_slice(ext.as_bytes());
    }
    Ok(headers)
}

/// The runs (offset, length) of the raw image that hold data: its non-zero
/// 64 KiB chunks, adjacent ones merged, the last cut at the image's end.
fn nonzero_runs(file: &File, len: u64, raw: &Path) -> Result<Vec<(u64, u64)>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for_each_nonzero_chunk(file, len, raw, |index, bytes| {
        let (start, n) = (index * CHUNK, bytes.len() as u64);
        match runs.last_mut() {
            Some((offset, length)) if *offset + *length == start => *length += n,
            _ => runs.push((start, n)),
        }
        Ok(())
    })?;
    Ok(runs)
}

/// Writes `out` as the tarball Compute Engine imports: a tar archive (old
/// GNU format) with the single member `disk.raw`, sparse when the image has
/// all-zero 64 KiB chunks (see [`gce_tar_headers`]; Google's instructions
/// make it with `tar --format=oldgnu -Sczf`), gzip-compressed with a fixed
/// header (mtime 0, no file name, OS 255) at the default level.
pub fn write_gce_tarball(raw: &Path, out: &Path, epoch: u64) -> Result<()> {
    let (file, len) = open_raw(raw)?;
    let runs = nonzero_runs(&file, len, raw)?;
    let headers = gce_tar_headers(len, epoch, &runs)?;
    write_via_temp(out, |f| {
        let w = BufWriter::with_capacity(MIB as usize, f);
        let mut gz = flate2::GzBuilder::new()
            .mtime(0)
            .operating_system(255)
            .write(w, flate2::Compression::default());
        gz.write_all(&headers)?;
        let mut buf = vec![0u8; MIB as usize];
        let mut stored = 0;
        for &(offset, length) in &runs {
            let mut done = 0;
            while done < length {
                let n = (length - done).min(MIB) as usize;
                let at = offset + done;
                file.read_exact_at(&mut buf[..n], at)
                    .with_context(|| format!("reading {} at offset {at}", raw.display()))?;
                gz.write_all(&buf[..n])?;
                done += n as u64;
            }
            stored += length;
        }
        // Pad the member to a 512-byte block; two zero blocks end the archive.
        let pad = stored.next_multiple_of(512) - stored;
        gz.write_all(&vec![0u8; pad as usize + 1024])?;
        let mut w = gz.finish()?;
        w.flush()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn vhd_geometry_follows_the_spec() {
        // Values from the VHD spec's algorithm, checked against qemu-img's
        // (force_size) footers in tests/diskfmt.rs.
        assert_eq!(vhd_geometry(4 * MIB), (120, 4, 17));
        assert_eq!(vhd_geometry(MIB), (30, 4, 17));
        assert_eq!(vhd_geometry(2 << 30), (4161, 16, 63));
        assert_eq!(vhd_geometry(30 << 30), (62415, 16, 63));
        // From 65535*16*63 sectors on: 255 sectors per track.
        assert_eq!(vhd_geometry(65535 * 16 * 63 * 512), (16191, 16, 255));
        // Capped.
        assert_eq!(vhd_geometry(4 << 40), (65535, 16, 255));
        // Each geometry covers at most the disk.
        for mib in [1u64, 3, 5, 17, 100, 127, 1000, 4096, 100_000] {
            let (c, h, s) = vhd_geometry(mib * MIB);
            assert!(u64::from(c) * u64::from(h) * u64::from(s) * 512 <= mib * MIB);
        }
    }

    #[test]
    fn vhd_footer_fields_and_checksum() {
        let id = vhd_unique_id("seed");
        let f = vhd_footer(6 * MIB, vhd_timestamp(1_735_689_600), id);
        assert_eq!(&f[0..8], b"conectix");
        assert_eq!(be32(&f, 8), 2);
        assert_eq!(be32(&f, 12), 0x0001_0000);
        assert_eq!(be64(&f, 16), u64::MAX);
        assert_eq!(be32(&f, 24), 1_735_689_600 - 946_684_800);
        assert_eq!(&f[28..32], b"kiln");
        assert_eq!(&f[36..40], b"Wi2k");
        assert_eq!(be64(&f, 40), 6 * MIB);
        assert_eq!(be64(&f, 48), 6 * MIB);
        let (c, h, s) = vhd_geometry(6 * MIB);
        assert_eq!(u16::from_be_bytes([f[56], f[57]]), c);
        assert_eq!((f[58], f[59]), (h, s));
        assert_eq!(be32(&f, 60), 2);
        assert_eq!(&f[68..84], &id);
        assert!(f[84..].iter().all(|&b| b == 0));
        // The checksum recomputed from the bytes.
        let mut zeroed = f;
        zeroed[64..68].fill(0);
        let sum: u32 = zeroed.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(be32(&f, 64), !sum);
        assert_eq!(vhd_checksum(&f), be32(&f, 64));
        // A changed byte changes it.
        let mut other = f;
        other[100] = 1;
        assert_ne!(vhd_checksum(&other), be32(&f, 64));
    }

    #[test]
    fn vhd_timestamp_and_unique_id() {
        assert_eq!(vhd_timestamp(VHD_EPOCH_OFFSET), 0);
        assert_eq!(vhd_timestamp(0), 0);
        assert_eq!(vhd_timestamp(VHD_EPOCH_OFFSET + 86400), 86400);
        assert_eq!(vhd_timestamp(u64::MAX), u32::MAX);
        let a = vhd_unique_id("image-a");
        assert_eq!(a, vhd_unique_id("image-a"));
        assert_ne!(a, vhd_unique_id("image-b"));
        assert_eq!(a[6] >> 4, 8);
        assert_eq!(a[8] >> 6, 0b10);
    }

    #[test]
    fn vhd_disk_size_is_whole_mib() {
        assert_eq!(vhd_disk_size(1), MIB);
        assert_eq!(vhd_disk_size(MIB), MIB);
        assert_eq!(vhd_disk_size(MIB + 512), 2 * MIB);
    }

    #[test]
    fn qcow2_layout_small() {
        // 3 MiB + 512: 49 guest clusters, one L2 table.
        let l = Qcow2Layout::new(3 * MIB + 512, vec![0, 17, 48]);
        assert_eq!(l.l1_entries, 1);
        assert_eq!(l.l1_clusters, 1);
        assert_eq!(l.refcount_table_clusters, 1);
        assert_eq!(l.refcount_blocks, 1);
        assert_eq!(l.l2_tables, vec![0]);
        assert_eq!(l.l1_offset(), 0x10000);
        assert_eq!(l.refcount_table_offset(), 0x20000);
        assert_eq!(l.refcount_blocks_offset(), 0x30000);
        assert_eq!(l.l2_offset(), 0x40000);
        assert_eq!(l.data_offset(), 0x50000);
        assert_eq!(l.total_clusters(), 8);
        assert_eq!(l.file_size(), 8 * 0x10000);

        let h = l.header();
        assert_eq!(&h[0..4], b"QFI\xfb");
        assert_eq!(be32(&h, 4), 3);
        assert_eq!(be32(&h, 20), 16);
        assert_eq!(be64(&h, 24), 3 * MIB + 512);
        assert_eq!(be32(&h, 36), 1);
        assert_eq!(be64(&h, 40), 0x10000);
        assert_eq!(be64(&h, 48), 0x20000);
        assert_eq!(be32(&h, 56), 1);
        assert_eq!(be32(&h, 96), 4);
        assert_eq!(be32(&h, 100), 112);
        assert!(h[104..].iter().all(|&b| b == 0));

        let l1 = l.l1_table();
        assert_eq!(be64(&l1, 0), 0x40000 | QCOW_OFLAG_COPIED);
        assert!(l1[8..].iter().all(|&b| b == 0));

        let rt = l.refcount_table();
        assert_eq!(be64(&rt, 0), 0x30000);
        assert!(rt[8..].iter().all(|&b| b == 0));

        let rb = l.refcount_block(0);
        for k in 0..8 {
            assert_eq!(u16::from_be_bytes([rb[2 * k], rb[2 * k + 1]]), 1);
        }
        assert!(rb[16..].iter().all(|&b| b == 0));

        let l2 = l.l2_table(0);
        assert_eq!(be64(&l2, 0), 0x50000 | QCOW_OFLAG_COPIED);
        assert_eq!(be64(&l2, 17 * 8), 0x60000 | QCOW_OFLAG_COPIED);
        assert_eq!(be64(&l2, 48 * 8), 0x70000 | QCOW_OFLAG_COPIED);
        let mapped = (0..L2_ENTRIES as usize)
            .filter(|&i| be64(&l2, i * 8) != 0)
            .count();
        assert_eq!(mapped, 3);
    }

    #[test]
    fn qcow2_layout_sparse_and_large() {
        // 2 GiB + 64 KiB with data at both ends: 5 L1 entries, 2 L2 tables.
        let size = (2 << 30) + QCOW2_CLUSTER_SIZE;
        let last = size / QCOW2_CLUSTER_SIZE - 1;
        let l = Qcow2Layout::new(size, vec![1, last]);
        assert_eq!(l.l1_entries, 5);
        assert_eq!(l.l2_tables, vec![0, 4]);
        let l1 = l.l1_table();
        assert_eq!(be64(&l1, 0), l.l2_offset() | QCOW_OFLAG_COPIED);
        assert_eq!(be64(&l1, 8), 0);
        assert_eq!(
            be64(&l1, 32),
            (l.l2_offset() + QCOW2_CLUSTER_SIZE) | QCOW_OFLAG_COPIED
        );
        let l2 = l.l2_table(1);
        assert_eq!(
            be64(&l2, ((last % L2_ENTRIES) * 8) as usize),
            (l.data_offset() + QCOW2_CLUSTER_SIZE) | QCOW_OFLAG_COPIED
        );
        // Nothing stored: no L2 table, only the metadata.
        let empty = Qcow2Layout::new(size, vec![]);
        assert!(empty.l2_tables.is_empty());
        assert_eq!(empty.total_clusters(), 4);
        // A fully allocated 4 GiB disk: 65536 data clusters, 8 L2 tables,
        // 65536 + 8 + 3 + refcount blocks > 65536 clusters: 3 blocks.
        let full = Qcow2Layout::new(4 << 30, (0..65536).collect());
        assert_eq!(full.l2_tables.len(), 8);
        assert_eq!(full.refcount_blocks, 3);
        assert_eq!(full.refcount_table_clusters, 1);
        assert!(full.refcount_blocks * REFCOUNTS_PER_BLOCK >= full.total_clusters());
        let last_block = full.refcount_block(2);
        let counted = (0..REFCOUNTS_PER_BLOCK as usize)
            .filter(|&k| last_block[2 * k + 1] == 1)
            .count() as u64;
        assert_eq!(counted, full.total_clusters() - 2 * REFCOUNTS_PER_BLOCK);
    }

    #[test]
    fn qcow2_refcount_clusters_cover_the_file() {
        assert_eq!(qcow2_refcount_clusters(5), (1, 1));
        // 32766 others + table + block = 32768: one block is just enough.
        assert_eq!(qcow2_refcount_clusters(REFCOUNTS_PER_BLOCK - 2), (1, 1));
        assert_eq!(qcow2_refcount_clusters(REFCOUNTS_PER_BLOCK - 1), (1, 2));
        // Past 8192 blocks (16 TiB of clusters) the table takes a second cluster.
        let others = REFTABLE_ENTRIES * REFCOUNTS_PER_BLOCK;
        let (table, blocks) = qcow2_refcount_clusters(others);
        assert_eq!(table, 2);
        assert!(blocks > REFTABLE_ENTRIES);
        for others in [0, 1, 40_000, 10_000_000, others] {
            let (table, blocks) = qcow2_refcount_clusters(others);
            assert!(blocks * REFCOUNTS_PER_BLOCK >= others + table + blocks);
            assert!(table * REFTABLE_ENTRIES >= blocks);
            // And not more than needed.
            assert!((blocks - 1) * REFCOUNTS_PER_BLOCK < others + table + blocks);
        }
    }

    #[test]
    fn zero_detection_and_extents() {
        assert!(is_zero(&[0u8; 10000]));
        let mut b = vec![0u8; 10000];
        b[9999] = 1;
        assert!(!is_zero(&b));

        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sparse.raw");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        f.set_len(10 * MIB).unwrap();
        f.write_all_at(b"x", 3 * MIB + 5).unwrap();
        f.write_all_at(&[0u8; 4096], 6 * MIB).unwrap(); // written zeros
        f.write_all_at(b"y", 10 * MIB - 1).unwrap();
        let mut seen = Vec::new();
        for_each_nonzero_chunk(&f, 10 * MIB, &p, |i, bytes| {
            assert_eq!(bytes.len() as u64, CHUNK);
            seen.push(i);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![3 * MIB / CHUNK, 10 * MIB / CHUNK - 1]);
    }

    #[test]
    fn errors_name_the_files() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("missing.raw");
        let out = d.path().join("disk.qcow2");
        let e = format!("{:#}", write_qcow2(&missing, &out).unwrap_err());
        assert!(e.contains("missing.raw"), "{e}");
        let e = format!("{:#}", write_vhd_fixed(&missing, &out, "s", 0).unwrap_err());
        assert!(e.contains("missing.raw"), "{e}");
        let e = format!("{:#}", write_gce_tarball(&missing, &out, 0).unwrap_err());
        assert!(e.contains("missing.raw"), "{e}");

        let odd = d.path().join("odd.raw");
        std::fs::write(&odd, [1u8; 1000]).unwrap();
        let e = format!("{:#}", write_qcow2(&odd, &out).unwrap_err());
        assert!(e.contains("odd.raw") && e.contains("512"), "{e}");
        assert!(!out.exists());

        // A directory that cannot be made: the error names the output.
        let blocker = d.path().join("file");
        std::fs::write(&blocker, b"").unwrap();
        let out = blocker.join("disk.vhd");
        let e = format!("{:#}", write_vhd_fixed(&odd, &out, "s", 0).unwrap_err());
        assert!(e.contains("file"), "{e}");
    }

    #[test]
    fn gce_tar_headers_plain_and_sparse() {
        // Whole image: one plain header.
        let h = gce_tar_headers(3 * MIB, 1_735_689_600, &[(0, 3 * MIB)]).unwrap();
        assert_eq!(h.len(), 512);
        assert_eq!(&h[..9], b"disk.raw\0");
        assert_eq!(&h[257..265], b"ustar  \0");
        assert_eq!(h[156], b'0');
        assert_eq!(&h[124..136], b"00014000000\0");
        assert_eq!(&h[136..148], b"14735102600\0");
        assert_eq!(&h[265..270], b"root\0");
        assert_eq!(&h[297..302], b"root\0");
        let header = tar::Header::from_byte_slice(&h);
        assert_eq!(header.mode().unwrap(), 0o644);
        assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
        assert_eq!(header.cksum().unwrap(), {
            let mut b = h.clone();
            b[148..156].fill(b' ');
            b.iter().map(|&x| u32::from(x)).sum::<u32>()
        });

        // Five runs: four in the header, one in an extension block.
        let runs: Vec<(u64, u64)> = (0..5).map(|i| (i * MIB, 4096)).collect();
        let h = gce_tar_headers(5 * MIB, 0, &runs).unwrap();
        assert_eq!(h.len(), 1024);
        assert_eq!(h[156], b'S');
        let header = tar::Header::from_byte_slice(&h[..512]);
        assert_eq!(header.entry_size().unwrap(), 5 * 4096, "stored bytes");
        assert_eq!(header.size().unwrap(), 5 * MIB, "real size");
        let gnu = header.as_gnu().unwrap();
        assert_eq!(gnu.real_size().unwrap(), 5 * MIB);
        assert_eq!(gnu.sparse[3].offset().unwrap(), 3 * MIB);
        assert!(gnu.is_extended());
        let ext = tar::GnuExtSparseHeader::new();
        let ext = {
            let mut e = ext;
            e.as_mut_bytes().copy_from_slice(&h[512..]);
            e
        };
        assert_eq!(ext.sparse()[0].offset().unwrap(), 4 * MIB);
        assert_eq!(ext.sparse()[0].length().unwrap(), 4096);
        // Then the end: (size, 0).
        assert_eq!(ext.sparse()[1].offset().unwrap(), 5 * MIB);
        assert_eq!(ext.sparse()[1].length().unwrap(), 0);
        assert!(ext.sparse()[2].is_empty());
        assert!(!ext.is_extended());

        // 30 runs and the end: 4 + 21 + 6 entries, two extension blocks;
        // offsets past 8 GiB in base-256.
        let big = 64u64 << 30;
        let runs: Vec<(u64, u64)> = (0..30).map(|i| (i * (2 << 30), 512)).collect();
        let h = gce_tar_headers(big, 0, &runs).unwrap();
        assert_eq!(h.len(), 3 * 512);
        assert_eq!(h[512 + 504], 1, "the first extension block is continued");
        assert_eq!(h[1024 + 504], 0);
        let mut last = tar::GnuExtSparseHeader::new();
        last.as_mut_bytes().copy_from_slice(&h[1024..]);
        assert_eq!(last.sparse()[4].offset().unwrap(), 29 * (2 << 30));
        assert_eq!(last.sparse()[4].offset[0], 0x80, "base-256");
        assert_eq!(last.sparse()[5].offset().unwrap(), big);
        // An all-zero image: nothing stored, the map is just the end.
        let h = gce_tar_headers(MIB, 0, &[]).unwrap();
        let header = tar::Header::from_byte_slice(&h[..512]);
        assert_eq!(header.entry_size().unwrap(), 0);
        assert_eq!(header.as_gnu().unwrap().sparse[0].offset().unwrap(), MIB);
    }

    #[test]
    fn gce_tarball_reads_back_with_the_tar_crate() {
        use std::io::Read;
        let d = tempfile::tempdir().unwrap();
        for (name, size, spots) in [
            (
                "scattered.raw",
                3 * MIB + 512,
                (0..40).map(|i| i * 70_001).collect(),
            ),
            (
                "dense.raw",
                200_000,
                (0..200_000).step_by(999).collect::<Vec<u64>>(),
            ),
            ("empty.raw", MIB, vec![]),
        ] {
            let raw = d.path().join(name);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&raw)
                .unwrap();
            f.set_len(size).unwrap();
            for &at in &spots {
                f.write_all_at(&[(at % 251) as u8 | 1], at).unwrap();
            }
            let out = d.path().join(format!("{name}.tar.gz"));
            write_gce_tarball(&raw, &out, 1_735_689_600).unwrap();
            let gz = flate2::read::GzDecoder::new(File::open(&out).unwrap());
            let mut archive = tar::Archive::new(gz);
            let mut entries = archive.entries().unwrap();
            let mut entry = entries.next().unwrap().unwrap();
            assert_eq!(entry.path().unwrap().to_str(), Some("disk.raw"));
            let dense = name == "dense.raw";
            let kind = entry.header().entry_type();
            assert_eq!(kind.is_gnu_sparse(), !dense, "{name}");
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            assert!(content == std::fs::read(&raw).unwrap(), "{name}");
            drop(entry);
            assert!(entries.next().is_none());
        }
    }

    #[test]
    fn a_failed_write_leaves_the_old_output() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("disk.vhd");
        std::fs::write(&out, b"old").unwrap();
        let e = write_via_temp(&out, |f| {
            let mut f = f;
            f.write_all(b"half a disk")?;
            bail!("the raw image went away")
        })
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("disk.vhd") && e.contains("went away"), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);

        write_via_temp(&out, |mut f| Ok(f.write_all(b"new")?)).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
