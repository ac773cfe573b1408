//! The root file system image: squashfs 4.0, written with `backhand`.
//!
//! Every entry of the tree becomes an inode with the entry's permission bits
//! (setuid/setgid/sticky included), uid and gid, and the build's mtime; the
//! superblock's modification time is that mtime too. The tree's sorted order,
//! fixed compressor settings and no clock or host input make the image a
//! function of the tree: the same tree gives the same bytes.
//!
//! Blocks are 128 KiB, as mksquashfs makes them by default. Files that have
//! the same content (hard links unpacked from packages, identical files in
//! different packages) are stored once, when at least one block long.
//!
//! backhand writes data sequentially and compresses each block on the calling
//! thread. To use every core, the blocks it is going to compress are worked
//! out beforehand (every block of each file of at least one block, in
//! backhand's node order, and the fragment blocks that pack the smaller files)
//! and compressed in parallel with rayon; backhand's compressor is then a thin
//! [`CompressionAction`] that takes the ready result for a block, found by the
//! block's sha256, and compresses anything else (metadata, a block it did not
//! foresee) itself. Both paths run the same compressor on the same bytes, so
//! the image is the same as without the head start, which a test checks.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufWriter, Cursor, Seek, Write};
use std::path::Path;

use anyhow::{Context, Result};
use backhand::compression::{CompressionAction, CompressionOptions, Compressor, DefaultCompressor};
use backhand::kind::Kind as SquashfsKind;
use backhand::{FilesystemCompressor, FilesystemReader, FilesystemWriter, Id, NodeHeader};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::tree::{Entry, Kind, Tree};

/// Squashfs data block size.
pub const BLOCK_SIZE: u32 = 128 * 1024;

/// The compressor of the image. All three are in every Debian kernel
/// (`CONFIG_SQUASHFS_{XZ,ZSTD,ZLIB}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// xz (preset 6, 128 KiB dictionary): the smallest image, the slowest to write.
    Xz,
    /// zstd (level 15): nearly xz's size, faster to write and to read.
    #[default]
    Zstd,
    /// gzip/zlib (level 9): for old readers; the largest image.
    Gzip,
}

impl Compression {
    fn default_level(self) -> u32 {
        match self {
            Compression::Xz => 6,
            Compression::Zstd => 15,
            Compression::Gzip => 9,
        }
    }
}

/// Writes `tree` as a squashfs image to `out`. `mtime` (seconds since the
/// epoch, normally SOURCE_DATE_EPOCH) is the time of every inode and of the
/// file system. `out` is written sequentially, from its current position
/// (the image is assembled in an unnamed temporary file first).
pub fn write_squashfs(
    tree: &Tree,
    mtime: u32,
    out: &mut impl Write,
    comp: Compression,
) -> Result<()> {
    write_squashfs_level(tree, mtime, out, comp, comp.default_level())
}

/// [`write_squashfs`] with an explicit compression level (xz: 0..=9, zstd:
/// 1..=22, gzip: 1..=9).
pub fn write_squashfs_level(
    tree: &Tree,
    mtime: u32,
    out: &mut impl Write,
    comp: Compression,
    level: u32,
) -> Result<()> {
    write_inner(tree, mtime, out, comp, level, true).map(|_| ())
}

/// [`write_squashfs`] with a persistent cache of compressed blocks at
/// `cache`: blocks whose bytes were compressed by an earlier build (the same
/// compressor, level and kiln) are taken from it instead of compressed again,
/// so a rebuild after a small change compresses only what changed. A block
/// from the cache is used only if it decompresses to bytes with the block's
/// sha256; the output is the same as without the cache. The cache then holds
/// exactly this image's blocks.
pub fn write_squashfs_cached(
    tree: &Tree,
    mtime: u32,
    out: &mut impl Write,
    comp: Compression,
    cache: &Path,
) -> Result<()> {
    let level = comp.default_level();
    let identity = format!(
        "kiln {} squashfs {comp:?} level {level} block {BLOCK_SIZE}",
        env!("CARGO_PKG_VERSION")
    );
    let id = match comp {
        Compression::Xz => Compressor::Xz,
        Compression::Zstd => Compressor::Zstd,
        Compression::Gzip => Compressor::Gzip,
    };
    let cached = BlockCache::load(cache, &identity, id);
    let (ahead, _) = write_with(tree, mtime, out, comp, level, true, Some(&cached))?;
    if let Err(e) = BlockCache::save(cache, &identity, &ahead) {
        tracing::warn!(
            "could not update the squashfs block cache {}: {e:#}",
            cache.display()
        );
    }
    Ok(())
}

/// Compressed blocks by the sha256 of their bytes.
type Blocks = HashMap<[u8; 32], Vec<u8>>;

/// Compressed blocks of earlier builds, by the sha256 of their bytes.
/// File format: a line with the identity, then records of
/// `sha256 (32 bytes) | length (u32 LE) | compressed bytes`.
pub struct BlockCache {
    id: Compressor,
    blocks: Blocks,
}

impl BlockCache {
    /// Loads the cache; a missing, foreign or damaged file gives an empty one.
    pub fn load(path: &Path, identity: &str, id: Compressor) -> BlockCache {
        let mut blocks = HashMap::new();
        let Ok(bytes) = std::fs::read(path) else {
            return BlockCache { id, blocks };
        };
        let header = format!("{identity}\n");
        let Some(mut rest) = bytes.strip_prefix(header.as_bytes()) else {
            tracing::debug!(
                "squashfs block cache {} is for another build setup",
                path.display()
            );
            return BlockCache { id, blocks };
        };
        while rest.len() >= 36 {
            let sha: [u8; 32] = rest[..32].try_into().expect("32 bytes");
            let len = u32::from_le_bytes(rest[32..36].try_into().expect("4 bytes")) as usize;
            let Some(data) = rest.get(36..36 + len) else {
                break;
            };
            blocks.insert(sha, data.to_vec());
            rest = &rest[36 + len..];
        }
        BlockCache { id, blocks }
    }

    /// Replaces the cache file (atomically) with `blocks`, in sha256 order.
    pub fn save(path: &Path, identity: &str, blocks: &Blocks) -> Result<()> {
        let mut keys: Vec<_> = blocks.keys().collect();
        keys.sort();
        let mut bytes = format!("{identity}\n").into_bytes();
        for k in keys {
            let data = &blocks[k];
            bytes.extend_from_slice(k);
            bytes.extend_from_slice(&(data.len() as u32).to_le_bytes());
            bytes.extend_from_slice(data);
        }
        crate::write_atomically(path, &bytes)
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// A cached block for these bytes, checked by decompressing it.
    fn get(&self, sha: &[u8; 32]) -> Option<Vec<u8>> {
        let data = self.blocks.get(sha)?;
        let mut out = Vec::with_capacity(BLOCK_SIZE as usize);
        DefaultCompressor.decompress(data, &mut out, self.id).ok()?;
        (<[u8; 32]>::from(Sha256::digest(&out)) == *sha).then(|| data.clone())
    }
}

fn write_inner(
    tree: &Tree,
    mtime: u32,
    out: &mut impl Write,
    comp: Compression,
    level: u32,
    compress_ahead: bool,
) -> Result<(usize, usize)> {
    write_with(tree, mtime, out, comp, level, compress_ahead, None).map(|(_, stats)| stats)
}

/// Writes the image; returns the blocks compressed ahead and (hits, misses).
fn write_with(
    tree: &Tree,
    mtime: u32,
    out: &mut impl Write,
    comp: Compression,
    level: u32,
    compress_ahead: bool,
    cache: Option<&BlockCache>,
) -> Result<(Blocks, (usize, usize))> {
    let root = tree.get("").context("the tree has no root directory")?;
    let root_header = NodeHeader::new((root.mode & 0o7777) as u16, root.uid, root.gid, mtime);
    // backhand's writer has setters for the root's mode and owner but not its
    // mtime; a writer made from a reader takes the root's whole header from
    // the reader's (public) node list. So: read an empty image, give its
    // root the header wanted, and start the writer from it.
    let mut seed = Cursor::new(Vec::new());
    FilesystemWriter::default()
        .write(&mut seed)
        .context("making the squashfs seed")?;
    seed.set_position(0);
    let mut seed = FilesystemReader::from_reader(seed).context("reading the squashfs seed")?;
    seed.root.root_mut().header = root_header;
    for id in [root.uid, root.gid] {
        if !seed.id_table.iter().any(|i| i.num == id) {
            seed.id_table.push(Id::new(id));
        }
    }
    let mut fs = FilesystemWriter::from_fs_reader(&seed).context("starting the squashfs writer")?;
    fs.set_time(mtime);
    fs.set_block_size(BLOCK_SIZE);
    let fc = compressor(comp, level)?;
    fs.set_compressor(fc);
    fs.set_kind(SquashfsKind::new_v4(&AHEAD));
    fs.set_no_duplicate_files(true);
    fs.set_kib_padding(4);

    // backhand keeps its nodes sorted by path components ("a/b" before
    // "a-b"), not by string like the tree; feed them in its order so every
    // insertion is an append.
    let mut entries: Vec<_> = tree.iter().collect();
    entries.sort_by(|a, b| Path::new(a.0).cmp(Path::new(b.0)));
    let ahead = if compress_ahead {
        compress_ahead_of_time(&entries, fc, cache)?
    } else {
        HashMap::new()
    };
    for (path, entry) in entries {
        if path.is_empty() {
            continue; // the root, done above
        }
        let header = NodeHeader::new((entry.mode & 0o7777) as u16, entry.uid, entry.gid, mtime);
        let added = match &entry.kind {
            Kind::Dir => fs.push_dir(path, header),
            Kind::File(content) => fs.push_file(Cursor::new(content.clone()), path, header),
            Kind::Symlink(target) => fs.push_symlink(target, path, header),
            Kind::CharDevice { major, minor } => {
                fs.push_char_device(encode_dev(*major, *minor), path, header)
            }
        };
        added.with_context(|| format!("adding /{path} to the squashfs image"))?;
    }
    // backhand stores a file, hashes it, and when the hash matches an earlier
    // file seeks back so the next data overwrites the duplicate; if nothing
    // follows, the duplicate stays beyond the image's end. So the image goes
    // to a temporary file first, cut to the size backhand reports.
    let mut tmp = tempfile::tempfile().context("creating a temporary file for the image")?;
    let (size, stats, ahead) = {
        let ready = ReadyBlocks::install(ahead);
        let (_, size) = fs
            .write(BufWriter::with_capacity(1 << 20, &mut tmp))
            .context("writing the squashfs image")?;
        (size, ready.stats(), ready.take())
    };
    tracing::debug!(
        blocks_ready = stats.0,
        blocks_compressed_in_line = stats.1,
        bytes = size,
        "squashfs image written"
    );
    tmp.set_len(size)
        .and_then(|()| tmp.rewind())
        .and_then(|()| std::io::copy(&mut tmp, out))
        .context("copying the squashfs image out of its temporary file")?;
    Ok((ahead, stats))
}

/// Works out the blocks backhand will compress for `entries` (in the order it
/// will push them) and compresses them on all cores. The result maps the
/// sha256 of a block's bytes to its compressed form.
fn compress_ahead_of_time(
    entries: &[(&str, &Entry)],
    fc: FilesystemCompressor,
    cache: Option<&BlockCache>,
) -> Result<Blocks> {
    let bs = BLOCK_SIZE as usize;
    // A block is one or more slices of file contents: one for a data block,
    // the packed files for a fragment block (put together only when its turn
    // comes, so that the small files are not all copied at once).
    let mut blocks: Vec<Vec<&[u8]>> = Vec::new();
    let mut fragment: Vec<&[u8]> = Vec::new();
    let mut fragment_len = 0;
    for (_, entry) in entries {
        let Kind::File(content) = &entry.kind else {
            continue;
        };
        let len = content.len();
        if len >= bs {
            // Whole blocks, and the tail as a block of its own (backhand does
            // not put tails in fragments); blocks of zeros are holes.
            blocks.extend(
                content
                    .chunks(bs)
                    .filter(|c| c.iter().any(|b| *b != 0))
                    .map(|c| vec![c]),
            );
        } else if len > 0 {
            // Smaller files are packed into fragment blocks, in order; a file
            // that does not fit closes the current block.
            if fragment_len + len > bs {
                blocks.push(std::mem::take(&mut fragment));
                fragment_len = 0;
            }
            fragment.push(content);
            fragment_len += len;
        }
    }
    if !fragment.is_empty() {
        blocks.push(fragment);
    }
    blocks
        .par_iter()
        .map(|pieces| {
            let block: Cow<[u8]> = match pieces.as_slice() {
                [one] => Cow::Borrowed(one),
                many => Cow::Owned(many.concat()),
            };
            let sha: [u8; 32] = Sha256::digest(&block).into();
            if let Some(compressed) = cache.and_then(|c| c.get(&sha)) {
                return Ok((sha, compressed));
            }
            let mut compressed = DefaultCompressor
                .compress(&block, fc, BLOCK_SIZE)
                .context("compressing a squashfs block")?;
            // zstd hands back a buffer of the worst-case size; keep only
            // what is used, since all blocks are held until written.
            compressed.shrink_to_fit();
            Ok((sha, compressed))
        })
        .collect()
}

thread_local! {
    /// Blocks compressed ahead for the `FilesystemWriter::write` running on
    /// this thread (see [`ReadyBlocks`]).
    static READY: RefCell<Ready> = RefCell::new(Ready::default());
}

#[derive(Default)]
struct Ready {
    blocks: Blocks,
    /// Blocks found ready, and blocks compressed on the spot.
    hits: usize,
    misses: usize,
}

/// Makes blocks compressed ahead available to [`AHEAD`] on this thread for
/// as long as it lives (backhand calls the compressor on the thread that
/// called `write`).
struct ReadyBlocks;

impl ReadyBlocks {
    fn install(blocks: Blocks) -> ReadyBlocks {
        READY.with(|r| {
            *r.borrow_mut() = Ready {
                blocks,
                hits: 0,
                misses: 0,
            }
        });
        ReadyBlocks
    }

    /// The blocks compressed ahead, taken back.
    fn take(&self) -> Blocks {
        READY.with(|r| std::mem::take(&mut r.borrow_mut().blocks))
    }

    /// (hits, misses) so far.
    fn stats(&self) -> (usize, usize) {
        READY.with(|r| {
            let r = r.borrow();
            (r.hits, r.misses)
        })
    }
}

impl Drop for ReadyBlocks {
    fn drop(&mut self) {
        READY.with(|r| std::mem::take(&mut *r.borrow_mut()));
    }
}

/// backhand's default compressor, with a short cut for blocks compressed
/// ahead of time.
struct AheadCompressor;

static AHEAD: AheadCompressor = AheadCompressor;

impl CompressionAction for AheadCompressor {
    type Error = backhand::BackhandError;
    type Compressor = Compressor;
    type FilesystemCompressor = FilesystemCompressor;
    type SuperBlock = backhand::SuperBlock;

    fn decompress(
        &self,
        bytes: &[u8],
        out: &mut Vec<u8>,
        compressor: Compressor,
    ) -> Result<(), Self::Error> {
        DefaultCompressor.decompress(bytes, out, compressor)
    }

    fn compress(
        &self,
        bytes: &[u8],
        fc: FilesystemCompressor,
        block_size: u32,
    ) -> Result<Vec<u8>, Self::Error> {
        // Kept after use: a file stored twice (backhand's duplicate check
        // comes after compressing) needs its blocks twice.
        let ready = READY.with(|r| {
            let mut r = r.borrow_mut();
            let found = if r.blocks.is_empty() {
                None
            } else {
                r.blocks
                    .get(&<[u8; 32]>::from(Sha256::digest(bytes)))
                    .cloned()
            };
            match found {
                Some(_) => r.hits += 1,
                None => r.misses += 1,
            }
            found
        });
        match ready {
            Some(compressed) => Ok(compressed),
            None => DefaultCompressor.compress(bytes, fc, block_size),
        }
    }

    fn compression_options(
        &self,
        superblock: &mut Self::SuperBlock,
        kind: &SquashfsKind,
        fs_compressor: FilesystemCompressor,
    ) -> Result<Option<Vec<u8>>, Self::Error> {
        DefaultCompressor.compression_options(superblock, kind, fs_compressor)
    }
}

fn compressor(comp: Compression, level: u32) -> Result<FilesystemCompressor> {
    use backhand::compression::{Gzip, Zstd};
    let fc = match comp {
        // No options block: backhand then uses a dictionary of one block and
        // no branch filter, which is what readers assume without options.
        Compression::Xz => {
            let mut fc = FilesystemCompressor::new(Compressor::Xz, None)?;
            let mut extra = backhand::ExtraXz::default();
            extra.level(level)?;
            fc.extra(backhand::CompressionExtra::Xz(extra))?;
            fc
        }
        Compression::Zstd => FilesystemCompressor::new(
            Compressor::Zstd,
            Some(CompressionOptions::Zstd(Zstd {
                compression_level: level,
            })),
        )?,
        Compression::Gzip => FilesystemCompressor::new(
            Compressor::Gzip,
            Some(CompressionOptions::Gzip(Gzip {
                compression_level: level,
                window_size: 15,
                strategies: 0,
            })),
        )?,
    };
    Ok(fc)
}

/// Linux's `new_encode_dev`, the device number format of squashfs inodes.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tree::Entry;
    use std::collections::BTreeMap;
    use std::process::Command;

    pub(crate) const MTIME: u32 = 1_700_000_000; // 2023-11-14 22:13:20 UTC

    /// Deterministic bytes that do not compress much.
    pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Files, nested dirs, links, setuid, non-root owner, empty and big files,
    /// devices, a sticky directory.
    pub(crate) fn sample_tree() -> Tree {
        let mut t = Tree::new();
        let mut owned = |path: &str, mut e: Entry, uid: u32| {
            e.uid = uid;
            e.gid = uid + 1;
            t.insert(path, e).unwrap();
        };
        owned("etc/hostname", Entry::file(b"node\n".to_vec(), 0o644), 0);
        owned("etc/empty", Entry::file(Vec::new(), 0o644), 0);
        owned("usr/bin/su", Entry::file(b"#!setuid".to_vec(), 0o4755), 0);
        owned("usr/bin/wall", Entry::file(b"#!setgid".to_vec(), 0o2755), 0);
        owned("usr/bin/sh", Entry::symlink("busybox"), 0);
        owned("bin", Entry::symlink("usr/bin"), 0);
        owned(
            "usr/share/a/b/c/d/deep.txt",
            Entry::file(b"deep".to_vec(), 0o600),
            0,
        );
        owned(
            "usr/share/a-b",
            Entry::file(b"dash sorts before slash".to_vec(), 0o644),
            0,
        );
        owned("home/user", Entry::dir(0o750), 1000);
        owned(
            "home/user/notes",
            Entry::file(b"mine".to_vec(), 0o640),
            1000,
        );
        owned("tmp", Entry::dir(0o1777), 0);
        owned("dev/console", Entry::char_device(5, 1, 0o600), 0);
        owned("dev/null", Entry::char_device(1, 3, 0o666), 0);
        owned("dev/big-minor", Entry::char_device(240, 300, 0o600), 0);
        let big: Vec<u8> = noise(1536 * 1024 + 17, 7);
        owned("usr/lib/big", Entry::file(big.clone(), 0o644), 0);
        owned("usr/lib/big-copy", Entry::file(big, 0o644), 0);
        owned("usr/lib/zeros", Entry::file(vec![0; 300 * 1024], 0o644), 0);
        t
    }

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("-version").output().is_ok()
    }

    fn image(tree: &Tree, comp: Compression) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        write_squashfs(tree, MTIME, &mut out, comp).unwrap();
        out.into_inner()
    }

    #[test]
    fn same_tree_same_bytes() {
        let tree = sample_tree();
        for comp in [Compression::Zstd, Compression::Xz, Compression::Gzip] {
            let a = image(&tree, comp);
            let b = image(&tree.clone(), comp);
            assert!(a == b, "{comp:?} image differs between two runs");
            assert_eq!(&a[..4], b"hsqs");
            assert_eq!(a.len() % 4096, 0, "padded to 4 KiB");
            // The duplicate 1.5 MiB file is stored once.
            assert!(a.len() < 1536 * 1024 * 3 / 2, "{comp:?}: {} bytes", a.len());
        }
    }

    #[test]
    fn compressing_ahead_changes_nothing_but_time() {
        let tree = sample_tree();
        for comp in [Compression::Zstd, Compression::Xz, Compression::Gzip] {
            let level = comp.default_level();
            let mut ahead = Vec::new();
            let (hits, misses) = write_inner(&tree, MTIME, &mut ahead, comp, level, true).unwrap();
            let mut inline = Vec::new();
            let (hits0, _) = write_inner(&tree, MTIME, &mut inline, comp, level, false).unwrap();
            assert!(ahead == inline, "{comp:?}");
            assert_eq!(hits0, 0);
            // 13 blocks of the big file + 13 again for its copy, 1 fragment
            // block; the misses are the metadata blocks (inodes, directories,
            // the empty final fragment block).
            assert_eq!(hits, 27, "{comp:?}");
            assert!(misses <= 4, "{comp:?}: {misses} misses");
        }
    }

    /// `unsquashfs -lln` lines: path -> (mode string, owner, size or device, link target).
    fn listing(img: &Path) -> BTreeMap<String, (String, String, String, Option<String>)> {
        let out = Command::new("unsquashfs")
            .env("TZ", "UTC")
            .arg("-lln")
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut map = BTreeMap::new();
        for line in text.lines().filter(|l| l.contains("squashfs-root")) {
            // "-rwsr-xr-x 0/0   8 2023-11-14 22:13 squashfs-root/usr/bin/su"
            // "crw------- 0/0   5,  1 2023-11-14 22:13 squashfs-root/dev/console"
            let (head, rest) = line.split_at(line.find(" squashfs-root").unwrap());
            let name = rest.trim_start().trim_start_matches("squashfs-root");
            let (name, target) = match name.split_once(" -> ") {
                Some((n, t)) => (n, Some(t.to_string())),
                None => (name, None),
            };
            let f: Vec<&str> = head.split_whitespace().collect();
            let n = f.len();
            assert_eq!(f[n - 2..], ["2023-11-14", "22:13"], "mtime of {line}");
            let size = f[2..n - 2].join(" ");
            map.insert(
                name.trim_start_matches('/').to_string(),
                (f[0].to_string(), f[1].to_string(), size, target),
            );
        }
        map
    }

    #[test]
    fn unsquashfs_lists_and_extracts_it() {
        if !have("unsquashfs") {
            eprintln!("SKIPPED: unsquashfs not found (apt-get install squashfs-tools)");
            return;
        }
        let tree = sample_tree();
        for comp in [Compression::Zstd, Compression::Xz, Compression::Gzip] {
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("root.squashfs");
            std::fs::write(&img, image(&tree, comp)).unwrap();
            let list = listing(&img);
            let get = |p: &str| list.get(p).unwrap_or_else(|| panic!("{p} not listed"));
            assert_eq!(list.len(), tree.len(), "{list:#?}");
            assert_eq!(get("").0, "drwxr-xr-x");
            assert_eq!(get("usr/bin/su").0, "-rwsr-xr-x");
            assert_eq!(get("usr/bin/wall").0, "-rwxr-sr-x");
            assert_eq!(get("tmp").0, "drwxrwxrwt");
            assert_eq!(get("home/user").1, "1000/1001");
            assert_eq!(get("home/user/notes").1, "1000/1001");
            assert_eq!(get("home/user/notes").0, "-rw-r-----");
            assert_eq!(get("etc/empty").2, "0");
            assert_eq!(get("usr/lib/big").2, (1536 * 1024 + 17).to_string());
            assert_eq!(get("bin").3.as_deref(), Some("usr/bin"));
            assert_eq!(get("usr/bin/sh").0, "lrwxrwxrwx");
            assert_eq!(get("dev/console").0, "crw-------");
            assert_eq!(get("dev/console").2, "5, 1");
            // unsquashfs lists a device as (rdev >> 8, rdev & 0xff), which is
            // wrong for minors above 255; extraction decodes it right (below).
            assert_eq!(get("dev/null").2, "1, 3");
            for (path, entry) in tree.iter() {
                let (mode, owner, _, _) = get(path);
                assert_eq!(owner, &format!("{}/{}", entry.uid, entry.gid), "{path}");
                assert!(mode.len() == 10, "{path}: {mode}");
            }

            let out = dir.path().join("x");
            let status = Command::new("unsquashfs")
                .args(["-n", "-d"])
                .arg(&out)
                .arg(&img)
                .output()
                .unwrap();
            assert!(
                status.status.success(),
                "{}",
                String::from_utf8_lossy(&status.stderr)
            );
            compare_extracted(&tree, &out);
        }
    }

    /// Compares an extracted directory with the tree: kinds, permission bits,
    /// contents and link targets (owners are checked in the listing).
    pub(crate) fn compare_extracted(tree: &Tree, root: &Path) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let mut seen = 0;
        for (path, entry) in tree.iter() {
            let p = root.join(path);
            let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{path}: {e}"));
            seen += 1;
            match &entry.kind {
                Kind::Dir => assert!(md.is_dir(), "{path}"),
                Kind::File(c) => {
                    assert!(md.is_file(), "{path}");
                    assert!(std::fs::read(&p).unwrap() == c.as_ref(), "{path} content");
                }
                Kind::Symlink(t) => {
                    assert_eq!(std::fs::read_link(&p).unwrap().to_str().unwrap(), t)
                }
                Kind::CharDevice { major, minor } => {
                    assert!(md.file_type().is_char_device(), "{path}");
                    let rdev = md.rdev();
                    let (maj, min) = (
                        ((rdev >> 8) & 0xfff) as u32 | ((rdev >> 32) & !0xfff) as u32,
                        (rdev & 0xff) as u32 | ((rdev >> 12) & !0xff) as u32,
                    );
                    assert_eq!((maj, min), (*major, *minor), "{path}");
                }
            }
            if !matches!(entry.kind, Kind::Symlink(_)) {
                assert_eq!(md.mode() & 0o777, entry.mode & 0o777, "{path} mode");
            }
        }
        let mut on_disk = 0;
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            on_disk += 1;
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    on_disk += 1;
                }
            }
        }
        assert_eq!(seen, on_disk, "extracted entry count");
    }

    /// Reads up to `limit` bytes of files under `src` (sorted walk) into a tree.
    fn tree_from_host(srcs: &[&str], limit: u64) -> Tree {
        let mut t = Tree::new();
        let mut total = 0u64;
        let mut stack: Vec<std::path::PathBuf> = srcs.iter().rev().map(Into::into).collect();
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut names: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            names.sort();
            let mut subdirs = Vec::new();
            for p in names {
                let rel = p.to_str().unwrap().trim_start_matches('/').to_string();
                let Ok(md) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                use std::os::unix::fs::PermissionsExt;
                let mode = md.permissions().mode() & 0o7777;
                if md.is_dir() {
                    t.insert(&rel, Entry::dir(mode)).unwrap();
                    subdirs.push(p);
                } else if md.file_type().is_symlink() {
                    let target = std::fs::read_link(&p).unwrap();
                    t.insert(&rel, Entry::symlink(target.to_str().unwrap()))
                        .unwrap();
                } else if md.is_file() && md.len() < 32 << 20 && total + md.len() <= limit {
                    if let Ok(data) = std::fs::read(&p) {
                        total += data.len() as u64;
                        t.insert(&rel, Entry::file(data, mode)).unwrap();
                    }
                }
            }
            stack.extend(subdirs.into_iter().rev());
            if total >= limit - (1 << 20) {
                break;
            }
        }
        t
    }

    /// Writes a tree made of this machine's files (KILN_BENCH_SRC, colon
    /// separated, default /usr/lib; KILN_BENCH_MB, default 150) with each
    /// compressor (KILN_BENCH_COMP: xz, zstd, gzip; default all) and prints
    /// time and size. Run it under `/usr/bin/time -v` for the peak RSS.
    #[test]
    #[ignore = "benchmark: cargo test -p kiln-builder --lib bench_squashfs -- --ignored --nocapture"]
    fn bench_squashfs() {
        let srcs = std::env::var("KILN_BENCH_SRC").unwrap_or_else(|_| "/usr/lib".into());
        let srcs: Vec<&str> = srcs.split(':').collect();
        let mb: u64 = std::env::var("KILN_BENCH_MB").map_or(150, |v| v.parse().unwrap());
        let start = std::time::Instant::now();
        let tree = tree_from_host(&srcs, mb << 20);
        println!(
            "tree: {} entries, {:.1} MB of file content from {srcs:?}, read in {:.1}s",
            tree.len(),
            tree.content_size() as f64 / 1e6,
            start.elapsed().as_secs_f64()
        );
        let comps = std::env::var("KILN_BENCH_COMP").unwrap_or_else(|_| "zstd,xz,gzip".into());
        for name in comps.split(',') {
            let (comp, level) = match name.split_once(':') {
                Some((c, l)) => (c, Some(l.parse::<u32>().unwrap())),
                None => (name, None),
            };
            let comp = match comp {
                "xz" => Compression::Xz,
                "zstd" => Compression::Zstd,
                "gzip" => Compression::Gzip,
                other => panic!("unknown compression {other}"),
            };
            let level = level.unwrap_or(comp.default_level());
            let mut out = tempfile::tempfile().unwrap();
            let start = std::time::Instant::now();
            let ahead = std::env::var_os("KILN_BENCH_INLINE").is_none();
            let (hits, misses) = write_inner(&tree, MTIME, &mut out, comp, level, ahead).unwrap();
            let secs = start.elapsed().as_secs_f64();
            let size = out.metadata().unwrap().len();
            println!(
                "{comp:?} level {level}: {secs:.1}s, {:.1} MB -> {:.1} MB ({:.1}%), \
                 blocks compressed ahead/in line: {hits}/{misses}",
                tree.content_size() as f64 / 1e6,
                size as f64 / 1e6,
                100.0 * size as f64 / tree.content_size() as f64
            );
        }
    }
}
