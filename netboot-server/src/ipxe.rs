//! The iPXE binaries the server hands to PXE firmware over TFTP, taken from
//! Debian's `ipxe` package through the builder's Debian client: the suite's
//! InRelease is verified against the keyring, the package against its index.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use bytes::Bytes;
use kiln_builder::debian::{self, Indexes};
use kiln_builder::fetch::Fetcher;
use kiln_builder::tree::Tree;

use crate::dhcp::config::debian as files;

/// The files of Debian's `ipxe` package (in /usr/lib/ipxe) the server serves:
/// BIOS PXE chain-loads undionly.kpxe; x86_64 UEFI firmware snponly.efi
/// (which drives the NIC through the firmware's own SNP driver) or
/// ipxe-amd64.efi; arm64 UEFI ipxe-arm64.efi.
pub const FILES: &[&str] = &[
    files::UNDIONLY_KPXE,
    files::SNPONLY_EFI,
    files::IPXE_AMD64_EFI,
    files::IPXE_ARM64_EFI,
];

/// iPXE binaries by file name, and the package version they came from.
#[derive(Clone, Debug)]
pub struct IpxeBinaries {
    pub version: String,
    pub files: BTreeMap<String, Bytes>,
}

/// Fetches `ipxe` from `suite` (e.g. "trixie") of the Debian mirror the
/// environment or the host's apt sources name, verified with `keyring`.
pub fn fetch(fetcher: &Fetcher, suite: &str, keyring: &Path) -> Result<IpxeBinaries> {
    let sources = debian::sources_for_suites(&[suite.to_string()], &["main".to_string()], keyring)
        .context("choosing the Debian mirror for iPXE")?;
    // ipxe is Architecture: all; the amd64 index lists it. The closure is
    // cached per verified index set, so a restart does not re-read the indexes.
    let indexes = Indexes::locate(fetcher, &sources, "amd64")
        .with_context(|| format!("verifying {suite}"))?;
    let pkg = indexes
        .resolve_cached(fetcher, &["ipxe".to_string()], &[])?
        .into_iter()
        .find(|p| p.name == "ipxe")
        .with_context(|| format!("{suite} has no ipxe package"))?;
    let downloaded =
        debian::download(fetcher, std::slice::from_ref(&pkg)).context("downloading ipxe")?;
    let (pkg, path) = downloaded
        .into_iter()
        .next()
        .context("downloading ipxe gave nothing")?;
    let mut tree = Tree::new();
    kiln_builder::deb::unpack_deb(&path, &pkg.name, &mut tree)
        .with_context(|| format!("unpacking ipxe {}", pkg.version))?;
    let mut files = BTreeMap::new();
    for name in FILES {
        let bytes = tree
            .read(&format!("usr/lib/ipxe/{name}"))
            .with_context(|| format!("ipxe {} has no /usr/lib/ipxe/{name}", pkg.version))?;
        files.insert(name.to_string(), Bytes::copy_from_slice(bytes));
    }
    tracing::info!(version = %pkg.version, "iPXE binaries ready");
    Ok(IpxeBinaries {
        version: pkg.version.to_string(),
        files,
    })
}

#[cfg(test)]
mod tests {
    /// Against the host's Debian mirror (run on demand: needs the network).
    #[test]
    #[ignore]
    fn real_archive_ipxe() {
        let cache = kiln_builder::cache::Cache::from_env().unwrap();
        let fetcher = kiln_builder::fetch::Fetcher::new(cache, false).unwrap();
        let b = super::fetch(
            &fetcher,
            "trixie",
            std::path::Path::new(kiln_builder::spec::DEFAULT_KEYRING),
        )
        .unwrap();
        for name in super::FILES {
            assert!(b.files[*name].len() > 50_000, "{name} is too small");
        }
        // PE/COFF for the EFI binaries.
        assert_eq!(&b.files["snponly.efi"][..2], b"MZ");
    }
}
