//! The initramfs: an SVR4 "newc" cpio archive of a tree, gzip-compressed.
//!
//! newc is written by hand here: the format is a fixed 110-byte ASCII header,
//! the name and the data, each padded to 4 bytes (the kernel's
//! `init/initramfs.c` and Documentation/driver-api/early-userspace/buffer-format.rst
//! describe exactly what it reads). Writing it directly gives full control of
//! every field — inode numbers, link counts, owners, mtime, device numbers —
//! which is what makes the archive reproducible, and the code is shorter than
//! adapting a general cpio crate to that.
//!
//! Entries are written in the tree's sorted order, so a directory always comes
//! before what it holds (its path is a prefix of theirs). The root directory
//! is written as `.`, everything else without a leading `/` or `./`.

use std::io::Write;

use anyhow::{bail, Context, Result};

use crate::tree::{Kind, Tree};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

const TRAILER: &str = "TRAILER!!!";

/// Counts bytes written, for the 4-byte padding.
struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Counting<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> std::io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0; 3][..pad])
    }
}

/// The fields of one newc header that vary between entries.
struct Header<'a> {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    rdev: (u32, u32),
    name: &'a str,
    data: &'a [u8],
}

fn write_entry<W: Write>(out: &mut Counting<W>, h: &Header) -> std::io::Result<()> {
    let header = format!(
        "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        h.ino,
        h.mode,
        h.uid,
        h.gid,
        h.nlink,
        h.mtime,
        h.data.len(),
        0, // devmajor: the device holding the file; meaningless here
        0, // devminor
        h.rdev.0,
        h.rdev.1,
        h.name.len() + 1, // namesize counts the NUL
        0,                // check: only for the 070702 "crc" format
    );
    debug_assert_eq!(header.len(), 110);
    out.put(header.as_bytes())?;
    out.put(h.name.as_bytes())?;
    out.put(&[0])?;
    out.pad4()?;
    out.put(h.data)?;
    out.pad4()
}

/// Writes the whole tree as a newc archive. Every entry gets `mtime`; inode
/// numbers count up from 1 in path order; directories have the link count a
/// file system would give them (2 + subdirectories), everything else 1 —
/// entries sharing content (hard links unpacked from packages) become
/// separate files, which keeps the kernel's hard-link handling out of play.
pub fn write_newc(tree: &Tree, mtime: u32, out: impl Write) -> Result<()> {
    let mut subdirs: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for (path, entry) in tree.iter() {
        if entry.is_dir() && !path.is_empty() {
            let parent = path.rfind('/').map_or("", |i| &path[..i]);
            *subdirs.entry(parent).or_default() += 1;
        }
    }
    let mut out = Counting {
        inner: out,
        written: 0,
    };
    for (ino, (path, entry)) in (1u32..).zip(tree.iter()) {
        let perm = entry.mode & 0o7777;
        let (kind_bits, nlink, rdev, data): (u32, u32, (u32, u32), &[u8]) = match &entry.kind {
            Kind::Dir => (
                S_IFDIR,
                2 + subdirs.get(path).copied().unwrap_or(0),
                (0, 0),
                &[],
            ),
            Kind::File(c) => (S_IFREG, 1, (0, 0), c),
            Kind::Symlink(target) => (S_IFLNK, 1, (0, 0), target.as_bytes()),
            Kind::CharDevice { major, minor } => (S_IFCHR, 1, (*major, *minor), &[]),
        };
        if u32::try_from(data.len()).is_err() {
            bail!("/{path} is {} bytes, more than newc can hold", data.len());
        }
        let header = Header {
            ino,
            mode: kind_bits | perm,
            uid: entry.uid,
            gid: entry.gid,
            nlink,
            mtime,
            rdev,
            name: if path.is_empty() { "." } else { path },
            data,
        };
        write_entry(&mut out, &header)
            .with_context(|| format!("writing /{path} to the cpio archive"))?;
    }
    let trailer = Header {
        ino: 0,
        mode: 0,
        uid: 0,
        gid: 0,
        nlink: 1,
        mtime: 0,
        rdev: (0, 0),
        name: TRAILER,
        data: &[],
    };
    write_entry(&mut out, &trailer).context("writing the cpio trailer")?;
    out.inner.flush().context("writing the cpio archive")?;
    Ok(())
}

/// Writes the tree as a gzip-compressed newc archive, the initramfs format
/// every Linux kernel can unpack. The gzip header carries no file name and
/// mtime 0, so the output depends on the tree and `mtime` only.
pub fn write_initramfs(tree: &Tree, mtime: u32, out: impl Write) -> Result<()> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(3) // Unix, whatever the build host
        .write(out, flate2::Compression::best());
    write_newc(tree, mtime, &mut gz)?;
    gz.finish().context("finishing the gzip stream")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::squashfs::tests::{compare_extracted, sample_tree, MTIME};
    use crate::tree::Entry;
    use std::collections::BTreeMap;
    use std::process::{Command, Stdio};

    #[test]
    fn newc_bytes_are_exact() {
        let mut t = Tree::new();
        t.insert("a", Entry::symlink("b")).unwrap();
        let mut out = Vec::new();
        write_newc(&t, 0x10, &mut out).unwrap();
        let expect = concat!(
            // ".": ino 1, dir 0755, nlink 2, mtime 0x10, namesize 2, then 2 bytes pad
            "070701",
            "00000001",
            "000041ed",
            "00000000",
            "00000000",
            "00000002",
            "00000010",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000002",
            "00000000",
            ".\0",
            // "a": symlink 0777 -> "b", namesize 2, data "b" + 3 bytes pad
            "070701",
            "00000002",
            "0000a1ff",
            "00000000",
            "00000000",
            "00000001",
            "00000010",
            "00000001",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000002",
            "00000000",
            "a\0",
            "b\0\0\0",
            "070701",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000001",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "0000000b",
            "00000000",
            "TRAILER!!!\0",
            "\0\0\0",
        );
        assert_eq!(String::from_utf8(out).unwrap(), expect);
    }

    #[test]
    fn initramfs_is_reproducible_gzip() {
        let tree = sample_tree();
        let mut a = Vec::new();
        write_initramfs(&tree, MTIME, &mut a).unwrap();
        let mut b = Vec::new();
        write_initramfs(&tree.clone(), MTIME, &mut b).unwrap();
        assert!(a == b);
        // gzip magic, deflate, no flags (no name), mtime 0, xfl 2 (best), OS 3.
        assert_eq!(a[..10], [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3]);
        let mut newc = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&a[..]), &mut newc).unwrap();
        assert_eq!(newc.len() % 4, 0);
    }

    fn run_cpio(args: &[&str], input: &[u8], dir: &std::path::Path) -> String {
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .env("TZ", "UTC")
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&input).unwrap());
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn cpio_lists_and_extracts_it() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("SKIPPED: cpio not found (apt-get install cpio)");
            return;
        }
        let tree = sample_tree();
        let mut gz = Vec::new();
        write_initramfs(&tree, MTIME, &mut gz).unwrap();
        // As the kernel does, and as `gzip -dc | cpio` would.
        let mut newc = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut newc).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let listing = run_cpio(&["-itvn", "--quiet"], &newc, dir.path());
        // "-rwsr-xr-x   1 0        1               8 Nov 14  2023 usr/bin/su"
        // "crw-------   1 0        1          5,    1 Nov 14  2023 dev/console"
        let mut seen = BTreeMap::new();
        for line in listing.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let date = f.iter().position(|x| *x == "Nov").expect(line);
            assert_eq!(f[date..date + 3], ["Nov", "14", "2023"], "{line}");
            let name = f[date + 3];
            let size = f[4..date].join(" ");
            let target = (f.len() > date + 4).then(|| f[date + 5]);
            seen.insert(name.to_string(), (f[0], f[2], f[3], size, target));
        }
        assert_eq!(seen.len(), tree.len(), "{listing}");
        let get = |p: &str| {
            seen.get(p)
                .unwrap_or_else(|| panic!("{p} not in {listing}"))
        };
        assert_eq!(get(".").0, "drwxr-xr-x");
        assert_eq!(get("usr/bin/su").0, "-rwsr-xr-x");
        assert_eq!(get("tmp").0, "drwxrwxrwt");
        assert_eq!(get("home/user/notes").1, "1000");
        assert_eq!(get("home/user/notes").2, "1001");
        assert_eq!(get("etc/empty").3, "0");
        assert_eq!(get("usr/lib/big").3, (1536 * 1024 + 17).to_string());
        assert_eq!(get("bin").4, Some("usr/bin"));
        assert_eq!(get("dev/console").0, "crw-------");
        assert_eq!(get("dev/console").3, "5, 1");
        assert_eq!(get("dev/big-minor").3, "240, 300");

        run_cpio(&["-idm", "--quiet"], &newc, dir.path());
        compare_extracted(&tree, dir.path());
    }
}
