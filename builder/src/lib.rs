//! kiln's image builder: an image spec becomes verified sources, one in-memory
//! root tree, and the artifacts emitted from it (see DESIGN.md, "Data flow of a build").

pub mod boot;
pub mod build;
pub mod cache;
pub mod cpio;
pub mod deb;
pub mod debian;
pub mod disk;
pub mod diskfmt;
pub mod fat;
pub mod fetch;
pub mod flash;
pub mod inspect;
pub mod k3s;
pub mod manifest;
pub mod modules;
pub mod output;
pub mod overlay;
pub mod platform;
pub mod progress;
pub mod sdcard;
pub mod seed;
pub mod spec;
pub mod squashfs;
pub mod tree;
pub mod update;

/// Lower-case hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// sha256 (hex) and size of a file, read in a stream.
pub fn hash_file(path: &std::path::Path) -> anyhow::Result<(String, u64)> {
    use anyhow::Context;
    use sha2::Digest;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let n = std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok((hex::encode(h.finalize()), n))
}

/// Writes a file through a temporary file in the same directory and a rename.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let dir = path.parent().context("no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
