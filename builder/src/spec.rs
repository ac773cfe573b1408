//! The image spec: a TOML file that says what goes into an image.
//!
//! Parsing is two steps: serde (with `serde_path_to_error`, so a type error
//! names its key) and then validation of what serde cannot check. Every error
//! names the file, the key and the line, e.g.
//! ``images/pxe.toml:4:8: arch: unknown variant `arm`, expected `x86_64` or `aarch64` ``.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// An error in a spec file, with where it is.
#[derive(Debug, thiserror::Error)]
pub struct SpecError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// CPU architecture of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    #[serde(rename = "x86_64")]
    X86_64,
    Aarch64,
}

impl Arch {
    /// The Debian architecture name.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the build emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// vmlinuz + initrd.img + rootfs.squashfs for network boot.
    Pxe,
    /// sdcard.img: a Raspberry Pi 4/5 SD card (MBR: FAT32 boot, root A, root B).
    Sdcard,
    /// disk.raw: a UEFI disk for clouds and servers (GPT: ESP with
    /// systemd-boot, root A, root B).
    Disk,
    /// disk.qcow2: disk.raw as qcow2 (QEMU, OpenStack).
    Qcow2,
    /// disk.vhd: disk.raw as a fixed VHD, whole MiB (Azure).
    Vhd,
    /// disk.gce.tar.gz: disk.raw in a tarball (Google Compute Engine).
    Gce,
}

impl Output {
    /// Whether this output is made from disk.raw.
    pub fn needs_disk(self) -> bool {
        matches!(
            self,
            Output::Disk | Output::Qcow2 | Output::Vhd | Output::Gce
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: Spanned<String>,
    arch: Arch,
    #[serde(default)]
    description: String,
    debian: RawDebian,
    k3s: Option<RawK3s>,
    #[serde(default)]
    initramfs: RawInitramfs,
    #[serde(default)]
    overlays: Vec<Spanned<String>>,
    #[serde(default)]
    variables: BTreeMap<String, toml::Value>,
    outputs: Spanned<Vec<Output>>,
    source_date_epoch: Option<u64>,
    #[serde(default)]
    squashfs: RawSquashfs,
    #[serde(default)]
    platform: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDebian {
    suites: Spanned<Vec<String>>,
    #[serde(default = "default_components")]
    components: Vec<String>,
    keyring: Option<Spanned<String>>,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    kernel: Spanned<String>,
    #[serde(default)]
    repositories: Vec<Spanned<RawRepository>>,
}

/// `[[debian.repositories]]`: another Debian-format repository (e.g.
/// Raspberry Pi's), with its own keyring.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    url: Spanned<String>,
    suites: Spanned<Vec<String>>,
    #[serde(default = "default_components")]
    components: Vec<String>,
    keyring: Spanned<String>,
}

fn default_components() -> Vec<String> {
    vec!["main".into()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawK3s {
    version: Spanned<String>,
    sha256: Option<Spanned<String>>,
    file: Option<Spanned<String>>,
    #[serde(default)]
    airgap_images: Vec<Spanned<String>>,
    #[serde(default)]
    airgap_files: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInitramfs {
    #[serde(default)]
    modules: Vec<String>,
    #[serde(default)]
    module_dirs: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSquashfs {
    compression: Option<Spanned<String>>,
}

/// A validated image spec. Paths are absolute (relative ones in the file are
/// taken from the spec's directory).
#[derive(Clone, Debug)]
pub struct Spec {
    pub path: PathBuf,
    /// sha256 of the spec file's bytes.
    pub sha256: String,
    pub name: String,
    pub arch: Arch,
    pub description: String,
    pub debian: Debian,
    pub k3s: Option<K3s>,
    pub initramfs: Initramfs,
    pub overlays: Vec<PathBuf>,
    pub variables: BTreeMap<String, toml::Value>,
    pub outputs: Vec<Output>,
    pub source_date_epoch: Option<u64>,
    pub squashfs_compression: SquashfsCompression,
    /// Platform components (names from `platform::COMPONENTS`) whose
    /// manifests go into /var/lib/rancher/k3s/server/manifests. Default: none.
    pub platform: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SquashfsCompression {
    Zstd,
    Xz,
    Gzip,
}

#[derive(Clone, Debug)]
pub struct Debian {
    pub suites: Vec<String>,
    pub components: Vec<String>,
    /// Keyring that verifies the suites' InRelease (default: the host's
    /// debian-archive-keyring).
    pub keyring: PathBuf,
    pub packages: Vec<String>,
    pub exclude: Vec<String>,
    /// The kernel package (e.g. linux-image-cloud-amd64).
    pub kernel: String,
    /// More Debian-format repositories, each with its own URL, suites,
    /// components and keyring, read beside Debian's suites (the highest
    /// version of a package across all of them wins).
    pub repositories: Vec<crate::debian::RepoSource>,
}

#[derive(Clone, Debug)]
pub struct K3s {
    /// Release tag, e.g. v1.33.5+k3s1.
    pub version: String,
    /// Pinned sha256 of the binary (checked in addition to the release's sha256sum file).
    pub sha256: Option<String>,
    /// A local k3s binary used instead of a download.
    pub file: Option<PathBuf>,
    /// Air-gap image tarballs fetched from the release (asset names, e.g.
    /// k3s-airgap-images-amd64.tar.zst), checked against its sha256sum file.
    pub airgap_images: Vec<String>,
    /// Local air-gap image tarballs.
    pub airgap_files: Vec<PathBuf>,
}

#[derive(Clone, Debug, Default)]
pub struct Initramfs {
    /// Modules (by name) the initramfs carries, with their dependencies.
    pub modules: Vec<String>,
    /// Directories under `lib/modules/<kver>/` whose modules all go in (e.g. NIC drivers).
    pub module_dirs: Vec<String>,
}

pub const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

impl Spec {
    /// Reads and validates a spec file.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read the spec: {e}"),
        })?;
        Spec::parse(path, &text)
    }

    /// Parses and validates spec text; `path` names the file in errors and
    /// anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Spec, SpecError> {
        let at = |span: Option<std::ops::Range<usize>>, key: &str, message: String| {
            let (line, column) = span.map_or((0, 0), |s| line_col(text, s.start));
            SpecError {
                file: path.to_path_buf(),
                line,
                column,
                key: key.to_string(),
                message,
            }
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| at(e.span(), "", e.message().to_string()))?;
        let raw: RawSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            // toml's Spanned<T> shows up in serde's path as a field of its own.
            let key = e
                .path()
                .to_string()
                .replace(".$__serde_spanned_private_value", "");
            let inner = e.into_inner();
            at(
                inner.span(),
                if key == "." { "" } else { &key },
                inner.message().to_string(),
            )
        })?;

        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let abs = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };

        let name = raw.name.get_ref();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || name.starts_with('.')
        {
            return Err(at(
                Some(raw.name.span()),
                "name",
                format!("{name:?} is not a valid image name (letters, digits, '-', '_', '.'; not starting with '.')"),
            ));
        }
        if raw.debian.suites.get_ref().is_empty() {
            return Err(at(
                Some(raw.debian.suites.span()),
                "debian.suites",
                "needs at least one suite".into(),
            ));
        }
        if raw.debian.kernel.get_ref().trim().is_empty() {
            return Err(at(
                Some(raw.debian.kernel.span()),
                "debian.kernel",
                "names no kernel package".into(),
            ));
        }
        if raw.outputs.get_ref().is_empty() {
            return Err(at(
                Some(raw.outputs.span()),
                "outputs",
                "needs at least one output (\"pxe\", \"sdcard\")".into(),
            ));
        }
        if raw.arch != Arch::Aarch64 && raw.outputs.get_ref().contains(&Output::Sdcard) {
            return Err(at(
                Some(raw.outputs.span()),
                "outputs",
                format!(
                    "\"sdcard\" (Raspberry Pi 4/5) needs arch = \"aarch64\", not {}",
                    raw.arch
                ),
            ));
        }
        let keyring = match &raw.debian.keyring {
            Some(k) => {
                let p = abs(k.get_ref());
                if !p.is_file() {
                    return Err(at(
                        Some(k.span()),
                        "debian.keyring",
                        format!("{} is not a file", p.display()),
                    ));
                }
                p
            }
            None => PathBuf::from(DEFAULT_KEYRING),
        };
        let mut repositories = Vec::new();
        for (i, r) in raw.debian.repositories.iter().enumerate() {
            let r = r.get_ref();
            let key = |k: &str| format!("debian.repositories[{i}].{k}");
            let url = r.url.get_ref().trim_end_matches('/');
            let scheme_ok = ["http://", "https://", "file://"]
                .iter()
                .any(|p| url.strip_prefix(p).is_some_and(|rest| !rest.is_empty()));
            if !scheme_ok || url.chars().any(char::is_whitespace) {
                return Err(at(
                    Some(r.url.span()),
                    &key("url"),
                    format!("{url:?} is not an http://, https:// or file:// URL"),
                ));
            }
            if r.suites.get_ref().is_empty() {
                return Err(at(
                    Some(r.suites.span()),
                    &key("suites"),
                    "needs at least one suite".into(),
                ));
            }
            let keyring = abs(r.keyring.get_ref());
            if !keyring.is_file() {
                return Err(at(
                    Some(r.keyring.span()),
                    &key("keyring"),
                    format!(
                        "{} is not a file (the repository's signing key, binary or ASCII-armored)",
                        keyring.display()
                    ),
                ));
            }
            repositories.push(crate::debian::RepoSource {
                url: url.to_string(),
                suites: r.suites.get_ref().clone(),
                components: r.components.clone(),
                keyring,
            });
        }
        let k3s = match raw.k3s {
            None => None,
            Some(k) => {
                let v = k.version.get_ref();
                if !v.starts_with('v') || !v.contains("k3s") || v.contains('/') {
                    return Err(at(
                        Some(k.version.span()),
                        "k3s.version",
                        format!("{v:?} is not a k3s release tag (like \"v1.33.5+k3s1\")"),
                    ));
                }
                let sha256 = match k.sha256 {
                    Some(s) => {
                        let h = s.get_ref().to_ascii_lowercase();
                        if !crate::cache::is_sha256_hex(&h) {
                            return Err(at(
                                Some(s.span()),
                                "k3s.sha256",
                                "is not 64 hex digits".into(),
                            ));
                        }
                        Some(h)
                    }
                    None => None,
                };
                let file = match k.file {
                    Some(f) => {
                        let p = abs(f.get_ref());
                        if !p.is_file() {
                            return Err(at(
                                Some(f.span()),
                                "k3s.file",
                                format!("{} is not a file", p.display()),
                            ));
                        }
                        Some(p)
                    }
                    None => None,
                };
                // Every tarball lands in agent/images/ under its file name:
                // two with one name would overwrite each other.
                let mut airgap_names: Vec<String> = Vec::new();
                let mut airgap_images = Vec::new();
                for (i, a) in k.airgap_images.iter().enumerate() {
                    let name = a.get_ref();
                    if !is_asset_name(name) {
                        return Err(at(
                            Some(a.span()),
                            &format!("k3s.airgap_images[{i}]"),
                            format!(
                                "{name:?} is not a release asset name (like \"k3s-airgap-images-amd64.tar.zst\")"
                            ),
                        ));
                    }
                    let other_arch = match raw.arch {
                        Arch::X86_64 => name.contains("-arm"),
                        Arch::Aarch64 => name.contains("-amd64"),
                    };
                    if other_arch {
                        return Err(at(
                            Some(a.span()),
                            &format!("k3s.airgap_images[{i}]"),
                            format!("{name:?} holds images of another arch than {}", raw.arch),
                        ));
                    }
                    if airgap_names.contains(name) {
                        return Err(at(
                            Some(a.span()),
                            &format!("k3s.airgap_images[{i}]"),
                            format!("{name:?} is listed twice"),
                        ));
                    }
                    airgap_names.push(name.clone());
                    airgap_images.push(name.clone());
                }
                let mut airgap_files = Vec::new();
                for (i, f) in k.airgap_files.iter().enumerate() {
                    let key = format!("k3s.airgap_files[{i}]");
                    let p = abs(f.get_ref());
                    if !p.is_file() {
                        return Err(at(
                            Some(f.span()),
                            &key,
                            format!("{} is not a file", p.display()),
                        ));
                    }
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if airgap_names.contains(&name) {
                        return Err(at(
                            Some(f.span()),
                            &key,
                            format!(
                                "another air-gap tarball is also named {name:?} (they all land in /var/lib/rancher/k3s/agent/images/)"
                            ),
                        ));
                    }
                    airgap_names.push(name);
                    airgap_files.push(p);
                }
                Some(K3s {
                    version: v.clone(),
                    sha256,
                    file,
                    airgap_images,
                    airgap_files,
                })
            }
        };
        let mut overlays = Vec::new();
        for (i, o) in raw.overlays.iter().enumerate() {
            let p = abs(o.get_ref());
            if !p.is_dir() {
                return Err(at(
                    Some(o.span()),
                    &format!("overlays[{i}]"),
                    format!("{} is not a directory", p.display()),
                ));
            }
            overlays.push(p);
        }
        let squashfs_compression = match &raw.squashfs.compression {
            None => SquashfsCompression::Zstd,
            Some(c) => match c.get_ref().as_str() {
                "zstd" => SquashfsCompression::Zstd,
                "xz" => SquashfsCompression::Xz,
                "gzip" => SquashfsCompression::Gzip,
                other => {
                    return Err(at(
                        Some(c.span()),
                        "squashfs.compression",
                        format!("unknown compression {other:?}; expected zstd, xz or gzip"),
                    ))
                }
            },
        };
        let mut platform: Vec<String> = Vec::new();
        for (i, p) in raw.platform.iter().enumerate() {
            let name = p.get_ref();
            let key = format!("platform[{i}]");
            if crate::platform::manifest(name).is_none() {
                return Err(at(
                    Some(p.span()),
                    &key,
                    format!(
                        "unknown platform component {name:?}; known: {}",
                        crate::platform::names().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            if platform.contains(name) {
                return Err(at(
                    Some(p.span()),
                    &key,
                    format!("{name:?} is listed twice"),
                ));
            }
            platform.push(name.clone());
        }
        let mut outputs = raw.outputs.into_inner();
        outputs.sort();
        outputs.dedup();

        Ok(Spec {
            path: path.to_path_buf(),
            sha256: crate::sha256_hex(text.as_bytes()),
            name: name.clone(),
            arch: raw.arch,
            description: raw.description,
            debian: Debian {
                suites: raw.debian.suites.into_inner(),
                components: raw.debian.components,
                keyring,
                packages: raw.debian.packages,
                exclude: raw.debian.exclude,
                kernel: raw.debian.kernel.into_inner(),
                repositories,
            },
            k3s,
            initramfs: Initramfs {
                modules: raw.initramfs.modules,
                module_dirs: raw.initramfs.module_dirs,
            },
            overlays,
            variables: raw.variables,
            outputs,
            source_date_epoch: raw.source_date_epoch,
            squashfs_compression,
            platform,
        })
    }
}

/// A file name as k3s release assets have them: letters, digits, '.', '-',
/// '_' and '+', not starting with '.'.
fn is_asset_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "pxe-test"
arch = "x86_64"
outputs = ["pxe"]

[debian]
suites = ["trixie", "trixie-security"]
packages = ["busybox-static"]
kernel = "linux-image-cloud-amd64"

[k3s]
version = "v1.33.5+k3s1"
"#;

    fn err(text: &str) -> String {
        Spec::parse(Path::new("images/t.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_good_spec_parses() {
        let s = Spec::parse(Path::new("images/t.toml"), GOOD).unwrap();
        assert_eq!(s.name, "pxe-test");
        assert_eq!(s.arch, Arch::X86_64);
        assert_eq!(s.debian.components, ["main"]);
        assert_eq!(s.debian.keyring, Path::new(DEFAULT_KEYRING));
        assert_eq!(s.k3s.unwrap().version, "v1.33.5+k3s1");
        assert_eq!(s.squashfs_compression, SquashfsCompression::Zstd);
    }

    #[test]
    fn more_repositories_with_their_keyrings() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vendor.gpg"), b"key").unwrap();
        let spec = dir.path().join("t.toml");
        let more =
            |body: &str| GOOD.replace("[k3s]", &format!("[[debian.repositories]]\n{body}\n[k3s]"));
        let s = Spec::parse(
            &spec,
            &more("url = \"http://127.0.0.1:9/debian/\"\nsuites = [\"trixie\"]\nkeyring = \"vendor.gpg\""),
        )
        .unwrap();
        assert_eq!(
            s.debian.repositories,
            [crate::debian::RepoSource {
                url: "http://127.0.0.1:9/debian".into(),
                suites: vec!["trixie".into()],
                components: vec!["main".into()],
                keyring: dir.path().join("vendor.gpg"),
            }]
        );
        let e = Spec::parse(
            &spec,
            &more("url = \"http://127.0.0.1:9/debian\"\nsuites = [\"trixie\"]\nkeyring = \"missing.gpg\""),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":14:11: debian.repositories[0].keyring: ")
                && e.contains("missing.gpg is not a file"),
            "{e}"
        );
        let e = Spec::parse(
            &spec,
            &more("url = \"ftp://x/debian\"\nsuites = [\"trixie\"]\nkeyring = \"vendor.gpg\""),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("debian.repositories[0].url: \"ftp://x/debian\" is not"),
            "{e}"
        );
        let e = Spec::parse(
            &spec,
            &more("url = \"http://x/debian\"\nsuites = []\nkeyring = \"vendor.gpg\""),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("debian.repositories[0].suites: needs at least one suite"),
            "{e}"
        );
        assert!(Spec::parse(Path::new("images/t.toml"), GOOD)
            .unwrap()
            .debian
            .repositories
            .is_empty());
    }

    #[test]
    fn bad_arch_names_file_key_and_line() {
        let e = err(&GOOD.replace("\"x86_64\"", "\"arm\""));
        assert!(e.starts_with("images/t.toml:3:8: arch:"), "{e}");
        assert!(e.contains("unknown variant `arm`"), "{e}");
    }

    #[test]
    fn nested_type_error_names_the_key_path() {
        let e = err(&GOOD.replace("packages = [\"busybox-static\"]", "packages = \"busybox\""));
        assert!(e.starts_with("images/t.toml:8:12: debian.packages:"), "{e}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let e = err(&GOOD.replace("arch = ", "colour = 1\narch = "));
        assert!(e.contains("unknown field `colour`"), "{e}");
        assert!(e.starts_with("images/t.toml:3:1: colour:"), "{e}");
        let e = err(&GOOD.replace("[k3s]", "colour = 1\n[k3s]"));
        assert!(
            e.starts_with("images/t.toml:11:1: debian.colour: unknown field `colour`"),
            "{e}"
        );
    }

    #[test]
    fn sdcard_is_an_aarch64_output_and_combines_with_pxe() {
        let arm = GOOD.replace("\"x86_64\"", "\"aarch64\"");
        let s = Spec::parse(
            Path::new("images/t.toml"),
            &arm.replace("outputs = [\"pxe\"]", "outputs = [\"sdcard\", \"pxe\"]"),
        )
        .unwrap();
        assert_eq!(s.outputs, [Output::Pxe, Output::Sdcard]);
        let e = err(&GOOD.replace("outputs = [\"pxe\"]", "outputs = [\"sdcard\"]"));
        assert!(
            e.starts_with("images/t.toml:4:11: outputs: \"sdcard\" (Raspberry Pi 4/5) needs arch = \"aarch64\""),
            "{e}"
        );
        let e = err(&arm.replace("outputs = [\"pxe\"]", "outputs = [\"sd\"]"));
        assert!(
            e.starts_with("images/t.toml:4:12: outputs[0]: unknown variant `sd`"),
            "{e}"
        );
    }

    #[test]
    fn missing_kernel_is_named() {
        let e = err(&GOOD.replace("kernel = \"linux-image-cloud-amd64\"", ""));
        assert!(e.contains("missing field `kernel`"), "{e}");
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let e = err(&GOOD.replace("v1.33.5+k3s1", "latest"));
        assert!(e.starts_with("images/t.toml:12:11: k3s.version:"), "{e}");
        let e = err(&GOOD.replace("\"pxe-test\"", "\"../x\""));
        assert!(e.starts_with("images/t.toml:2:8: name:"), "{e}");
        let e = err(&GOOD.replace("outputs = [\"pxe\"]", "outputs = []"));
        assert!(e.contains(": outputs: needs at least one output"), "{e}");
        let e = err(&GOOD.replace("arch = ", "overlays = [\"/nonexistent\"]\narch = "));
        assert!(
            e.contains("overlays[0]: /nonexistent is not a directory"),
            "{e}"
        );
    }

    #[test]
    fn platform_components_are_chosen_by_name() {
        let s = Spec::parse(Path::new("images/t.toml"), GOOD).unwrap();
        assert!(s.platform.is_empty(), "a minimal image has none");
        let text = GOOD.replace("arch = ", "platform = [\"vault\", \"longhorn\"]\narch = ");
        let s = Spec::parse(Path::new("images/t.toml"), &text).unwrap();
        assert_eq!(s.platform, ["vault", "longhorn"]);
    }

    #[test]
    fn an_unknown_platform_component_is_named_with_the_known_ones() {
        let e = err(&GOOD.replace("arch = ", "platform = [\"vault\", \"nomad\"]\narch = "));
        assert!(
            e.starts_with(
                "images/t.toml:3:22: platform[1]: unknown platform component \"nomad\"; known: argocd, external-secrets,"
            ),
            "{e}"
        );
        assert!(e.contains("vault"), "{e}");
        let e = err(&GOOD.replace("arch = ", "platform = [\"loki\", \"loki\"]\narch = "));
        assert!(
            e.starts_with("images/t.toml:3:21: platform[1]: \"loki\" is listed twice"),
            "{e}"
        );
        let e = err(&GOOD.replace("arch = ", "platform = \"vault\"\narch = "));
        assert!(e.starts_with("images/t.toml:3:12: platform:"), "{e}");
    }

    #[test]
    fn airgap_images_and_files_parse() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("img")).unwrap();
        std::fs::write(dir.path().join("img/extra.tar"), b"tar").unwrap();
        let text = format!(
            "{GOOD}airgap_images = [\"k3s-airgap-images-amd64.tar.zst\"]\nairgap_files = [\"img/extra.tar\"]\n"
        );
        let s = Spec::parse(&dir.path().join("t.toml"), &text).unwrap();
        let k = s.k3s.unwrap();
        assert_eq!(k.airgap_images, ["k3s-airgap-images-amd64.tar.zst"]);
        assert_eq!(k.airgap_files, [dir.path().join("img/extra.tar")]);
        let s = Spec::parse(Path::new("images/t.toml"), GOOD).unwrap();
        let k = s.k3s.unwrap();
        assert!(k.airgap_images.is_empty() && k.airgap_files.is_empty());
    }

    #[test]
    fn airgap_errors_name_the_key_and_line() {
        let e = err(&format!(
            "{GOOD}airgap_files = [\"/nonexistent/images.tar\"]\n"
        ));
        assert!(
            e.starts_with(
                "images/t.toml:13:17: k3s.airgap_files[0]: /nonexistent/images.tar is not a file"
            ),
            "{e}"
        );
        let e = err(&format!("{GOOD}airgap_images = [\"../k3s\"]\n"));
        assert!(
            e.starts_with(
                "images/t.toml:13:18: k3s.airgap_images[0]: \"../k3s\" is not a release asset name"
            ),
            "{e}"
        );
        let e = err(&format!("{GOOD}airgap_images = [\"a.tar\", \"a.tar\"]\n"));
        assert!(
            e.contains("k3s.airgap_images[1]: \"a.tar\" is listed twice"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}airgap_images = [\"k3s-airgap-images-arm64.tar.zst\"]\n"
        ));
        assert!(
            e.contains("k3s.airgap_images[0]: \"k3s-airgap-images-arm64.tar.zst\" holds images of another arch than x86_64"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.tar"), b"").unwrap();
        let text = format!("{GOOD}airgap_images = [\"a.tar\"]\nairgap_files = [\"a.tar\"]\n");
        let e = Spec::parse(&dir.path().join("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                ":14:17: k3s.airgap_files[0]: another air-gap tarball is also named \"a.tar\""
            ),
            "{e}"
        );
    }

    #[test]
    fn toml_syntax_error_has_a_line() {
        let e = err("name = \n");
        assert!(e.starts_with("images/t.toml:1:"), "{e}");
    }
}
