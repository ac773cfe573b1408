//! Debian repository client: mirrors, signed InRelease, Packages indexes, a
//! universe of packages across repositories, dependency resolution, and
//! verified .deb downloads (DESIGN.md, "Sources").
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use kiln_builder::{cache::Cache, debian, fetch::Fetcher, spec};
//! let fetcher = Fetcher::new(Cache::from_env()?, false)?;
//! let sources = debian::sources_for_suites(
//!     &["trixie".into(), "trixie-security".into()],
//!     &["main".into()],
//!     spec::DEFAULT_KEYRING.as_ref(),
//! )?;
//! let universe = debian::Universe::load(&fetcher, &sources, spec::Arch::X86_64.debian())?;
//! let packages = universe.resolve(&["busybox-static".into()], &[])?;
//! for (package, deb) in debian::download(&fetcher, &packages)? {
//!     println!("{} {} -> {}", package.name, package.version, deb.display());
//! }
//! # Ok(())
//! # }
//! ```

pub mod index;
pub mod mirror;
pub mod relation;
pub mod release;
pub mod resolve;
pub mod version;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use tracing::{debug, info};

use crate::fetch::{FetchItem, Fetcher};

pub use index::Package;
pub use mirror::DebianMirrors;
pub use release::{IndexFile, Keyring, Release};
pub use version::Version;

/// One Debian-format repository: a base URL (the directory holding `dists/`
/// and `pool/`), the suites and components to read, and the keyring that
/// signs its InRelease files. Debian's main and security archives are two of
/// these; other vendors' repositories (e.g. Raspberry Pi's) are more.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepoSource {
    pub url: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    pub keyring: PathBuf,
}

/// Repository sources for Debian suites on the host's mirrors (see
/// `mirror`): `*-security` suites come from the security mirror, all others
/// from the main mirror. Components and keyring are shared.
pub fn sources_for_suites(
    suites: &[String],
    components: &[String],
    keyring: &Path,
) -> Result<Vec<RepoSource>> {
    let mirrors = DebianMirrors::from_host().context("finding the Debian mirror")?;
    sources_for_suites_on(&mirrors, suites, components, keyring)
}

/// Like `sources_for_suites`, with the mirrors given (pure).
pub fn sources_for_suites_on(
    mirrors: &DebianMirrors,
    suites: &[String],
    components: &[String],
    keyring: &Path,
) -> Result<Vec<RepoSource>> {
    let mut out: Vec<RepoSource> = Vec::new();
    for suite in suites {
        let url = mirrors.for_suite(suite)?.to_string();
        match out.iter_mut().find(|s| s.url == url) {
            Some(source) => source.suites.push(suite.clone()),
            None => out.push(RepoSource {
                url,
                suites: vec![suite.clone()],
                components: components.to_vec(),
                keyring: keyring.to_path_buf(),
            }),
        }
    }
    Ok(out)
}

/// All packages available for one architecture across the configured
/// repositories; for a name listed several times the highest version wins
/// (on equal versions, the first source in order).
#[derive(Clone, Debug, Default)]
pub struct Universe {
    arch: String,
    packages: BTreeMap<String, Package>,
    /// Virtual name -> (providing package, provided version if versioned).
    providers: BTreeMap<String, Vec<(String, Option<Version>)>>,
}

/// One Packages index to fetch and read.
#[derive(Debug)]
struct IndexJob {
    repo: String,
    suite: String,
    item: FetchItem,
    path: String,
}

/// The Packages indexes of the configured suites, located (with their
/// sha256) through verified InRelease files but not yet fetched.
#[derive(Debug)]
pub struct Indexes {
    arch: String,
    jobs: Vec<IndexJob>,
}

impl Indexes {
    /// Fetches and verifies InRelease of every suite of every source and
    /// lists the Packages index of every component for `debian_arch`.
    pub fn locate(fetcher: &Fetcher, sources: &[RepoSource], debian_arch: &str) -> Result<Indexes> {
        let mut keyrings = release::KeyringCache::default();
        let mut jobs = Vec::new();
        for source in sources {
            let base = source.url.trim_end_matches('/');
            let keyring = keyrings
                .get(&source.keyring)
                .with_context(|| format!("loading the keyring for {base}"))?;
            for suite in &source.suites {
                let release = load_release(fetcher, base, suite, &keyring)?;
                let dist = format!("{base}/dists/{suite}");
                for component in &source.components {
                    let files = index_files(&release, component, debian_arch).with_context(|| {
                        format!("finding the Packages index of {suite} {component} ({dist}/InRelease)")
                    })?;
                    for (path, file) in files {
                        // By hash when the Release offers it, falling back to the
                        // plain path if a mirror lacks the by-hash copy.
                        let url = release.index_url(&dist, &path, &file);
                        let plain = format!("{dist}/{path}");
                        let alternates = if url == plain {
                            Vec::new()
                        } else {
                            vec![plain]
                        };
                        jobs.push(IndexJob {
                            repo: base.to_string(),
                            suite: suite.clone(),
                            item: FetchItem {
                                url,
                                sha256: file.sha256,
                                size: Some(file.size),
                                what: format!("Packages index {path} of {suite}"),
                                alternates,
                            },
                            path,
                        });
                    }
                }
            }
        }

        Ok(Indexes {
            arch: debian_arch.to_string(),
            jobs,
        })
    }

    /// Identifies the package universe: the arch and every index's sha256,
    /// repository and suite, in order. Equal fingerprints, equal universes.
    pub fn fingerprint(&self) -> String {
        let mut text = format!("arch {}\n", self.arch);
        for j in &self.jobs {
            text.push_str(&format!(
                "{} {} {} {}\n",
                j.repo, j.suite, j.path, j.item.sha256
            ));
        }
        crate::sha256_hex(text.as_bytes())
    }

    /// The dependency closure of `wanted`, remembered per package universe: the
    /// key is the sha256 of every (signature-verified) index plus the request, so
    /// a rebuild against unchanged suites skips reading the indexes. The cache
    /// lives beside the downloads, in the same trust domain; every .deb is still
    /// checked against the sha256 recorded here.
    pub fn resolve_cached(
        &self,
        fetcher: &Fetcher,
        wanted: &[String],
        exclude: &[String],
    ) -> Result<Vec<Package>> {
        let key = crate::sha256_hex(
            format!(
                "kiln {}\nuniverse {}\nwanted {wanted:?}\nexclude {exclude:?}\n",
                env!("CARGO_PKG_VERSION"),
                self.fingerprint()
            )
            .as_bytes(),
        );
        let path = fetcher
            .cache()
            .root()
            .join("closures")
            .join(format!("{key}.json"));
        if let Ok(bytes) = std::fs::read(&path) {
            match serde_json::from_slice::<Vec<Package>>(&bytes) {
                Ok(closure) => {
                    info!(
                        packages = closure.len(),
                        "package closure unchanged (indexes unchanged)"
                    );
                    return Ok(closure);
                }
                Err(e) => {
                    tracing::warn!("ignoring the damaged closure cache {}: {e}", path.display())
                }
            }
        }
        let universe = self
            .load(fetcher)
            .context("loading the Debian package indexes")?;
        let closure = universe
            .resolve(wanted, exclude)
            .context("resolving the package closure")?;
        info!(packages = closure.len(), "package closure resolved");
        if let Err(e) = crate::write_atomically(&path, &serde_json::to_vec(&closure)?) {
            tracing::warn!(
                "could not cache the package closure in {}: {e:#}",
                path.display()
            );
        }
        Ok(closure)
    }

    /// Fetches (or takes from the cache) and reads every index, and merges them.
    pub fn load(&self, fetcher: &Fetcher) -> Result<Universe> {
        let started = Instant::now();
        let (jobs, debian_arch) = (&self.jobs, self.arch.as_str());
        let items: Vec<FetchItem> = jobs.iter().map(|j| j.item.clone()).collect();
        let paths = fetcher.fetch_many(&items)?;
        let lists: Vec<Vec<Package>> = jobs
            .par_iter()
            .zip(paths.par_iter())
            .map(|(job, path)| {
                read_index(path, job, debian_arch).with_context(|| {
                    format!(
                        "reading Packages index {} of {} ({})",
                        job.path, job.suite, job.item.url
                    )
                })
            })
            .collect::<Result<_>>()?;
        let count: usize = lists.iter().map(Vec::len).sum();
        let universe = Universe::from_packages(debian_arch, lists.into_iter().flatten());
        info!(
            indexes = jobs.len(),
            entries = count,
            packages = universe.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "loaded package indexes"
        );
        Ok(universe)
    }
}

impl Universe {
    /// Fetches and verifies InRelease of every suite of every source, then the
    /// Packages indexes of every component for `debian_arch`, and merges them.
    pub fn load(fetcher: &Fetcher, sources: &[RepoSource], debian_arch: &str) -> Result<Universe> {
        Indexes::locate(fetcher, sources, debian_arch)?.load(fetcher)
    }

    /// A universe from packages in priority order (for tests and custom sources).
    pub fn from_packages(
        debian_arch: &str,
        packages: impl IntoIterator<Item = Package>,
    ) -> Universe {
        let mut map: BTreeMap<String, Package> = BTreeMap::new();
        for pkg in packages {
            match map.get(&pkg.name) {
                Some(existing) if existing.version >= pkg.version => {}
                _ => {
                    map.insert(pkg.name.clone(), pkg);
                }
            }
        }
        let mut providers: BTreeMap<String, Vec<(String, Option<Version>)>> = BTreeMap::new();
        for pkg in map.values() {
            for p in &pkg.provides {
                let version = p.constraint.as_ref().map(|(_, v)| v.clone());
                providers
                    .entry(p.name.clone())
                    .or_default()
                    .push((pkg.name.clone(), version));
            }
        }
        Universe {
            arch: debian_arch.to_string(),
            packages: map,
            providers,
        }
    }

    /// The package named `name` (not virtual names).
    pub fn get(&self, name: &str) -> Option<&Package> {
        self.packages.get(name)
    }

    /// Packages providing the virtual name `name`, with the provided version if any.
    pub fn providers(&self, name: &str) -> &[(String, Option<Version>)] {
        self.providers.get(name).map_or(&[], Vec::as_slice)
    }

    /// All packages, sorted by name.
    pub fn packages(&self) -> impl Iterator<Item = &Package> {
        self.packages.values()
    }

    pub fn len(&self) -> usize {
        self.packages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packages.is_empty()
    }

    /// The Debian architecture the universe was loaded for.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The dependency closure of `wanted` (see `resolve::resolve`), sorted by name.
    pub fn resolve(&self, wanted: &[String], exclude: &[String]) -> Result<Vec<Package>> {
        resolve::resolve(self, wanted, exclude)
    }
}

/// Fetches InRelease of `suite` under `base`, verifies it with `keyring` and parses it.
fn load_release(fetcher: &Fetcher, base: &str, suite: &str, keyring: &Keyring) -> Result<Release> {
    let url = format!("{base}/dists/{suite}/InRelease");
    let bytes = fetcher.fetch_signed_document(&url, &format!("InRelease of {suite}"))?;
    let text = release::verify_inrelease(&bytes, keyring)
        .with_context(|| format!("verifying InRelease of {suite} ({url})"))?;
    let release = release::parse_release(&text)
        .with_context(|| format!("parsing InRelease of {suite} ({url})"))?;
    release
        .check_suite(suite)
        .with_context(|| format!("checking InRelease of {suite} ({url})"))?;
    let strict = !fetcher.is_offline() && !release::allow_expired_from_env();
    release
        .check_valid_until(SystemTime::now(), strict)
        .with_context(|| format!("checking InRelease of {suite} ({url})"))?;
    debug!(%url, files = release.sha256.len(), "verified InRelease");
    Ok(release)
}

/// The Packages indexes to read for one component: `binary-<arch>`, plus
/// `binary-all` when, as apt does, the Release lists `all` among its
/// Architectures and does not say (`No-Support-for-Architecture-all:
/// Packages`) that arch `all` packages are in each architecture's index.
/// Prefers `.xz`, then `.gz`, then plain.
pub fn index_files(
    release: &Release,
    component: &str,
    debian_arch: &str,
) -> Result<Vec<(String, IndexFile)>> {
    let pick = |dir: &str| -> Option<(String, IndexFile)> {
        ["Packages.xz", "Packages.gz", "Packages"]
            .iter()
            .find_map(|name| {
                let path = format!("{component}/{dir}/{name}");
                release.sha256.get(&path).map(|f| (path, f.clone()))
            })
    };
    let mut out = Vec::new();
    match pick(&format!("binary-{debian_arch}")) {
        Some(f) => out.push(f),
        None => bail!(
            "it lists no Packages index for component {component} and architecture {debian_arch} \
             (components: {}; architectures: {})",
            release.components.join(" "),
            release.architectures.join(" ")
        ),
    }
    if release.architectures.iter().any(|a| a == "all") && !release.no_arch_all_index {
        out.extend(pick("binary-all"));
    }
    Ok(out)
}

fn read_index(path: &Path, job: &IndexJob, debian_arch: &str) -> Result<Vec<Package>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = index::decompress(&job.path, &data)?;
    let text = String::from_utf8_lossy(&text);
    index::parse_packages(&text, &job.repo, &job.suite, debian_arch)
}

/// Downloads the .deb of each package into the cache, verified by SHA256 and
/// Size from the (signed) index; returns each package with its cached file.
pub fn download(fetcher: &Fetcher, pkgs: &[Package]) -> Result<Vec<(Package, PathBuf)>> {
    let items: Vec<FetchItem> = pkgs
        .iter()
        .map(|p| FetchItem {
            url: p.url(),
            sha256: p.sha256.clone(),
            size: Some(p.size),
            what: format!("package {} {}", p.name, p.version),
            alternates: Vec::new(),
        })
        .collect();
    let paths = fetcher.fetch_many(&items)?;
    Ok(pkgs.iter().cloned().zip(paths).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        use crate::spec::Arch;
        assert_eq!(Arch::X86_64.debian(), "amd64");
        assert_eq!(Arch::Aarch64.debian(), "arm64");
    }

    #[test]
    fn suites_map_to_mirrors() {
        let mirrors = DebianMirrors {
            main: Some("http://mirror.example/debian".into()),
            security: Some("http://mirror.example/debian-security".into()),
        };
        let suites: Vec<String> = [
            "trixie",
            "trixie-updates",
            "trixie-security",
            "trixie-backports",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let got = sources_for_suites_on(&mirrors, &suites, &["main".into()], Path::new("/k.gpg"))
            .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].url, "http://mirror.example/debian");
        assert_eq!(
            got[0].suites,
            ["trixie", "trixie-updates", "trixie-backports"]
        );
        assert_eq!(got[1].url, "http://mirror.example/debian-security");
        assert_eq!(got[1].suites, ["trixie-security"]);
        let no_security = DebianMirrors {
            security: None,
            ..mirrors
        };
        let err = sources_for_suites_on(&no_security, &suites, &[], Path::new("/k")).unwrap_err();
        assert!(
            format!("{err:#}").contains(mirror::SECURITY_MIRROR_ENV),
            "{err:#}"
        );
    }

    #[test]
    fn index_selection() {
        let text = format!(
            "Components: main\nArchitectures: all amd64\nSHA256:\n {h} 10 main/binary-amd64/Packages\n {h} 5 main/binary-amd64/Packages.gz\n {h} 4 main/binary-all/Packages.xz\n",
            h = "b".repeat(64)
        );
        let r = release::parse_release(&text).unwrap();
        let files = index_files(&r, "main", "amd64").unwrap();
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "main/binary-amd64/Packages.gz",
                "main/binary-all/Packages.xz"
            ]
        );
        let folded = Release {
            no_arch_all_index: true,
            ..r.clone()
        };
        assert_eq!(index_files(&folded, "main", "amd64").unwrap().len(), 1);
        let no_all = Release {
            architectures: vec!["amd64".into()],
            ..r.clone()
        };
        assert_eq!(index_files(&no_all, "main", "amd64").unwrap().len(), 1);
        let err = index_files(&r, "contrib", "amd64").unwrap_err().to_string();
        assert!(err.contains("component contrib"), "{err}");
        assert!(index_files(&r, "main", "arm64").is_err());
    }
}
