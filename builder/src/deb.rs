//! Unpacking Debian binary packages into the root tree.
//!
//! A `.deb` is an `ar` archive holding `debian-binary` ("2.0"), `control.tar.*`
//! and `data.tar[.xz|.zst|.gz]`. Only the data archive is read: maintainer
//! scripts are never run (see DESIGN.md, "Data flow of a build"), so whatever
//! they would do that the image needs is done by the builder itself — starting
//! with the merged-/usr links, which [`merged_usr_links`] makes before any
//! package is unpacked.
//!
//! What is kept from each tar member: the path (through [`Tree::insert`], so
//! that `./bin/x` lands in `usr/bin/x` once `bin -> usr/bin` exists), the
//! permission bits including setuid/setgid/sticky, the numeric uid and gid, and
//! for the kind: regular files, directories, symlinks, hard links (a second
//! entry sharing the content and metadata of the first) and character devices.
//! Modification times are dropped on purpose: the tree has none, emitters use
//! SOURCE_DATE_EPOCH. What is skipped, and only this: pax global headers (they
//! describe the archive, not a file). Block devices and FIFOs are refused with
//! an error, as the tree cannot hold them and no Debian package ships them.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::tree::{Entry, Kind, Tree};

/// Creates the merged-/usr layout every Debian release since bookworm expects:
/// `bin -> usr/bin`, `sbin -> usr/sbin`, `lib -> usr/lib`, and for amd64 also
/// `lib64 -> usr/lib64` (where the ELF interpreter lives), with the target
/// directories. Call it on the empty tree before unpacking packages; calling it
/// again is harmless. A real directory already standing where a link belongs is
/// an error, since the files in it would be hidden from the merged view.
pub fn merged_usr_links(tree: &mut Tree, debian_arch: &str) -> Result<()> {
    let mut links = vec!["bin", "sbin", "lib"];
    if debian_arch == "amd64" {
        links.push("lib64");
    }
    for name in links {
        let target = format!("usr/{name}");
        tree.mkdir_p(&target)
            .with_context(|| format!("creating /{target} for the merged-/usr layout"))?;
        match tree.get(name).map(|e| &e.kind) {
            None => {}
            Some(Kind::Symlink(t)) if t == &target || t == &format!("/{target}") => continue,
            Some(_) => bail!(
                "cannot make the merged-/usr link /{name} -> {target}: /{name} already exists \
                 and is not that link"
            ),
        }
        tree.insert(name, Entry::symlink(target))?;
    }
    Ok(())
}

/// Unpacks the data archive of the `.deb` at `path` into `tree` and returns the
/// tree paths it installed, in archive order (directories included). `package`
/// only names the package in errors.
pub fn unpack_deb(path: &Path, package: &str, tree: &mut Tree) -> Result<Vec<String>> {
    let file = File::open(path)
        .with_context(|| format!("package {package}: opening {}", path.display()))?;
    unpack_deb_from(BufReader::new(file), package, tree)
        .with_context(|| format!("package {package}: unpacking {}", path.display()))
}

/// [`unpack_deb`] on any reader of `.deb` bytes.
pub fn unpack_deb_from(reader: impl Read, package: &str, tree: &mut Tree) -> Result<Vec<String>> {
    let mut ar = ar::Archive::new(reader);
    let mut seen_version = false;
    while let Some(member) = ar.next_entry() {
        let member =
            member.with_context(|| format!("package {package}: reading the ar archive"))?;
        let name = String::from_utf8_lossy(member.header().identifier())
            .trim_end_matches('/')
            .to_string();
        if name == "debian-binary" {
            let mut version = String::new();
            member
                .take(64)
                .read_to_string(&mut version)
                .with_context(|| format!("package {package}: reading debian-binary"))?;
            if !version.starts_with("2.") {
                bail!(
                    "package {package}: debian-binary says format {:?}, only 2.x is supported",
                    version.trim()
                );
            }
            seen_version = true;
            continue;
        }
        if !name.starts_with("data.tar") {
            continue; // control.tar.* and any signature members
        }
        if !seen_version {
            bail!("package {package}: {name} comes before debian-binary; this is not a .deb");
        }
        let decoder: Box<dyn Read + '_> = match name.as_str() {
            "data.tar" => Box::new(member),
            "data.tar.xz" => Box::new(liblzma::read::XzDecoder::new(member)),
            "data.tar.zst" => Box::new(
                zstd::Decoder::new(member)
                    .with_context(|| format!("package {package}: starting zstd for {name}"))?,
            ),
            "data.tar.gz" => Box::new(flate2::read::GzDecoder::new(member)),
            other => bail!("package {package}: unsupported data member {other}"),
        };
        return unpack_data_tar(decoder, package, &name, tree);
    }
    bail!("package {package}: no data.tar member found")
}

/// Unpacks one (already decompressed) data.tar stream.
fn unpack_data_tar(
    reader: impl Read,
    package: &str,
    member: &str,
    tree: &mut Tree,
) -> Result<Vec<String>> {
    let mut archive = tar::Archive::new(reader);
    let mut installed = Vec::new();
    let entries = archive
        .entries()
        .with_context(|| format!("package {package}: reading {member}"))?;
    for entry in entries {
        let mut entry = entry.with_context(|| format!("package {package}: reading {member}"))?;
        let raw_path = entry.path_bytes().into_owned();
        let name = String::from_utf8(raw_path).map_err(|e| {
            anyhow!(
                "package {package}: {member}: path {:?} is not UTF-8",
                String::from_utf8_lossy(e.as_bytes())
            )
        })?;
        let ctx = || format!("package {package}: {member}: {name}");
        let header = entry.header();
        let mode = header.mode().with_context(ctx)? & 0o7777;
        let uid = u32::try_from(header.uid().with_context(ctx)?).with_context(ctx)?;
        let gid = u32::try_from(header.gid().with_context(ctx)?).with_context(ctx)?;
        let entry_type = header.entry_type();
        let meta = |kind| Entry {
            kind,
            mode,
            uid,
            gid,
        };
        use tar::EntryType as T;
        let (path, new) = match entry_type {
            T::XGlobalHeader => continue,
            T::Regular | T::Continuous | T::GNUSparse => {
                let mut content = Vec::with_capacity(entry.size() as usize);
                entry.read_to_end(&mut content).with_context(ctx)?;
                (name.clone(), meta(Kind::File(content.into())))
            }
            T::Directory => {
                // A directory shipped where the tree has a link to a directory
                // (`./lib/` over `lib -> usr/lib`) keeps the link, as dpkg does:
                // the metadata goes to the directory the link points at.
                let resolved = tree.resolve(&name, 0).with_context(ctx)?;
                (resolved, meta(Kind::Dir))
            }
            T::Symlink => {
                let target = link_name(&entry).with_context(ctx)?;
                (name.clone(), Entry::symlink(target))
            }
            T::Link => {
                let target = link_name(&entry).with_context(ctx)?;
                let resolved = tree.resolve_parent(&target).with_context(ctx)?;
                let original = tree.get(&resolved).cloned().ok_or_else(|| {
                    anyhow!("{}: hard link to {target}, which is not in the tree", ctx())
                })?;
                if original.is_dir() {
                    bail!("{}: hard link to the directory {target}", ctx());
                }
                // Same inode: same content (shared, not copied) and metadata.
                (name.clone(), original)
            }
            T::Char => {
                let major = header.device_major().with_context(ctx)?.unwrap_or(0);
                let minor = header.device_minor().with_context(ctx)?.unwrap_or(0);
                (name.clone(), meta(Kind::CharDevice { major, minor }))
            }
            other => bail!(
                "{}: unsupported tar entry type {other:?} (block devices and FIFOs cannot be \
                 part of an image tree)",
                ctx()
            ),
        };
        let dest = tree.resolve_parent(&path).with_context(ctx)?;
        if !new.is_dir() {
            // Inserting a non-directory over a directory drops what the
            // directory holds: refuse it rather than lose files silently.
            if let Some(old) = tree.get(&dest) {
                if old.is_dir() && tree.walk(&dest).next().is_some() {
                    bail!(
                        "{}: would replace the non-empty directory /{dest} by a non-directory",
                        ctx()
                    );
                }
            }
        }
        tree.insert(&dest, new).with_context(ctx)?;
        if !dest.is_empty() {
            installed.push(dest);
        }
    }
    Ok(installed)
}

fn link_name<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String> {
    let bytes = entry
        .link_name_bytes()
        .ok_or_else(|| anyhow!("link without a target"))?;
    String::from_utf8(bytes.into_owned()).map_err(|e| {
        anyhow!(
            "link target {:?} is not UTF-8",
            String::from_utf8_lossy(e.as_bytes())
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tar with the `tar` crate from (path, type, mode, uid, content or link target).
    fn make_tar(members: &[(&str, tar::EntryType, u32, u32, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, ty, mode, uid, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*ty);
            h.set_mode(*mode);
            h.set_uid(*uid as u64);
            h.set_gid(*uid as u64);
            h.set_mtime(1_700_000_000);
            match ty {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    h.set_size(0);
                    b.append_link(&mut h, path, std::str::from_utf8(data).unwrap())
                        .unwrap();
                }
                _ => {
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, *data).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn make_deb(data_name: &str, data: Vec<u8>) -> Vec<u8> {
        let mut ar = ar::Builder::new(Vec::new());
        let v = b"2.0\n";
        ar.append(&ar::Header::new(b"debian-binary".to_vec(), 4), &v[..])
            .unwrap();
        let control = make_tar(&[(
            "./control",
            tar::EntryType::Regular,
            0o644,
            0,
            b"Package: x\n",
        )]);
        ar.append(
            &ar::Header::new(b"control.tar".to_vec(), control.len() as u64),
            &control[..],
        )
        .unwrap();
        ar.append(
            &ar::Header::new(data_name.as_bytes().to_vec(), data.len() as u64),
            &data[..],
        )
        .unwrap();
        ar.into_inner().unwrap()
    }

    fn sample_tar() -> Vec<u8> {
        use tar::EntryType as T;
        make_tar(&[
            ("./", T::Directory, 0o755, 0, b""),
            ("./bin/", T::Directory, 0o755, 0, b""),
            ("./bin/tool", T::Regular, 0o4755, 0, b"#!tool"),
            ("./usr/share/doc/x/", T::Directory, 0o755, 0, b""),
            ("./usr/share/doc/x/owned", T::Regular, 0o640, 1000, b"mine"),
            ("./usr/bin/tool2", T::Link, 0o644, 0, b"./bin/tool"),
            ("./usr/bin/alias", T::Symlink, 0o777, 0, b"tool"),
            (
                "./lib/x86_64-linux-gnu/libz.so.1",
                T::Regular,
                0o644,
                0,
                b"ELF",
            ),
        ])
    }

    fn merged_tree() -> Tree {
        let mut t = Tree::new();
        merged_usr_links(&mut t, "amd64").unwrap();
        t
    }

    #[test]
    fn merged_usr_links_are_made_once() {
        let mut t = merged_tree();
        merged_usr_links(&mut t, "amd64").unwrap();
        assert_eq!(t.get("bin").unwrap().kind, Kind::Symlink("usr/bin".into()));
        assert_eq!(
            t.get("lib64").unwrap().kind,
            Kind::Symlink("usr/lib64".into())
        );
        assert!(t.get("usr/lib64").unwrap().is_dir());
        let mut arm = Tree::new();
        merged_usr_links(&mut arm, "arm64").unwrap();
        assert!(arm.get("lib64").is_none());
        let mut bad = Tree::new();
        bad.insert("sbin/init", Entry::file(b"x".to_vec(), 0o755))
            .unwrap();
        assert!(merged_usr_links(&mut bad, "arm64").is_err());
    }

    #[test]
    fn unpacks_each_compression_into_merged_usr() {
        let tar = sample_tar();
        let xz = {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            std::io::Write::write_all(&mut e, &tar).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, &tar).unwrap();
            e.finish().unwrap()
        };
        for (name, data) in [
            ("data.tar.xz", xz),
            ("data.tar.zst", zst),
            ("data.tar.gz", gz),
            ("data.tar", tar.clone()),
        ] {
            let mut t = merged_tree();
            let deb = make_deb(name, data);
            let installed = unpack_deb_from(&deb[..], "x", &mut t).unwrap();
            assert!(installed.contains(&"usr/bin/tool".to_string()), "{name}");
            // ./bin/ did not replace the link.
            assert_eq!(t.get("bin").unwrap().kind, Kind::Symlink("usr/bin".into()));
            let tool = t.get("usr/bin/tool").unwrap();
            assert_eq!(tool.mode, 0o4755, "setuid kept");
            let Kind::File(c) = &tool.kind else { panic!() };
            let link = t.get("usr/bin/tool2").unwrap();
            let Kind::File(c2) = &link.kind else { panic!() };
            assert!(std::sync::Arc::ptr_eq(c, c2), "hard link shares content");
            assert_eq!(link.mode, 0o4755);
            let owned = t.get("usr/share/doc/x/owned").unwrap();
            assert_eq!((owned.uid, owned.gid, owned.mode), (1000, 1000, 0o640));
            assert_eq!(
                t.get("usr/bin/alias").unwrap().kind,
                Kind::Symlink("tool".into())
            );
            assert_eq!(
                t.read("lib/x86_64-linux-gnu/libz.so.1").unwrap().as_ref(),
                b"ELF"
            );
            assert!(t.get("usr/lib/x86_64-linux-gnu/libz.so.1").is_some());
        }
    }

    #[test]
    fn errors_name_package_and_member() {
        let mut t = merged_tree();
        let tar = make_tar(&[(
            "./usr/bin/hard",
            tar::EntryType::Link,
            0o644,
            0,
            b"./usr/bin/missing",
        )]);
        let deb = make_deb("data.tar", tar);
        let err = format!(
            "{:#}",
            unpack_deb_from(&deb[..], "pkg-a", &mut t).unwrap_err()
        );
        assert!(
            err.contains("pkg-a") && err.contains("usr/bin/hard"),
            "{err}"
        );

        let deb = make_deb("data.tar.bz2", vec![0; 10]);
        let err = format!(
            "{:#}",
            unpack_deb_from(&deb[..], "pkg-b", &mut t).unwrap_err()
        );
        assert!(
            err.contains("pkg-b") && err.contains("data.tar.bz2"),
            "{err}"
        );

        let fifo = make_tar(&[("./run/fifo", tar::EntryType::Fifo, 0o644, 0, b"")]);
        let deb = make_deb("data.tar", fifo);
        let err = format!(
            "{:#}",
            unpack_deb_from(&deb[..], "pkg-c", &mut t).unwrap_err()
        );
        assert!(err.contains("pkg-c") && err.contains("run/fifo"), "{err}");
    }

    #[test]
    fn non_empty_directory_is_not_replaced_by_a_link() {
        let mut t = merged_tree();
        t.insert("etc/x/file", Entry::file(b"1".to_vec(), 0o644))
            .unwrap();
        let tar = make_tar(&[("./etc/x", tar::EntryType::Symlink, 0o777, 0, b"y")]);
        let deb = make_deb("data.tar", tar);
        assert!(unpack_deb_from(&deb[..], "p", &mut t).is_err());
        assert!(t.get("etc/x/file").is_some());
    }
}
