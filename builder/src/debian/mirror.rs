//! Which Debian mirror to use, from the environment or the host's apt sources.
//!
//! No mirror is built in: `KILN_DEBIAN_MIRROR` (and `KILN_DEBIAN_SECURITY_MIRROR`
//! for `*-security` suites) win; otherwise the URIs come from the host's
//! `/etc/apt/sources.list` and `/etc/apt/sources.list.d/*.{list,sources}`.
//! Parsing is a pure function of the files' contents; `DebianMirrors::from_host`
//! is the thin layer that reads them.

use std::path::Path;

use anyhow::{anyhow, Context, Result};

use super::index::parse_paragraphs;

pub const MIRROR_ENV: &str = "KILN_DEBIAN_MIRROR";
pub const SECURITY_MIRROR_ENV: &str = "KILN_DEBIAN_SECURITY_MIRROR";

/// One apt source entry (either file format).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AptEntry {
    pub types: Vec<String>,
    pub uris: Vec<String>,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    pub signed_by: Option<String>,
}

/// Parses the one-line format: `deb [opt=val ...] URI suite [component ...]`.
pub fn parse_one_line_sources(text: &str) -> Vec<AptEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut rest = line;
        let Some(kind) = next_word(&mut rest) else {
            continue;
        };
        let mut signed_by = None;
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('[') {
            let Some(close) = after.find(']') else {
                continue; // malformed; apt would reject it too
            };
            for opt in after[..close].split_whitespace() {
                if let Some(v) = opt.strip_prefix("signed-by=") {
                    signed_by = Some(v.to_string());
                }
            }
            rest = &after[close + 1..];
        }
        let words: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
        if words.len() < 2 {
            continue;
        }
        out.push(AptEntry {
            types: vec![kind.to_string()],
            uris: vec![words[0].clone()],
            suites: vec![words[1].clone()],
            components: words[2..].to_vec(),
            signed_by,
        });
    }
    out
}

fn next_word<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let s = rest.trim_start();
    if s.is_empty() {
        return None;
    }
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    *rest = &s[end..];
    Some(&s[..end])
}

/// Parses the deb822 format (`*.sources`); entries with `Enabled: no` are skipped.
pub fn parse_deb822_sources(text: &str) -> Vec<AptEntry> {
    let Ok(paragraphs) = parse_paragraphs(text) else {
        return Vec::new();
    };
    let list = |v: Option<std::borrow::Cow<'_, str>>| -> Vec<String> {
        v.map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    paragraphs
        .iter()
        .filter(|p| {
            !p.get("Enabled")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("no"))
        })
        .map(|p| AptEntry {
            types: list(p.get("Types")),
            uris: list(p.get("URIs")),
            suites: list(p.get("Suites")),
            components: list(p.get("Components")),
            signed_by: p.get("Signed-By").map(|v| v.into_owned()),
        })
        .collect()
}

/// Parses apt source files given as (file name, contents), in the given order.
/// `*.list` files (and `sources.list`) use the one-line format, `*.sources`
/// deb822; anything else, including `*.disabled*` files, is ignored.
pub fn parse_apt_files(files: &[(String, String)]) -> Vec<AptEntry> {
    let mut out = Vec::new();
    for (name, text) in files {
        let base = name.rsplit('/').next().unwrap_or(name);
        if base.contains(".disabled") {
            continue;
        }
        if base.ends_with(".list") {
            out.extend(parse_one_line_sources(text));
        } else if base.ends_with(".sources") {
            out.extend(parse_deb822_sources(text));
        }
    }
    out
}

/// Debian codenames and aliases, to tell Debian's entries from third-party ones.
const DEBIAN_SUITES: &[&str] = &[
    "stable",
    "oldstable",
    "oldoldstable",
    "testing",
    "unstable",
    "sid",
    "experimental",
    "jessie",
    "stretch",
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
];

fn is_security_suite(suite: &str) -> bool {
    suite.ends_with("-security") || suite.ends_with("/updates")
}

/// Whether an entry looks like Debian's own archive: a known codename (with
/// any `-updates`, `-backports`, ... suffix) or signed by Debian's archive keyring.
fn is_debian_entry(entry: &AptEntry, suite: &str) -> bool {
    let base = suite.split(['-', '/']).next().unwrap_or(suite);
    DEBIAN_SUITES.contains(&base)
        || entry
            .signed_by
            .as_deref()
            .is_some_and(|s| s.contains("debian-archive-keyring"))
}

fn usable_uri(uri: &str) -> bool {
    ["http://", "https://", "file://"]
        .iter()
        .any(|scheme| uri.starts_with(scheme))
}

/// The main and security mirror base URLs (without trailing `/`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DebianMirrors {
    pub main: Option<String>,
    pub security: Option<String>,
}

impl DebianMirrors {
    /// Chooses mirrors from environment values and apt source files (pure).
    /// The first `deb` entry with a non-security Debian suite gives the main
    /// mirror, the first with a `*-security` suite the security mirror.
    pub fn from_config(
        env_main: Option<&str>,
        env_security: Option<&str>,
        apt_files: &[(String, String)],
    ) -> DebianMirrors {
        let clean = |s: &str| s.trim().trim_end_matches('/').to_string();
        let env_main = env_main.filter(|s| !s.trim().is_empty()).map(clean);
        let env_security = env_security.filter(|s| !s.trim().is_empty()).map(clean);
        let mut main = None;
        let mut security = None;
        for entry in parse_apt_files(apt_files) {
            if !entry.types.iter().any(|t| t == "deb") {
                continue;
            }
            let Some(uri) = entry.uris.iter().find(|u| usable_uri(u)) else {
                continue;
            };
            for suite in &entry.suites {
                if !is_debian_entry(&entry, suite) {
                    continue;
                }
                let slot = if is_security_suite(suite) {
                    &mut security
                } else {
                    &mut main
                };
                if slot.is_none() {
                    *slot = Some(clean(uri));
                }
            }
        }
        DebianMirrors {
            main: env_main.or(main),
            security: env_security.or(security),
        }
    }

    /// Mirrors from `KILN_DEBIAN_MIRROR`, `KILN_DEBIAN_SECURITY_MIRROR` and `/etc/apt`.
    pub fn from_host() -> Result<DebianMirrors> {
        let files = read_apt_files(Path::new("/etc/apt"))?;
        let env = |name: &str| std::env::var(name).ok();
        Ok(DebianMirrors::from_config(
            env(MIRROR_ENV).as_deref(),
            env(SECURITY_MIRROR_ENV).as_deref(),
            &files,
        ))
    }

    /// The main mirror, or an error that says what to set.
    pub fn main(&self) -> Result<&str> {
        self.main.as_deref().ok_or_else(|| {
            anyhow!(
                "no Debian mirror configured: set {MIRROR_ENV} to the base URL of a Debian \
                 mirror (the directory that contains dists/ and pool/), or add a deb entry for \
                 a Debian suite to /etc/apt/sources.list or /etc/apt/sources.list.d/"
            )
        })
    }

    /// The security mirror, or an error that says what to set.
    pub fn security(&self) -> Result<&str> {
        self.security.as_deref().ok_or_else(|| {
            anyhow!(
                "no Debian security mirror configured: set {SECURITY_MIRROR_ENV} to the base \
                 URL of the Debian security archive (the directory that contains dists/), or \
                 add a deb entry for a *-security suite to /etc/apt/sources.list.d/"
            )
        })
    }

    /// The mirror serving `suite`: the security mirror for `*-security`, else the main one.
    pub fn for_suite(&self, suite: &str) -> Result<&str> {
        if is_security_suite(suite) {
            self.security()
                .with_context(|| format!("suite {suite} is served by the security archive"))
        } else {
            self.main()
        }
    }
}

/// Reads `sources.list` and `sources.list.d/*` under an apt configuration
/// directory, sorted by name like apt does. Missing files are not an error.
pub fn read_apt_files(etc_apt: &Path) -> Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    let main = etc_apt.join("sources.list");
    if main.is_file() {
        let text = std::fs::read_to_string(&main)
            .with_context(|| format!("reading {}", main.display()))?;
        files.push((main.display().to_string(), text));
    }
    let dir = etc_apt.join("sources.list.d");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let name = path.display().to_string();
            let wanted = (name.ends_with(".list") || name.ends_with(".sources"))
                && !name.contains(".disabled");
            if wanted && path.is_file() {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                files.push((name, text));
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }

    const DEB822: &str = "\
Types: deb deb-src
# a comment
URIs: http://mirror.example/debian/
Suites: trixie trixie-updates
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.mirror.example/debian-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

    #[test]
    fn deb822_main_and_security() {
        let m = DebianMirrors::from_config(None, None, &files(&[("d/debian.sources", DEB822)]));
        assert_eq!(m.main.as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(
            m.security.as_deref(),
            Some("http://security.mirror.example/debian-security")
        );
        assert_eq!(
            m.for_suite("trixie-updates").unwrap(),
            "http://mirror.example/debian"
        );
        assert_eq!(
            m.for_suite("trixie-security").unwrap(),
            "http://security.mirror.example/debian-security"
        );
        let entries = parse_deb822_sources(DEB822);
        assert_eq!(entries[0].types, ["deb", "deb-src"]);
        assert_eq!(entries[0].components, ["main", "non-free-firmware"]);
    }

    #[test]
    fn one_line_format() {
        let text = "\
# deb http://commented.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bookworm main contrib
deb-src http://src.example/debian bookworm main
deb http://mirror.example/debian-security bookworm-security main # trailing comment
";
        let entries = parse_one_line_sources(text);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].components, ["main", "contrib"]);
        assert_eq!(
            entries[0].signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
        let m = DebianMirrors::from_config(None, None, &files(&[("/etc/apt/sources.list", text)]));
        assert_eq!(m.main.as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(
            m.security.as_deref(),
            Some("http://mirror.example/debian-security")
        );
    }

    #[test]
    fn third_party_disabled_and_deb_src_are_ignored() {
        let third_party = "\
Types: deb
URIs: https://vendor.example/node
Suites: nodistro
Components: main
";
        let disabled = "\
Types: deb
URIs: http://disabled.example/debian
Suites: trixie
Components: main
Enabled: no
";
        let m = DebianMirrors::from_config(
            None,
            None,
            &files(&[
                ("a/vendor.sources", third_party),
                ("a/old.sources", disabled),
                (
                    "a/x.list.disabled-by-admin",
                    "deb http://x.example/debian trixie main",
                ),
                (
                    "a/src.list",
                    "deb-src http://src.example/debian trixie main",
                ),
                ("a/cdrom.list", "deb cdrom:[Debian]/ trixie main"),
                ("a/z.list", "deb http://real.example/debian trixie main"),
            ]),
        );
        assert_eq!(m.main.as_deref(), Some("http://real.example/debian"));
        assert_eq!(m.security, None);
        let err = m.security().unwrap_err().to_string();
        assert!(err.contains(SECURITY_MIRROR_ENV), "{err}");
        let err = m.for_suite("trixie-security").unwrap_err();
        assert!(format!("{err:#}").contains(SECURITY_MIRROR_ENV), "{err:#}");
    }

    #[test]
    fn environment_wins_and_nothing_found_says_what_to_set() {
        let m = DebianMirrors::from_config(
            Some("http://env.example/debian/"),
            Some(" "),
            &files(&[("x.sources", DEB822)]),
        );
        assert_eq!(m.main.as_deref(), Some("http://env.example/debian"));
        assert_eq!(
            m.security.as_deref(),
            Some("http://security.mirror.example/debian-security"),
            "a blank variable counts as unset"
        );
        let none = DebianMirrors::from_config(None, None, &[]);
        let err = none.main().unwrap_err().to_string();
        assert!(err.contains(MIRROR_ENV), "{err}");
    }

    #[test]
    fn keyring_marks_unknown_codenames_as_debian() {
        let text = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://m.example/debian futurename main";
        let m = DebianMirrors::from_config(None, None, &files(&[("s.list", text)]));
        assert_eq!(m.main.as_deref(), Some("http://m.example/debian"));
    }

    #[test]
    fn reads_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        std::fs::write(dir.path().join("sources.list.d/debian.sources"), DEB822).unwrap();
        std::fs::write(
            dir.path().join("sources.list.d/a.list.disabled"),
            "deb http://no.example/debian trixie main",
        )
        .unwrap();
        let read = read_apt_files(dir.path()).unwrap();
        assert_eq!(read.len(), 1);
        let m = DebianMirrors::from_config(None, None, &read);
        assert_eq!(m.main.as_deref(), Some("http://mirror.example/debian"));
    }
}
