//! InRelease: the cleartext-signed index of a suite, and the keyrings that verify it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use pgp::composed::{CleartextSignedMessage, Deserializable, SignedPublicKey, SignedPublicSubKey};
use pgp::packet::Signature;
use pgp::types::KeyDetails;
use tracing::debug;

use super::index::parse_paragraphs;

/// Set to `1` to accept an InRelease whose `Valid-Until` has passed, e.g. when
/// building from a snapshot mirror. Without it an expired InRelease fetched
/// online is an error (it protects against a mirror replaying old, vulnerable
/// indexes). Offline builds only warn: they reuse what an earlier online build
/// fetched and verified, and the replay threat does not apply to the local cache.
pub const ALLOW_EXPIRED_ENV: &str = "KILN_ALLOW_EXPIRED_RELEASE";

/// One key that may have made a signature: a primary key or a signing subkey.
enum VerifyKey {
    Primary(SignedPublicKey),
    Subkey(SignedPublicSubKey),
}

impl VerifyKey {
    fn verify(&self, sig: &Signature, data: &[u8]) -> pgp::errors::Result<()> {
        match self {
            VerifyKey::Primary(k) => sig.verify(k, data),
            VerifyKey::Subkey(k) => sig.verify(k, data),
        }
    }

    fn fingerprint(&self) -> String {
        match self {
            VerifyKey::Primary(k) => format!("{:X}", k.fingerprint()),
            VerifyKey::Subkey(k) => format!("{:X}", k.fingerprint()),
        }
    }

    /// Whether `sig` names this key as its issuer (a signature naming no
    /// issuer could be by any key).
    fn may_have_made(&self, sig: &Signature) -> bool {
        let (fp, id) = match self {
            VerifyKey::Primary(k) => (k.fingerprint(), k.legacy_key_id()),
            VerifyKey::Subkey(k) => (k.fingerprint(), k.legacy_key_id()),
        };
        let fps = sig.issuer_fingerprint();
        let ids = sig.issuer_key_id();
        (fps.is_empty() && ids.is_empty()) || fps.contains(&&fp) || ids.contains(&&id)
    }
}

/// The keys trusted to sign a repository's InRelease.
///
/// Keys are taken as configured: the keyring file is the trust anchor. Revoked
/// primary keys are skipped; subkeys count only if their binding signature
/// verifies and marks them for signing. Key expiry is not checked (Debian's
/// keyring package removes keys when they are retired).
pub struct Keyring {
    label: String,
    keys: Vec<VerifyKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("label", &self.label)
            .field(
                "keys",
                &self
                    .keys
                    .iter()
                    .map(VerifyKey::fingerprint)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keyring {
    /// Loads a keyring file: binary OpenPGP keys (several concatenated, as in
    /// `/usr/share/keyrings/*.gpg`) or ASCII-armored ones.
    pub fn load(path: &Path) -> Result<Keyring> {
        let bytes =
            std::fs::read(path).with_context(|| format!("reading keyring {}", path.display()))?;
        Keyring::from_bytes(&bytes, &path.display().to_string())
            .with_context(|| format!("loading keyring {}", path.display()))
    }

    /// Parses keyring bytes; `label` names the keyring in messages.
    pub fn from_bytes(bytes: &[u8], label: &str) -> Result<Keyring> {
        let mut public_keys = Vec::new();
        let trimmed = bytes.trim_ascii_start();
        if trimmed.starts_with(b"-----BEGIN") {
            let text = std::str::from_utf8(trimmed).context("armored keyring is not UTF-8")?;
            // Several armored blocks may be concatenated; each holds one or more keys.
            let marker = "-----BEGIN PGP PUBLIC KEY BLOCK-----";
            for (n, block) in text.match_indices(marker).enumerate() {
                let start = block.0;
                let end = text[start + marker.len()..]
                    .find(marker)
                    .map_or(text.len(), |e| start + marker.len() + e);
                let (keys, _) = SignedPublicKey::from_armor_many(&text.as_bytes()[start..end])
                    .with_context(|| format!("parsing armored key block {}", n + 1))?;
                for key in keys {
                    match key {
                        Ok(k) => public_keys.push(k),
                        Err(e) => debug!("skipping unreadable key in {label}: {e}"),
                    }
                }
            }
        } else {
            for key in SignedPublicKey::from_bytes_many(bytes).context("parsing OpenPGP keys")? {
                match key {
                    Ok(k) => public_keys.push(k),
                    Err(e) => debug!("skipping unreadable key in {label}: {e}"),
                }
            }
        }

        let mut keys = Vec::new();
        for key in public_keys {
            if !key.details.revocation_signatures.is_empty() {
                debug!("skipping revoked key {:X} in {label}", key.fingerprint());
                continue;
            }
            for sub in &key.public_subkeys {
                let signing = sub
                    .signatures
                    .iter()
                    .max_by_key(|s| s.created().map(|t| t.as_secs()))
                    .is_some_and(|s| s.key_flags().sign());
                if !signing {
                    continue;
                }
                match sub.verify_bindings(&key.primary_key) {
                    Ok(()) => keys.push(VerifyKey::Subkey(sub.clone())),
                    Err(e) => debug!(
                        "skipping subkey {:X} in {label}: its binding does not verify: {e}",
                        sub.fingerprint()
                    ),
                }
            }
            keys.push(VerifyKey::Primary(key));
        }
        if keys.is_empty() {
            bail!("no usable OpenPGP public key in {label}");
        }
        Ok(Keyring {
            label: label.to_string(),
            keys,
        })
    }

    /// Fingerprints (upper-case hex) of the primary keys and signing subkeys.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys.iter().map(VerifyKey::fingerprint).collect()
    }

    pub fn label(&self) -> &str {
        &self.label
    }
}

/// Checks the cleartext signature of an InRelease document and returns the
/// signed text (dash-unescaped). At least one signature must verify with a key
/// of the keyring; signatures by unknown keys are ignored.
pub fn verify_inrelease(bytes: &[u8], keyring: &Keyring) -> Result<String> {
    let (msg, _) = CleartextSignedMessage::from_armor(bytes)
        .map_err(|e| anyhow!("not a valid cleartext-signed OpenPGP document: {e}"))?;
    let signed = msg.signed_text();
    let mut problems = Vec::new();
    for sig in msg.signatures() {
        let issuer = sig
            .issuer_fingerprint()
            .first()
            .map(|f| format!("{:X}", f))
            .or_else(|| {
                sig.issuer_key_id()
                    .first()
                    .map(|k| k.to_string().to_uppercase())
            })
            .unwrap_or_else(|| "an unnamed key".to_string());
        let mut candidates = keyring
            .keys
            .iter()
            .filter(|k| k.may_have_made(sig))
            .peekable();
        if candidates.peek().is_none() {
            problems.push(format!("signature by {issuer}: key not in the keyring"));
        }
        for key in candidates {
            match key.verify(sig, signed.as_bytes()) {
                Ok(()) => {
                    debug!(key = %key.fingerprint(), "InRelease signature verified");
                    return Ok(signed.replace("\r\n", "\n"));
                }
                Err(e) => {
                    debug!("signature by {issuer} does not verify: {e:?}");
                    problems.push(format!(
                        "signature by {issuer} does not verify: {}",
                        verify_error_text(&e.to_string())
                    ));
                }
            }
        }
    }
    if msg.signatures().is_empty() {
        problems.push("the document carries no signature".to_string());
    }
    bail!(
        "no signature made by a key in {} ({})",
        keyring.label,
        problems.join("; ")
    )
}

/// A one-line reason from an rPGP verification error (whose text may carry
/// a multi-line assertion dump).
fn verify_error_text(e: &str) -> String {
    if e.contains("invalid signed hash value") {
        return "the signed text does not match the signature".to_string();
    }
    let last = e.lines().last().unwrap_or(e);
    last.rsplit(": ").next().unwrap_or(last).trim().to_string()
}

/// A file listed in a Release file's SHA256 section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexFile {
    pub sha256: String,
    pub size: u64,
}

/// The fields of a (verified) Release file that the client uses.
#[derive(Clone, Debug, Default)]
pub struct Release {
    pub origin: Option<String>,
    pub suite: Option<String>,
    pub codename: Option<String>,
    pub date: Option<SystemTime>,
    pub valid_until: Option<SystemTime>,
    /// `Acquire-By-Hash: yes`: indexes are also at `<dir>/by-hash/SHA256/<hex>`.
    pub acquire_by_hash: bool,
    /// `No-Support-for-Architecture-all: Packages`: arch `all` packages are
    /// listed in each architecture's Packages file, not in `binary-all`.
    pub no_arch_all_index: bool,
    pub architectures: Vec<String>,
    pub components: Vec<String>,
    /// path relative to `dists/<suite>/` -> sha256 and size.
    pub sha256: BTreeMap<String, IndexFile>,
}

/// Parses a Release file's text.
pub fn parse_release(text: &str) -> Result<Release> {
    let paragraphs = parse_paragraphs(text)?;
    let p = paragraphs.first().context("the Release file is empty")?;
    let get = |name: &str| p.get(name).map(|v| v.into_owned());
    let words = |name: &str| -> Vec<String> {
        get(name)
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let date = |name: &str| -> Result<Option<SystemTime>> {
        get(name)
            .map(|v| parse_rfc2822(&v).with_context(|| format!("parsing {name}: {v:?}")))
            .transpose()
    };
    let mut sha256 = BTreeMap::new();
    if let Some(section) = p.get("SHA256") {
        for line in section.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [hash, size, path] = parts[..] else {
                bail!("bad line in the SHA256 section: {line:?}");
            };
            let hash = hash.to_ascii_lowercase();
            if !crate::cache::is_sha256_hex(&hash) {
                bail!("bad sha256 in the SHA256 section: {line:?}");
            }
            let size = size
                .parse()
                .with_context(|| format!("bad size in the SHA256 section: {line:?}"))?;
            sha256.insert(path.to_string(), IndexFile { sha256: hash, size });
        }
    }
    Ok(Release {
        origin: get("Origin"),
        suite: get("Suite"),
        codename: get("Codename"),
        date: date("Date")?,
        valid_until: date("Valid-Until")?,
        acquire_by_hash: get("Acquire-By-Hash").is_some_and(|v| v.eq_ignore_ascii_case("yes")),
        no_arch_all_index: words("No-Support-for-Architecture-all")
            .iter()
            .any(|w| w == "Packages"),
        architectures: words("Architectures"),
        components: words("Components"),
        sha256,
    })
}

impl Release {
    /// Checks that this Release describes `suite` (by Suite or Codename, when
    /// present), so a mirror cannot pass off one suite's index as another's.
    pub fn check_suite(&self, suite: &str) -> Result<()> {
        let names: Vec<&str> = [self.suite.as_deref(), self.codename.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        if names.is_empty() || names.contains(&suite) {
            return Ok(());
        }
        bail!("it describes suite {}, not {suite}", names.join("/"))
    }

    /// Errors (or only warns, see `ALLOW_EXPIRED_ENV`) when `Valid-Until` is before `now`.
    pub fn check_valid_until(&self, now: SystemTime, strict: bool) -> Result<()> {
        let Some(until) = self.valid_until else {
            return Ok(());
        };
        if now <= until {
            return Ok(());
        }
        let ago = now.duration_since(until).unwrap_or_default().as_secs() / 3600;
        let msg = format!(
            "it expired {ago} hours ago (Valid-Until {}); the mirror serves stale data \
             (set {ALLOW_EXPIRED_ENV}=1 to accept it anyway, e.g. for a snapshot mirror)",
            format_unix(until)
        );
        if strict {
            bail!(msg)
        }
        tracing::warn!("{msg}");
        Ok(())
    }

    /// Where to fetch the index at `path` (relative to `dists/<suite>/`) under
    /// `dist_url`: by hash when the Release says so.
    pub fn index_url(&self, dist_url: &str, path: &str, file: &IndexFile) -> String {
        if self.acquire_by_hash {
            let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
            format!("{dist_url}/{dir}/by-hash/SHA256/{}", file.sha256)
        } else {
            format!("{dist_url}/{path}")
        }
    }
}

/// Whether `ALLOW_EXPIRED_ENV` is set to 1.
pub fn allow_expired_from_env() -> bool {
    std::env::var(ALLOW_EXPIRED_ENV).is_ok_and(|v| v.trim() == "1")
}

/// Parses the date format of Release files: `Sat, 12 Sep 2026 07:55:41 UTC`
/// (weekday optional; zone `UTC`, `GMT`, `Z` or `+hhmm`/`-hhmm`).
pub fn parse_rfc2822(s: &str) -> Result<SystemTime> {
    let s = s.trim();
    let s = match s.split_once(',') {
        Some((_, rest)) => rest.trim(),
        None => s,
    };
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [day, month, year, time, zone] = parts[..] else {
        bail!("expected \"Day, DD Mon YYYY HH:MM:SS zone\"");
    };
    let day: u32 = day.parse().context("bad day")?;
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let month = MONTHS
        .iter()
        .position(|m| month.eq_ignore_ascii_case(m))
        .context("bad month")? as u32
        + 1;
    let year: i64 = year.parse().context("bad year")?;
    let hms: Vec<u32> = time
        .split(':')
        .map(|x| x.parse::<u32>())
        .collect::<std::result::Result<_, _>>()
        .context("bad time")?;
    let [h, m, sec] = hms[..] else {
        bail!("bad time");
    };
    if !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        bail!("date out of range");
    }
    let offset: i64 = match zone {
        "UTC" | "GMT" | "Z" | "UT" => 0,
        z if z.len() == 5 && (z.starts_with('+') || z.starts_with('-')) => {
            let hh: i64 = z[1..3].parse().context("bad zone")?;
            let mm: i64 = z[3..5].parse().context("bad zone")?;
            let secs = hh * 3600 + mm * 60;
            if z.starts_with('-') {
                -secs
            } else {
                secs
            }
        }
        _ => bail!("unknown time zone {zone:?}"),
    };
    let days = days_from_civil(year, month, day);
    let unix = days * 86400 + i64::from(h) * 3600 + i64::from(m) * 60 + i64::from(sec) - offset;
    let unix = u64::try_from(unix).map_err(|_| anyhow!("date before 1970"))?;
    Ok(UNIX_EPOCH + Duration::from_secs(unix))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn format_unix(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs} seconds after 1970-01-01 UTC")
}

/// A keyring path and its loaded keys, loaded once per path.
#[derive(Default)]
pub struct KeyringCache {
    loaded: BTreeMap<PathBuf, std::sync::Arc<Keyring>>,
}

impl KeyringCache {
    pub fn get(&mut self, path: &Path) -> Result<std::sync::Arc<Keyring>> {
        if let Some(k) = self.loaded.get(path) {
            return Ok(k.clone());
        }
        let k = std::sync::Arc::new(Keyring::load(path)?);
        self.loaded.insert(path.to_path_buf(), k.clone());
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELEASE: &str = "\
Origin: Debian
Label: Debian-Security
Suite: stable-security
Codename: trixie-security
Date: Sat, 12 Sep 2026 07:55:41 UTC
Valid-Until: Sat, 19 Sep 2026 07:55:41 UTC
Acquire-By-Hash: yes
No-Support-for-Architecture-all: Packages
Architectures: amd64 arm64
Components: updates/main
Description: Debian 13 - Security Updates
SHA256:
 4f2c68d67001d595fbd343f6dbad44468953a51c4d9dec3a4803249f6e295940 56620099 main/binary-amd64/Packages
 7778D3E3F303B7DDB8CE0FE7C8D57473A076C6BF2E8F241F75421D2396352498  9678380 main/binary-amd64/Packages.xz
";

    #[test]
    fn parse_fields() {
        let r = parse_release(RELEASE).unwrap();
        assert_eq!(r.codename.as_deref(), Some("trixie-security"));
        assert!(r.acquire_by_hash);
        assert!(r.no_arch_all_index);
        assert_eq!(r.architectures, ["amd64", "arm64"]);
        assert_eq!(r.sha256.len(), 2);
        let xz = &r.sha256["main/binary-amd64/Packages.xz"];
        assert_eq!(xz.size, 9678380);
        assert!(xz.sha256.starts_with("7778d3e3"));
        assert_eq!(
            r.index_url(
                "http://m.example/debian/dists/trixie",
                "main/binary-amd64/Packages.xz",
                xz
            ),
            format!(
                "http://m.example/debian/dists/trixie/main/binary-amd64/by-hash/SHA256/{}",
                xz.sha256
            )
        );
        let plain = Release {
            acquire_by_hash: false,
            ..r.clone()
        };
        assert_eq!(
            plain.index_url(
                "http://m.example/d/dists/s",
                "main/binary-amd64/Packages.xz",
                xz
            ),
            "http://m.example/d/dists/s/main/binary-amd64/Packages.xz"
        );
    }

    #[test]
    fn suite_check() {
        let r = parse_release(RELEASE).unwrap();
        r.check_suite("trixie-security").unwrap();
        r.check_suite("stable-security").unwrap();
        let err = r.check_suite("bookworm-security").unwrap_err().to_string();
        assert!(err.contains("stable-security/trixie-security"), "{err}");
        Release::default().check_suite("anything").unwrap();
    }

    #[test]
    fn valid_until() {
        let r = parse_release(RELEASE).unwrap();
        let until = r.valid_until.unwrap();
        r.check_valid_until(until - Duration::from_secs(1), true)
            .unwrap();
        let err = r
            .check_valid_until(until + Duration::from_secs(7200), true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expired 2 hours ago") && err.contains(ALLOW_EXPIRED_ENV),
            "{err}"
        );
        r.check_valid_until(until + Duration::from_secs(7200), false)
            .unwrap();
    }

    #[test]
    fn dates() {
        let t = |s: &str| {
            parse_rfc2822(s)
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs()
        };
        assert_eq!(t("Thu, 01 Jan 1970 00:00:00 UTC"), 0);
        assert_eq!(t("Sat, 12 Sep 2026 07:55:41 UTC"), 1_789_199_741);
        assert_eq!(t("29 Feb 2024 12:00:00 +0100"), 1_709_204_400);
        assert_eq!(t("Tue, 01 Mar 2000 00:00:00 -0030"), 951_870_600);
        assert!(parse_rfc2822("Sat, 12 Foo 2026 07:55:41 UTC").is_err());
        assert!(parse_rfc2822("yesterday").is_err());
        assert!(parse_release("Valid-Until: soon\n").is_err());
    }

    #[test]
    fn unusable_inputs() {
        let err = Keyring::from_bytes(b"garbage", "test.gpg").unwrap_err();
        assert!(format!("{err:#}").contains("test.gpg"), "{err:#}");
        let err = Keyring::load(Path::new("/nonexistent/keyring.gpg")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/keyring.gpg"),
            "{err}"
        );
        assert!(verify_error_text("a\nb: c: invalid signed hash value").contains("does not match"));
        assert_eq!(
            verify_error_text("x: unsupported algorithm"),
            "unsupported algorithm"
        );
    }

    #[test]
    fn bad_sha256_lines() {
        assert!(parse_release("SHA256:\n abc 1 main/x\n").is_err());
        assert!(parse_release(&format!("SHA256:\n {} big main/x\n", "a".repeat(64))).is_err());
    }
}
