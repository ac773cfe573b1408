//! The k3s binary: a release asset checked against the release's sha256sum file,
//! or a local file named in the spec.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::fetch::Fetcher;
use crate::spec::{Arch, K3s};

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
}

/// Gets the k3s binary for `arch`: the spec's local file, or the release asset
/// from `KILN_K3S_URL` (default: the upstream releases), verified against the
/// release's sha256sum file and, when the spec pins one, its sha256.
pub fn fetch(fetcher: &Fetcher, spec: &K3s, arch: Arch) -> Result<K3sBinary> {
    if let Some(file) = &spec.file {
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
        return Ok(K3sBinary {
            version: spec.version.clone(),
            sha256: sha,
            path: file.clone(),
            source: file.display().to_string(),
        });
    }
    let base = std::env::var("KILN_K3S_URL").unwrap_or_else(|_| DEFAULT_RELEASES_URL.to_string());
    let (asset, sums_name) = asset_names(arch);
    let sums_url = asset_url(&base, &spec.version, sums_name);
    let sums = fetcher
        .fetch_signed_document(&sums_url, &format!("k3s {} {sums_name}", spec.version))
        .with_context(|| format!("fetching the k3s {} checksums", spec.version))?;
    let sums = String::from_utf8_lossy(&sums);
    let sha = find_checksum(&sums, asset)
        .with_context(|| format!("{sums_url} has no sha256 for {asset}"))?;
    if let Some(want) = &spec.sha256 {
        if *want != sha {
            bail!(
                "k3s {} {asset}: the spec pins sha256 {want}, but {sums_url} lists {sha}",
                spec.version
            );
        }
    }
    let url = asset_url(&base, &spec.version, asset);
    let path = fetcher
        .fetch_verified(&url, &sha, None, &format!("k3s {} {asset}", spec.version))
        .with_context(|| format!("fetching k3s {}", spec.version))?;
    Ok(K3sBinary {
        version: spec.version.clone(),
        sha256: sha,
        path,
        source: url,
    })
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
}
