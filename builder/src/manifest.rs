//! manifest.json: what an image holds and the hash of every byte of it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The manifest's file name in an image directory.
pub const FILE_NAME: &str = "manifest.json";

/// Why an image directory's manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no {} (is the image built?)", .0.display())]
    Missing(PathBuf),
    #[error("reading {}: {}", .0.display(), .1)]
    Read(PathBuf, std::io::Error),
    #[error("parsing {}: {}", .0.display(), .1)]
    Parse(PathBuf, serde_json::Error),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub arch: String,
    pub kiln_version: String,
    /// sha256 of the spec file.
    pub spec_sha256: String,
    pub source_date_epoch: u64,
    pub kernel: Kernel,
    pub k3s: Option<K3sInfo>,
    pub artifacts: Vec<Artifact>,
    pub packages: Vec<PackageInfo>,
    /// Platform components whose manifests the image holds (names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platform: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Kernel {
    pub package: String,
    pub version: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct K3sInfo {
    pub version: String,
    pub sha256: String,
    pub source: String,
    /// Air-gap image tarballs in /var/lib/rancher/k3s/agent/images/.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub airgap_images: Vec<AirgapInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AirgapInfo {
    /// File name in /var/lib/rancher/k3s/agent/images/.
    pub name: String,
    pub sha256: String,
    /// A URL or a local path.
    pub source: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Artifact {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PackageInfo {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub sha256: String,
    pub size: u64,
}

impl Manifest {
    /// Reads `<dir>/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest, LoadError> {
        let path = dir.join(FILE_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LoadError::Missing(path))
            }
            Err(e) => return Err(LoadError::Read(path, e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| LoadError::Parse(path, e))
    }

    /// Writes `<dir>/manifest.json` (pretty, with a final newline).
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        let json = serde_json::to_vec_pretty(self).context("serialising manifest.json")?;
        std::fs::write(dir.join(FILE_NAME), [json.as_slice(), b"\n"].concat())
            .context("writing manifest.json")
    }

    pub fn artifact(&self, name: &str) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.name == name)
    }
}
