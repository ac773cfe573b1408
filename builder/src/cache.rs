//! Content-addressed download cache.
//!
//! Layout under the root:
//! - `sha256/<first two hex digits>/<hex>`: blobs, named by the sha256 of their content;
//! - `url/<sha256 of the URL>`: for documents verified by signature rather than by
//!   a known hash (InRelease), the sha256 of the last content fetched from that URL,
//!   so an offline build finds it.
//!
//! Every file is written to a temporary file in the destination's file system and
//! renamed into place, so readers never see a half-written file.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

/// The cache: a directory, created on first write.
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
}

/// Whether `s` is a sha256 in lowercase hex.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub use crate::sha256_hex;

impl Cache {
    /// A cache rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// The cache named by the environment: `$KILN_CACHE`, else
    /// `$XDG_CACHE_HOME/kiln`, else `$HOME/.cache/kiln`.
    pub fn from_env() -> Result<Cache> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(dir) = var("KILN_CACHE") {
            return Ok(Cache::new(dir));
        }
        if let Some(dir) = var("XDG_CACHE_HOME") {
            return Ok(Cache::new(PathBuf::from(dir).join("kiln")));
        }
        if let Some(home) = var("HOME") {
            return Ok(Cache::new(PathBuf::from(home).join(".cache").join("kiln")));
        }
        bail!("no cache directory: set KILN_CACHE (or XDG_CACHE_HOME or HOME)")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with this sha256 lives (whether or not it exists).
    pub fn blob_path(&self, sha256: &str) -> Result<PathBuf> {
        let sha = sha256.to_ascii_lowercase();
        if !is_sha256_hex(&sha) {
            bail!("{sha256:?} is not a sha256 in hex");
        }
        Ok(self.root.join("sha256").join(&sha[..2]).join(&sha))
    }

    /// The cached blob with this sha256, if present. The content is not re-hashed
    /// here; everything is hashed when it enters the cache.
    pub fn get(&self, sha256: &str) -> Option<PathBuf> {
        let path = self.blob_path(sha256).ok()?;
        path.is_file().then_some(path)
    }

    /// Re-hashes a cached blob; true if present and intact.
    pub fn verify(&self, sha256: &str) -> Result<bool> {
        let Some(path) = self.get(sha256) else {
            return Ok(false);
        };
        let mut file =
            fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let (actual, _) = hash_reader(&mut file, io::sink())
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(actual == sha256.to_ascii_lowercase())
    }

    /// Stores bytes; returns their sha256 and the blob path.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<(String, PathBuf)> {
        let sha = sha256_hex(bytes);
        let path = self.blob_path(&sha)?;
        if !path.is_file() {
            let mut tmp = self.temp_file_in(path.parent().expect("blob path has a parent"))?;
            tmp.write_all(bytes)
                .with_context(|| format!("writing to the cache in {}", self.root.display()))?;
            self.persist(tmp, &path)?;
        }
        Ok((sha, path))
    }

    /// Copies a file into the cache; returns its sha256 and the blob path.
    pub fn put_file(&self, src: &Path) -> Result<(String, PathBuf)> {
        let mut file = fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
        let mut tmp = self.temp_file()?;
        let (sha, _) = hash_reader(&mut file, &mut tmp)
            .with_context(|| format!("copying {} into the cache", src.display()))?;
        let path = self.commit(tmp, &sha)?;
        Ok((sha, path))
    }

    /// A temporary file inside the cache (same file system as the blobs), for
    /// streaming a download whose hash is known only at the end; see `commit`.
    pub fn temp_file(&self) -> Result<NamedTempFile> {
        self.temp_file_in(&self.root.join("sha256"))
    }

    /// Moves a fully written temporary file to the blob path of `sha256`. The
    /// caller has already checked that the content hashes to `sha256`.
    pub fn commit(&self, tmp: NamedTempFile, sha256: &str) -> Result<PathBuf> {
        let path = self.blob_path(sha256)?;
        let dir = path.parent().expect("blob path has a parent");
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        self.persist(tmp, &path)?;
        Ok(path)
    }

    /// Records that `url` last served the content with this sha256.
    pub fn record_url(&self, url: &str, sha256: &str) -> Result<()> {
        if !is_sha256_hex(sha256) {
            bail!("{sha256:?} is not a sha256 in hex");
        }
        let path = self.url_path(url);
        let mut tmp = self.temp_file_in(path.parent().expect("url path has a parent"))?;
        writeln!(tmp, "{sha256}").context("writing the cache's URL index")?;
        self.persist(tmp, &path)
    }

    /// The last content recorded for `url` (its sha256 and blob path), if still cached.
    pub fn lookup_url(&self, url: &str) -> Option<(String, PathBuf)> {
        let text = fs::read_to_string(self.url_path(url)).ok()?;
        let sha = text.trim().to_string();
        let path = self.get(&sha)?;
        Some((sha, path))
    }

    fn url_path(&self, url: &str) -> PathBuf {
        self.root.join("url").join(sha256_hex(url.as_bytes()))
    }

    fn temp_file_in(&self, dir: &Path) -> Result<NamedTempFile> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))
    }

    fn persist(&self, tmp: NamedTempFile, path: &Path) -> Result<()> {
        tmp.as_file()
            .sync_all()
            .with_context(|| format!("flushing {}", tmp.path().display()))?;
        tmp.persist(path)
            .with_context(|| format!("renaming into {}", path.display()))?;
        Ok(())
    }
}

/// Copies `reader` to `writer` while hashing; returns (sha256 hex, byte count).
pub fn hash_reader(reader: &mut impl Read, mut writer: impl Write) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n])?;
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let (sha, path) = cache.put_bytes(b"hello").unwrap();
        assert_eq!(
            sha,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(path, dir.path().join("sha256/2c").join(&sha));
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        assert_eq!(cache.get(&sha.to_uppercase()), Some(path.clone()));
        assert!(cache.verify(&sha).unwrap());
        // Putting the same content again is a no-op.
        assert_eq!(cache.put_bytes(b"hello").unwrap().1, path);
        assert!(cache.get(&"0".repeat(64)).is_none());
        assert!(cache.get("../../etc/passwd").is_none());

        let src = dir.path().join("src");
        fs::write(&src, b"file content").unwrap();
        let (sha2, p2) = cache.put_file(&src).unwrap();
        assert_eq!(sha2, sha256_hex(b"file content"));
        assert_eq!(fs::read(p2).unwrap(), b"file content");

        // No temporary files are left behind.
        for entry in walk(dir.path()) {
            let name = entry.file_name().unwrap().to_string_lossy().to_string();
            assert!(!name.starts_with(".tmp-"), "left over {name}");
        }
    }

    #[test]
    fn corrupted_blob_fails_verify() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let (sha, path) = cache.put_bytes(b"data").unwrap();
        fs::write(&path, b"datb").unwrap();
        assert!(!cache.verify(&sha).unwrap());
    }

    #[test]
    fn url_index() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let url = "http://mirror.example/debian/dists/trixie/InRelease";
        assert!(cache.lookup_url(url).is_none());
        let (sha, path) = cache.put_bytes(b"first").unwrap();
        cache.record_url(url, &sha).unwrap();
        assert_eq!(cache.lookup_url(url), Some((sha, path)));
        let (sha, path) = cache.put_bytes(b"second").unwrap();
        cache.record_url(url, &sha).unwrap();
        assert_eq!(cache.lookup_url(url), Some((sha, path)));
        assert!(cache.lookup_url("http://mirror.example/other").is_none());
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
