//! The k3s binary: a release asset checked against the release's sha256sum file,
//! or a local file named in the spec. Air-gap image tarballs come the same
//! ways: release assets checked against the same sha256sum file, or local
//! files; they land in /var/lib/rancher/k3s/agent/images/, which k3s imports
//! into containerd at start.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::fetch::Fetcher;
use crate::spec::{Arch, K3s};
use crate::tree::{Content, Entry, Tree};

/// Where k3s looks for image tarballs to import at start.
pub const AIRGAP_DIR: &str = "var/lib/rancher/k3s/agent/images";

/// Where k3s releases live unless `KILN_K3S_URL` says otherwise.
pub const DEFAULT_RELEASES_URL: &str = "https://github.com/k3s-io/k3s/releases";

/// The asset and checksum file names of a release for an arch.
pub fn asset_names(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::X86_64 => ("k3s", "sha256sum-amd64.txt"),
        Arch::Aarch64 => ("k3s-arm64", "sha256sum-arm64.txt"),
    }
}

/// Characters kept as they are in a tag path segment ('+' becomes %2B).
const TAG: &AsciiSet = &NON_ALPHANUMERIC.remove(b'.').remove(b'-').remove(b'_');

/// `<base>/download/<tag>/<asset>` with the tag URL-encoded.
pub fn asset_url(base: &str, tag: &str, asset: &str) -> String {
    format!(
        "{}/download/{}/{}",
        base.trim_end_matches('/'),
        utf8_percent_encode(tag, TAG),
        asset
    )
}

/// Finds an asset's hash in a sha256sum file (`<hex>  <name>` lines).
pub fn find_checksum(sums: &str, asset: &str) -> Option<String> {
    sums.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let hash = parts.next()?;
        let name = parts.next()?.trim_start_matches('*');
        let hash = hash.to_ascii_lowercase();
        (name == asset && crate::cache::is_sha256_hex(&hash)).then_some(hash)
    })
}

/// A k3s binary ready to be laid into the root.
#[derive(Clone, Debug)]
pub struct K3sBinary {
    pub version: String,
    pub sha256: String,
    pub path: PathBuf,
    /// Where it came from (a URL or a local path), for the manifest.
    pub source: String,
    /// Air-gap image tarballs: the spec's release assets, then its local files.
    pub airgap: Vec<AirgapImage>,
}

/// A verified air-gap image tarball.
#[derive(Clone, Debug)]
pub struct AirgapImage {
    /// Its file name in /var/lib/rancher/k3s/agent/images/.
    pub name: String,
    pub sha256: String,
    /// The verified file (in the cache, or the spec's local file).
    pub path: PathBuf,
    /// Where it came from (a URL or a local path), for the manifest.
    pub source: String,
}

/// A release's sha256sum file for an arch.
struct ReleaseSums {
    url: String,
    text: String,
}

impl ReleaseSums {
    fn fetch(fetcher: &Fetcher, base: &str, version: &str, arch: Arch) -> Result<ReleaseSums> {
        let (_, sums_name) = asset_names(arch);
        let url = asset_url(base, version, sums_name);
        let bytes = fetcher
            .fetch_signed_document(&url, &format!("k3s {version} {sums_name}"))
            .with_context(|| format!("fetching the k3s {version} checksums"))?;
        Ok(ReleaseSums {
            url,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    fn sha256(&self, asset: &str) -> Result<String> {
        find_checksum(&self.text, asset)
            .with_context(|| format!("{} has no sha256 for {asset}", self.url))
    }
}

/// Gets the k3s binary for `arch`: the spec's local file, or the release asset
/// from `KILN_K3S_URL` (default: the upstream releases), verified against the
/// release's sha256sum file and, when the spec pins one, its sha256. Then the
/// spec's air-gap image tarballs: release assets checked against the same
/// sha256sum file, and local files (hashed here; the bytes laid into the root
/// are checked against that hash).
pub fn fetch(fetcher: &Fetcher, spec: &K3s, arch: Arch) -> Result<K3sBinary> {
    let base = std::env::var("KILN_K3S_URL").unwrap_or_else(|_| DEFAULT_RELEASES_URL.to_string());
    // The sha256sum file is needed for a downloaded binary or any
    // downloaded air-gap tarball, and fetched once.
    let sums = if spec.file.is_none() || !spec.airgap_images.is_empty() {
        Some(ReleaseSums::fetch(fetcher, &base, &spec.version, arch)?)
    } else {
        None
    };
    let mut binary = match (&spec.file, &sums) {
        (Some(file), _) => local_binary(spec, file)?,
        (None, Some(sums)) => release_binary(fetcher, &base, spec, arch, sums)?,
        (None, None) => unreachable!("the sums are fetched when there is no local file"),
    };
    for name in &spec.airgap_images {
        let sums = sums.as_ref().expect("fetched for air-gap images");
        let sha = sums.sha256(name)?;
        let url = asset_url(&base, &spec.version, name);
        let path = fetcher
            .fetch_verified(
                &url,
                &sha,
                None,
                &format!("k3s {} air-gap images {name}", spec.version),
            )
            .with_context(|| format!("fetching the k3s air-gap images {name}"))?;
        binary.airgap.push(AirgapImage {
            name: name.clone(),
            sha256: sha,
            path,
            source: url,
        });
    }
    for file in &spec.airgap_files {
        let name = file
            .file_name()
            .with_context(|| format!("air-gap images {}: no file name", file.display()))?
            .to_string_lossy()
            .into_owned();
        let (sha, _) = crate::hash_file(file)
            .with_context(|| format!("hashing the air-gap images {}", file.display()))?;
        binary.airgap.push(AirgapImage {
            name,
            sha256: sha,
            path: file.clone(),
            source: file.display().to_string(),
        });
    }
    Ok(binary)
}

fn local_binary(spec: &K3s, file: &Path) -> Result<K3sBinary> {
    let bytes = std::fs::read(file)
        .with_context(|| format!("reading the k3s binary {}", file.display()))?;
    let sha = crate::sha256_hex(&bytes);
    if let Some(want) = &spec.sha256 {
        if *want != sha {
            bail!(
                "k3s binary {}: sha256 mismatch: the spec pins {want}, the file has {sha}",
                file.display()
            );
        }
    }
    Ok(K3sBinary {
        version: spec.version.clone(),
        sha256: sha,
        path: file.to_path_buf(),
        source: file.display().to_string(),
        airgap: Vec::new(),
    })
}

fn release_binary(
    fetcher: &Fetcher,
    base: &str,
    spec: &K3s,
    arch: Arch,
    sums: &ReleaseSums,
) -> Result<K3sBinary> {
    let (asset, _) = asset_names(arch);
    let sha = sums.sha256(asset)?;
    if let Some(want) = &spec.sha256 {
        if *want != sha {
            bail!(
                "k3s {} {asset}: the spec pins sha256 {want}, but {} lists {sha}",
                spec.version,
                sums.url
            );
        }
    }
    let url = asset_url(base, &spec.version, asset);
    let path = fetcher
        .fetch_verified(&url, &sha, None, &format!("k3s {} {asset}", spec.version))
        .with_context(|| format!("fetching k3s {}", spec.version))?;
    Ok(K3sBinary {
        version: spec.version.clone(),
        sha256: sha,
        path,
        source: url,
        airgap: Vec::new(),
    })
}

/// Lays air-gap image tarballs into /var/lib/rancher/k3s/agent/images/
/// (0644), each checked against its verified sha256 on the way in.
///
/// The root tree holds file contents in memory (it has no file-backed
/// content), so each tarball is read into memory, once: straight into the
/// tree's shared buffer, not into a Vec that is then copied.
pub fn lay_airgap(tree: &mut Tree, images: &[AirgapImage]) -> Result<()> {
    for image in images {
        let content = read_verified(&image.path, &image.sha256)
            .with_context(|| format!("laying the k3s air-gap images {}", image.name))?;
        let path = format!("{AIRGAP_DIR}/{}", image.name);
        tree.insert(&path, Entry::file(content, 0o644))
            .with_context(|| format!("laying /{path}"))?;
    }
    Ok(())
}

/// Reads a file into one buffer and checks its sha256: the file may have
/// changed since it was verified.
fn read_verified(path: &Path, sha256: &str) -> Result<Content> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f
        .metadata()
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len();
    let len = usize::try_from(len).context("the file does not fit in memory")?;
    // Collecting a sized iterator allocates the Arc once, at its final size.
    let mut content: Content = std::iter::repeat_n(0u8, len).collect();
    let buf = std::sync::Arc::get_mut(&mut content).expect("not shared yet");
    f.read_exact(buf)
        .with_context(|| format!("reading {}", path.display()))?;
    if f.read(&mut [0u8; 1])
        .with_context(|| format!("reading {}", path.display()))?
        != 0
    {
        bail!("{} grew after it was verified", path.display());
    }
    let got = crate::sha256_hex(&content);
    if got != sha256 {
        bail!(
            "{} changed after it was verified (sha256 {got}, expected {sha256})",
            path.display()
        );
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_the_tag() {
        assert_eq!(
            asset_url("http://127.0.0.1:1/rel/", "v1.33.5+k3s1", "k3s-arm64"),
            "http://127.0.0.1:1/rel/download/v1.33.5%2Bk3s1/k3s-arm64"
        );
        assert_eq!(asset_names(Arch::Aarch64).1, "sha256sum-arm64.txt");
    }

    #[test]
    fn checksum_lines_are_matched_by_exact_name() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let sums = format!("{a}  k3s-airgap-images-amd64.tar\n{b}  k3s\n");
        assert_eq!(find_checksum(&sums, "k3s"), Some("b".repeat(64)));
        assert_eq!(find_checksum(&sums, "k3s-arm64"), None);
        assert_eq!(find_checksum("short  k3s\n", "k3s"), None);
    }

    fn image(dir: &Path, name: &str, bytes: &[u8]) -> AirgapImage {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        AirgapImage {
            name: name.into(),
            sha256: crate::sha256_hex(bytes),
            path: path.clone(),
            source: path.display().to_string(),
        }
    }

    #[test]
    fn airgap_tarballs_land_in_agent_images_with_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let a = image(dir.path(), "k3s-airgap-images-amd64.tar.zst", b"zstd bytes");
        let b = image(dir.path(), "extra.tar", &[7u8; 100_000]);
        let mut tree = Tree::new();
        lay_airgap(&mut tree, &[a, b]).unwrap();
        let files: Vec<(&str, &Entry)> = tree.walk("var").filter(|(_, e)| !e.is_dir()).collect();
        assert_eq!(
            files.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            [
                "var/lib/rancher/k3s/agent/images/extra.tar",
                "var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst",
            ]
        );
        for (_, e) in &files {
            assert_eq!((e.mode, e.uid, e.gid), (0o644, 0, 0));
        }
        assert_eq!(
            tree.read("var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst")
                .unwrap()
                .as_ref(),
            b"zstd bytes"
        );
        assert_eq!(
            tree.read("var/lib/rancher/k3s/agent/images/extra.tar")
                .unwrap()
                .as_ref(),
            &[7u8; 100_000][..]
        );
    }

    #[test]
    fn an_airgap_tarball_changed_after_verification_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = image(dir.path(), "images.tar", b"verified");
        std::fs::write(&a.path, b"tampered").unwrap();
        let e = format!("{:#}", lay_airgap(&mut Tree::new(), &[a]).unwrap_err());
        assert!(e.contains("air-gap images images.tar"), "{e}");
        assert!(e.contains("changed after it was verified"), "{e}");
    }
}
