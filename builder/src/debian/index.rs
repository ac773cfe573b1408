//! Control-file paragraphs (deb822) and the Packages index built from them.
//!
//! The deb822 syntax is small (fields, continuation lines, blank-line separated
//! paragraphs), so it is parsed by hand over borrowed text: a Packages file of a
//! full suite is ~60 MB and a zero-copy parser keeps loading it fast without
//! another dependency.

use std::borrow::Cow;

use anyhow::{bail, Context, Result};

use super::relation::{parse_provides, parse_relations, Alternatives, Relation};
use super::version::Version;

/// One paragraph: fields in file order, values borrowed from the text.
#[derive(Debug, Clone)]
pub struct Paragraph<'a> {
    /// (name, raw value): the value is trimmed and may span continuation lines.
    fields: Vec<(&'a str, &'a str)>,
    /// 1-based line number of the paragraph's first field.
    pub line: usize,
}

impl<'a> Paragraph<'a> {
    /// The value of a field (names are case-insensitive). Continuation lines
    /// are returned trimmed and joined with `\n`.
    pub fn get(&self, name: &str) -> Option<Cow<'a, str>> {
        let (_, raw) = self
            .fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))?;
        if raw.contains('\n') {
            let folded: Vec<&str> = raw
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            Some(Cow::Owned(folded.join("\n")))
        } else {
            Some(Cow::Borrowed(*raw))
        }
    }

    /// Like `get`, but a missing field is an error naming the field.
    pub fn require(&self, name: &str) -> Result<Cow<'a, str>> {
        self.get(name)
            .with_context(|| format!("the paragraph at line {} has no {name} field", self.line))
    }

    /// Field names in file order.
    pub fn names(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.fields.iter().map(|(n, _)| *n)
    }
}

/// Splits deb822 text into paragraphs. Lines starting with `#` are comments.
pub fn parse_paragraphs(text: &str) -> Result<Vec<Paragraph<'_>>> {
    parse_paragraphs_from(text, 1)
}

/// `parse_paragraphs` for text whose first line is line `first_line` of a file.
fn parse_paragraphs_from(text: &str, first_line: usize) -> Result<Vec<Paragraph<'_>>> {
    let mut out = Vec::new();
    let mut current: Option<Paragraph<'_>> = None;
    // Index into `text` where the current field's value starts, and its name.
    let mut open_field: Option<(&str, usize, usize)> = None; // (name, start, end)
    let mut offset = 0;

    for (index, line_with_nl) in text.split_inclusive('\n').enumerate() {
        let line_no = index + first_line;
        let start = offset;
        offset += line_with_nl.len();
        let line = line_with_nl.trim_end_matches(['\n', '\r']);
        let line_end = start + line.len();

        if line.trim().is_empty() {
            finish_field(text, &mut current, &mut open_field);
            if let Some(p) = current.take() {
                out.push(p);
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            match open_field.as_mut() {
                Some((_, _, end)) => *end = line_end,
                None => bail!("line {line_no}: continuation line without a field"),
            }
            continue;
        }
        finish_field(text, &mut current, &mut open_field);
        let colon = line
            .find(':')
            .with_context(|| format!("line {line_no}: expected \"Field: value\", got {line:?}"))?;
        let name = line[..colon].trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            bail!("line {line_no}: bad field name {name:?}");
        }
        current.get_or_insert_with(|| Paragraph {
            fields: Vec::new(),
            line: line_no,
        });
        open_field = Some((name, start + colon + 1, line_end));
    }
    finish_field(text, &mut current, &mut open_field);
    if let Some(p) = current.take() {
        out.push(p);
    }
    Ok(out)
}

fn finish_field<'a>(
    text: &'a str,
    current: &mut Option<Paragraph<'a>>,
    open: &mut Option<(&'a str, usize, usize)>,
) {
    if let (Some(p), Some((name, start, end))) = (current.as_mut(), open.take()) {
        p.fields.push((name, text[start..end].trim()));
    }
}

/// One binary package from a Packages index, with the repository it came from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Package {
    pub name: String,
    pub version: Version,
    pub architecture: String,
    pub depends: Vec<Alternatives>,
    pub pre_depends: Vec<Alternatives>,
    /// Provided (virtual) names, optionally versioned (`Provides: x (= 1)`).
    pub provides: Vec<Relation>,
    /// Path of the .deb relative to `repo`.
    pub filename: String,
    pub sha256: String,
    pub size: u64,
    pub essential: bool,
    pub priority: Option<String>,
    pub section: Option<String>,
    /// Source package name (the package's own name when the index has none).
    pub source: String,
    /// Base URL of the repository (the directory holding `dists/` and `pool/`).
    pub repo: String,
    /// Suite whose index listed this package.
    pub suite: String,
}

impl Package {
    /// Builds a package from a Packages paragraph; `arch` evaluates `[arch]` restrictions.
    pub fn from_paragraph(
        p: &Paragraph<'_>,
        repo: &str,
        suite: &str,
        arch: &str,
    ) -> Result<Package> {
        let name = p.require("Package")?.into_owned();
        let inner = || -> Result<Package> {
            let version = Version::parse(&p.require("Version")?)?;
            let relations = |field: &str| -> Result<Vec<Alternatives>> {
                match p.get(field) {
                    Some(v) => parse_relations(&v, arch).with_context(|| format!("in {field}")),
                    None => Ok(Vec::new()),
                }
            };
            let provides = match p.get("Provides") {
                Some(v) => parse_provides(&v, arch).context("in Provides")?,
                None => Vec::new(),
            };
            let sha256 = p.require("SHA256")?.to_ascii_lowercase();
            if !crate::cache::is_sha256_hex(&sha256) {
                bail!("SHA256 {sha256:?} is not a sha256 in hex");
            }
            let size = p
                .require("Size")?
                .parse::<u64>()
                .context("Size is not a number")?;
            let filename = p.require("Filename")?.into_owned();
            if filename.starts_with('/') || filename.split('/').any(|c| c == "..") {
                bail!("Filename {filename:?} leaves the repository");
            }
            let source = match p.get("Source") {
                // "Source: name (version)" when the source version differs.
                Some(s) => s.split_whitespace().next().unwrap_or(&name).to_string(),
                None => name.clone(),
            };
            Ok(Package {
                name: name.clone(),
                version,
                architecture: p.require("Architecture")?.into_owned(),
                depends: relations("Depends")?,
                pre_depends: relations("Pre-Depends")?,
                provides,
                filename,
                sha256,
                size,
                essential: p
                    .get("Essential")
                    .is_some_and(|v| v.eq_ignore_ascii_case("yes")),
                priority: p.get("Priority").map(Cow::into_owned),
                section: p.get("Section").map(Cow::into_owned),
                source,
                repo: repo.trim_end_matches('/').to_string(),
                suite: suite.to_string(),
            })
        };
        inner().with_context(|| format!("package {name} (line {})", p.line))
    }

    /// Download URL of the .deb.
    pub fn url(&self) -> String {
        format!("{}/{}", self.repo, encode_path(&self.filename))
    }

    /// Depends and Pre-Depends together (Pre-Depends first).
    pub fn all_depends(&self) -> impl Iterator<Item = &Alternatives> {
        self.pre_depends.iter().chain(self.depends.iter())
    }
}

/// Percent-encodes the characters of a repository path that would change a URL's meaning.
fn encode_path(path: &str) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
    const PATH: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'#').add(b'%').add(b'?');
    utf8_percent_encode(path, PATH).to_string()
}

/// Parses a whole Packages index. Packages of other architectures than
/// `arch` and `all` are skipped. Large indexes are parsed in parallel, in
/// chunks cut at paragraph boundaries; the order of packages is kept.
pub fn parse_packages(text: &str, repo: &str, suite: &str, arch: &str) -> Result<Vec<Package>> {
    use rayon::prelude::*;
    let parts = paragraph_chunks(text, 4 << 20)
        .into_par_iter()
        .map(|(first_line, chunk)| {
            let mut out = Vec::new();
            for p in parse_paragraphs_from(chunk, first_line)? {
                let pkg = Package::from_paragraph(&p, repo, suite, arch)?;
                if pkg.architecture == arch || pkg.architecture == "all" {
                    out.push(pkg);
                }
            }
            Ok(out)
        })
        .collect::<Vec<Result<Vec<Package>>>>();
    // The first error in file order, so messages do not depend on scheduling.
    let mut out = Vec::new();
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

/// Cuts `text` into pieces of about `size` bytes that end after a blank line,
/// each with the line number it starts at.
fn paragraph_chunks(text: &str, size: usize) -> Vec<(usize, &str)> {
    let mut chunks = Vec::new();
    let (mut start, mut line) = (0, 1);
    while start < text.len() {
        let mut end = text.len();
        if start + size < text.len() {
            let mut probe = start + size;
            while !text.is_char_boundary(probe) {
                probe += 1;
            }
            let rest = &text[probe..];
            let blank = [rest.find("\n\n"), rest.find("\n\r\n")]
                .into_iter()
                .flatten()
                .min();
            if let Some(pos) = blank {
                end = probe + pos + 1;
            }
        }
        let chunk = &text[start..end];
        chunks.push((line, chunk));
        line += chunk.bytes().filter(|&b| b == b'\n').count();
        start = end;
    }
    chunks
}

/// Decompresses an index by its file name (`.xz`, `.gz`, `.zst` or plain).
pub fn decompress(name: &str, data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    if name.ends_with(".xz") {
        liblzma::read::XzDecoder::new_multi_decoder(data).read_to_end(&mut out)?;
    } else if name.ends_with(".gz") {
        flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out)?;
    } else if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(data)?.read_to_end(&mut out)?;
    } else {
        out.extend_from_slice(data);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
Package: busybox-static
Version: 1:1.37.0-6
Architecture: amd64
Maintainer: Someone <someone@example.org>
Depends: libc6 (>= 2.38),
 zlib1g | libz
Pre-Depends: dpkg (>= 1.19)
Provides: busybox (= 1:1.37.0-6), sh
Priority: optional
Section: shells
Source: busybox (1:1.37.0-5)
Filename: pool/main/b/busybox/busybox-static_1.37.0-6_amd64.deb
Size: 1234
SHA256: 00112233445566778899AABBCCDDEEFF00112233445566778899aabbccddeeff
Description: a tiny shell
 Busybox combines tiny versions of many common UNIX utilities.
 .
 Second paragraph.

# comment between paragraphs
Package: base-files
Essential: yes
Version: 13.8
Architecture: all
Filename: pool/main/b/base-files/base-files_13.8_all.deb
Size: 70000
SHA256: ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100

Package: other-arch
Version: 1
Architecture: arm64
Filename: pool/x.deb
Size: 1
SHA256: ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100
";

    #[test]
    fn paragraphs_and_fields() {
        let ps = parse_paragraphs(SAMPLE).unwrap();
        assert_eq!(ps.len(), 3);
        assert_eq!(ps[0].line, 1);
        assert_eq!(ps[1].line, 21);
        assert_eq!(ps[0].get("package").unwrap(), "busybox-static");
        assert_eq!(
            ps[0].get("Depends").unwrap(),
            "libc6 (>= 2.38),\nzlib1g | libz"
        );
        assert!(ps[0]
            .get("Description")
            .unwrap()
            .contains("Second paragraph."));
        assert!(ps[0].get("Recommends").is_none());
        assert!(ps[1].names().any(|n| n == "Essential"));
    }

    #[test]
    fn packages_fields() {
        let pkgs =
            parse_packages(SAMPLE, "http://mirror.example/debian/", "trixie", "amd64").unwrap();
        assert_eq!(pkgs.len(), 2, "the arm64 package is skipped");
        let b = &pkgs[0];
        assert_eq!(b.name, "busybox-static");
        assert_eq!(b.version.as_str(), "1:1.37.0-6");
        assert_eq!(b.depends.len(), 2);
        assert_eq!(b.depends[1].len(), 2);
        assert_eq!(b.pre_depends[0][0].name, "dpkg");
        assert_eq!(b.provides.len(), 2);
        assert_eq!(b.source, "busybox");
        assert_eq!(b.size, 1234);
        assert_eq!(
            b.sha256,
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
        );
        assert_eq!(
            b.url(),
            "http://mirror.example/debian/pool/main/b/busybox/busybox-static_1.37.0-6_amd64.deb"
        );
        assert_eq!(b.all_depends().count(), 3);
        assert!(pkgs[1].essential);
        assert_eq!(pkgs[1].source, "base-files");
        assert_eq!(pkgs[1].suite, "trixie");
    }

    #[test]
    fn crlf_and_errors() {
        let ps = parse_paragraphs("A: 1\r\nB: two\r\n words\r\n\r\nA: 2\r\n").unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].get("B").unwrap(), "two\nwords");
        let err = parse_paragraphs("A: 1\nnot a field\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(parse_paragraphs(" continuation\n").is_err());
        let bad = SAMPLE.replace("Size: 1234", "Size: big");
        let err = parse_packages(&bad, "http://mirror.example", "s", "amd64").unwrap_err();
        assert!(
            format!("{err:#}").contains("package busybox-static"),
            "{err:#}"
        );
        let evil = SAMPLE.replace("pool/main/b/busybox/", "../../");
        assert!(parse_packages(&evil, "http://mirror.example", "s", "amd64").is_err());
    }

    #[test]
    fn chunked_parsing_keeps_order_and_line_numbers() {
        let mut text = String::new();
        for i in 0..50 {
            text.push_str(&format!(
                "Package: p{i}\nVersion: {i}\nArchitecture: amd64\nFilename: pool/p{i}.deb\nSize: 1\nSHA256: {}\n\n",
                "c".repeat(64)
            ));
        }
        let chunks = paragraph_chunks(&text, 100);
        assert!(chunks.len() > 10);
        assert_eq!(chunks.iter().map(|(_, c)| *c).collect::<String>(), text);
        assert_eq!(
            chunks[1].0, 7,
            "the second chunk starts at the blank line 7"
        );
        let pkgs = parse_packages(&text, "http://mirror.example", "s", "amd64").unwrap();
        let names: Vec<String> = pkgs.iter().map(|p| p.name.clone()).collect();
        let expected: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
        assert_eq!(names, expected);
        let bad = text.replace("Size: 1\nSHA256: cccc", "Size: x\nSHA256: cccc");
        let err = parse_packages(&bad, "http://mirror.example", "s", "amd64").unwrap_err();
        assert_eq!(err.to_string(), "package p0 (line 1)");
        let bad = text.replacen("Package: p30\n", "Package: p30\nbroken\n", 1);
        let err = parse_packages(&bad, "http://mirror.example", "s", "amd64").unwrap_err();
        assert!(
            err.to_string().contains(&format!("line {}", 30 * 7 + 2)),
            "{err}"
        );
    }

    #[test]
    fn decompress_formats() {
        use std::io::Write;
        let text = b"Package: a\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decompress("Packages.gz", &gz).unwrap(), text);
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(text).unwrap();
        let xz = xz.finish().unwrap();
        assert_eq!(decompress("Packages.xz", &xz).unwrap(), text);
        assert_eq!(decompress("Packages", text).unwrap(), text);
        assert!(decompress("Packages.xz", b"garbage").is_err());
    }
}
