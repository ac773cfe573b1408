//! `kiln inspect`: what an image directory holds, checked against its manifest.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::manifest::Manifest;

/// An artifact's state on disk compared with the manifest.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    Ok,
    Missing,
    Mismatch { sha256: String, size: u64 },
}

pub struct Inspection {
    pub manifest: Manifest,
    pub checks: Vec<(String, Check)>,
}

impl Inspection {
    pub fn all_ok(&self) -> bool {
        self.checks.iter().all(|(_, c)| *c == Check::Ok)
    }
}

/// Reads `<dir>/manifest.json` and re-hashes every artifact it lists.
pub fn inspect(dir: &Path) -> Result<Inspection> {
    let manifest = Manifest::load(dir)?;
    let mut checks = Vec::new();
    for a in &manifest.artifacts {
        let p = dir.join(&a.name);
        let check = if !p.exists() {
            Check::Missing
        } else {
            let (sha256, size) = crate::hash_file(&p)?;
            if sha256 == a.sha256 && size == a.size {
                Check::Ok
            } else {
                Check::Mismatch { sha256, size }
            }
        };
        checks.push((a.name.clone(), check));
    }
    Ok(Inspection { manifest, checks })
}

/// A human-readable report.
pub fn render(i: &Inspection) -> String {
    let m = &i.manifest;
    let mut s = String::new();
    let _ = writeln!(s, "image       {} ({})", m.name, m.arch);
    let _ = writeln!(s, "kernel      {} ({})", m.kernel.version, m.kernel.package);
    match &m.k3s {
        Some(k) => {
            let _ = writeln!(s, "k3s         {} sha256 {}", k.version, k.sha256);
        }
        None => {
            let _ = writeln!(s, "k3s         none");
        }
    }
    let _ = writeln!(s, "spec        sha256 {}", m.spec_sha256);
    let _ = writeln!(
        s,
        "built by    kiln {}, SOURCE_DATE_EPOCH={}",
        m.kiln_version, m.source_date_epoch
    );
    let _ = writeln!(s, "artifacts");
    for (a, (_, check)) in m.artifacts.iter().zip(&i.checks) {
        let state = match check {
            Check::Ok => "ok".to_string(),
            Check::Missing => "MISSING".to_string(),
            Check::Mismatch { sha256, size } => {
                format!("MISMATCH (on disk: {size} bytes, sha256 {sha256})")
            }
        };
        let _ = writeln!(s, "  {:<18} {:>11} {}  {}", a.name, a.size, a.sha256, state);
    }
    let _ = writeln!(s, "packages ({})", m.packages.len());
    for p in &m.packages {
        let _ = writeln!(s, "  {:<40} {:<28} {}", p.name, p.version, p.architecture);
    }
    s
}
