//! The Debian repository client against a local signed repository served on
//! 127.0.0.1: loading, resolving, downloading, tampering at every level, and
//! offline builds from the cache. One ignored test runs against the host's
//! real mirror (`cargo test -p kiln-builder --test debian_repo -- --ignored`).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

use common::Server;
use kiln_builder::cache::{sha256_hex, Cache};
use kiln_builder::debian::{self, RepoSource, Universe};
use kiln_builder::fetch::Fetcher;
use pgp::composed::{
    ArmorOptions, CleartextSignedMessage, KeyType, SecretKeyParamsBuilder, SignedSecretKey,
    SubkeyParamsBuilder,
};
use pgp::packet::{SignatureConfig, SignatureType, Subpacket, SubpacketData};
use pgp::ser::Serialize;
use pgp::types::{KeyDetails, Password, SigningKey, Timestamp};
use rand::SeedableRng;

const SUITE: &str = "kiln-test";
const UPDATES: &str = "kiln-test-updates";

// ---------------------------------------------------------------------------
// OpenPGP keys and cleartext signatures
// ---------------------------------------------------------------------------

/// An Ed25519 key with a signing subkey (like Debian's archive keys, which
/// sign with subkeys or primaries). Seeded so tests are fast and repeatable.
fn generate_key(seed: u64, name: &str) -> SignedSecretKey {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    SecretKeyParamsBuilder::default()
        .key_type(KeyType::Ed25519Legacy)
        .can_certify(true)
        .can_sign(true)
        .primary_user_id(format!("{name} <{name}@kiln.invalid>"))
        .subkey(
            SubkeyParamsBuilder::default()
                .key_type(KeyType::Ed25519Legacy)
                .can_sign(true)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap()
        .generate(&mut rng)
        .unwrap()
}

/// Cleartext-signs `text` with each of `signers` (one signature each).
fn clearsign(text: &str, signers: &[&dyn SigningKey]) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let msg = CleartextSignedMessage::new_many(text, |normalized| {
        signers
            .iter()
            .map(|key| {
                let key = Box::new(*key);
                let mut config = SignatureConfig::from_key(&mut rng, &key, SignatureType::Text)?;
                config.hashed_subpackets = vec![
                    Subpacket::regular(SubpacketData::SignatureCreationTime(Timestamp::now()))?,
                    Subpacket::regular(SubpacketData::IssuerFingerprint(key.fingerprint()))?,
                ];
                config.unhashed_subpackets = vec![Subpacket::regular(SubpacketData::IssuerKeyId(
                    key.legacy_key_id(),
                ))?];
                config.sign(&key, &Password::empty(), normalized.as_bytes())
            })
            .collect()
    })
    .unwrap();
    msg.to_armored_string(ArmorOptions::default()).unwrap()
}

fn public_keyring(keys: &[&SignedSecretKey]) -> Vec<u8> {
    let mut out = Vec::new();
    for key in keys {
        out.extend(key.to_public_key().to_bytes().unwrap());
    }
    out
}

// ---------------------------------------------------------------------------
// Tiny real .deb files and the repository around them
// ---------------------------------------------------------------------------

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn tar(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

struct DebSpec {
    name: &'static str,
    version: &'static str,
    arch: &'static str,
    fields: &'static str,
}

/// The control stanza of a package (without Filename/Size/SHA256).
fn control(spec: &DebSpec) -> String {
    let mut c = format!(
        "Package: {}\nVersion: {}\nArchitecture: {}\nMaintainer: kiln tests <tests@kiln.invalid>\n",
        spec.name, spec.version, spec.arch
    );
    c.push_str(spec.fields);
    c.push_str(&format!("Description: test package {}\n", spec.name));
    c
}

/// An ar archive: debian-binary, control.tar.gz, data.tar.xz.
fn build_deb(spec: &DebSpec) -> Vec<u8> {
    let control_tar = gzip(&tar(&[("./control", control(spec).as_bytes(), 0o644)]));
    let payload = format!("#!/bin/sh\necho {} {}\n", spec.name, spec.version);
    let data_tar = xz(&tar(&[(
        &format!("./usr/bin/{}", spec.name),
        payload.as_bytes(),
        0o755,
    )]));
    let mut ar = ar::Builder::new(Vec::new());
    for (name, data) in [
        ("debian-binary", b"2.0\n".to_vec()),
        ("control.tar.gz", control_tar),
        ("data.tar.xz", data_tar),
    ] {
        let mut header = ar::Header::new(name.as_bytes().to_vec(), data.len() as u64);
        header.set_mode(0o100644);
        ar.append(&header, data.as_slice()).unwrap();
    }
    ar.into_inner().unwrap()
}

const MAIN_PACKAGES: &[DebSpec] = &[
    DebSpec {
        name: "hello",
        version: "1.0-1",
        arch: "amd64",
        fields: "Depends: libgreet (>= 1.2), greeter | fallback-greeter, base-files\nPriority: optional\nSection: misc\n",
    },
    DebSpec {
        name: "libgreet",
        version: "1.2-1",
        arch: "amd64",
        fields: "Pre-Depends: base-files\nSection: libs\n",
    },
    DebSpec {
        name: "polite-greeter",
        version: "2.0",
        arch: "all",
        fields: "Provides: greeter (= 2.0)\nPriority: optional\n",
    },
    DebSpec {
        name: "base-files",
        version: "13.8",
        arch: "amd64",
        fields: "Essential: yes\nPriority: required\n",
    },
    DebSpec {
        name: "unrelated",
        version: "1",
        arch: "amd64",
        fields: "Depends: not-in-any-suite\n",
    },
];

const UPDATE_PACKAGES: &[DebSpec] = &[DebSpec {
    name: "libgreet",
    version: "1.2-1+deb13u1",
    arch: "amd64",
    fields: "Pre-Depends: base-files\nSection: libs\n",
}];

struct Repo {
    _dir: tempfile::TempDir,
    root: PathBuf,
    keyring: PathBuf,
    /// package name -> (version, sha256 of its .deb, path of its .deb in the repository)
    debs: BTreeMap<String, (String, String, PathBuf)>,
    trusted: SignedSecretKey,
}

/// Writes a repository with suites `kiln-test` and `kiln-test-updates`
/// (component main, amd64, by-hash indexes). InRelease of `kiln-test` is
/// signed by an unknown key and by the trusted key's signing subkey; that of
/// `kiln-test-updates` by the trusted primary key only.
fn build_repo() -> Repo {
    build_repo_with(1, &[(SUITE, MAIN_PACKAGES), (UPDATES, UPDATE_PACKAGES)])
}

/// A repository of the given suites, signed with a key made from
/// `key_seed`: the first suite's InRelease by an unknown key and the
/// trusted key's signing subkey, the others' by the trusted primary key.
fn build_repo_with(key_seed: u64, suites: &[(&str, &[DebSpec])]) -> Repo {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let trusted = generate_key(key_seed, "trusted");
    let stranger = generate_key(2, "stranger");
    let keyring = dir.path().join("keyring.gpg");
    std::fs::write(&keyring, public_keyring(&[&trusted])).unwrap();

    let mut debs = BTreeMap::new();
    for (i, &(suite, specs)) in suites.iter().enumerate() {
        let mut index = String::new();
        for spec in specs {
            let deb = build_deb(spec);
            let file_version = spec.version.rsplit(':').next().unwrap();
            let rel = format!(
                "pool/main/{}/{}/{}_{}_{}.deb",
                &spec.name[..1],
                spec.name,
                spec.name,
                file_version,
                spec.arch
            );
            let path = root.join(&rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &deb).unwrap();
            let sha = sha256_hex(&deb);
            index.push_str(&control(spec));
            index.push_str(&format!(
                "Filename: {rel}\nSize: {}\nSHA256: {sha}\n\n",
                deb.len()
            ));
            debs.insert(spec.name.to_string(), (spec.version.to_string(), sha, path));
        }
        let dist = root.join("dists").join(suite);
        let bin = dist.join("main/binary-amd64");
        std::fs::create_dir_all(bin.join("by-hash/SHA256")).unwrap();
        let packages_xz = xz(index.as_bytes());
        let xz_sha = sha256_hex(&packages_xz);
        std::fs::write(bin.join("Packages.xz"), &packages_xz).unwrap();
        std::fs::write(bin.join("by-hash/SHA256").join(&xz_sha), &packages_xz).unwrap();

        let release = format!(
            "Origin: kiln tests\nLabel: kiln tests\nSuite: {suite}\nCodename: {suite}\n\
             Date: Mon, 01 Jan 2024 00:00:00 UTC\nValid-Until: Fri, 01 Jan 2100 00:00:00 UTC\n\
             Acquire-By-Hash: yes\nNo-Support-for-Architecture-all: Packages\n\
             Architectures: amd64\nComponents: main\nDescription: kiln test repository\n\
             SHA256:\n {} {:>8} main/binary-amd64/Packages\n {} {:>8} main/binary-amd64/Packages.xz\n",
            sha256_hex(index.as_bytes()),
            index.len(),
            xz_sha,
            packages_xz.len()
        );
        let signed = if i == 0 {
            clearsign(
                &release,
                &[&stranger.primary_key, &trusted.secret_subkeys[0].key],
            )
        } else {
            clearsign(&release, &[&trusted.primary_key])
        };
        std::fs::write(dist.join("InRelease"), signed).unwrap();
    }
    Repo {
        _dir: dir,
        root,
        keyring,
        debs,
        trusted,
    }
}

impl Repo {
    fn source(&self, url: &str) -> RepoSource {
        RepoSource {
            url: url.to_string(),
            suites: vec![SUITE.to_string(), UPDATES.to_string()],
            components: vec!["main".to_string()],
            keyring: self.keyring.clone(),
        }
    }

    fn by_hash_index(&self, suite: &str) -> PathBuf {
        let dir = self
            .root
            .join("dists")
            .join(suite)
            .join("main/binary-amd64/by-hash/SHA256");
        std::fs::read_dir(dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn load_resolve_download(
    fetcher: &Fetcher,
    source: &RepoSource,
) -> anyhow::Result<Vec<(debian::Package, PathBuf)>> {
    let universe = Universe::load(fetcher, std::slice::from_ref(source), "amd64")?;
    let packages = universe.resolve(&strings(&["hello"]), &[])?;
    debian::download(fetcher, &packages)
}

#[test]
fn load_resolve_and_download() {
    let repo = build_repo();
    let server = Server::start(&repo.root, "/debian");
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();

    let universe = Universe::load(&fetcher, &[repo.source(&server.url())], "amd64").unwrap();
    assert_eq!(universe.len(), 5);
    // The updates suite's higher version wins.
    let libgreet = universe.get("libgreet").unwrap();
    assert_eq!(libgreet.version.as_str(), "1.2-1+deb13u1");
    assert_eq!(libgreet.suite, UPDATES);
    assert_eq!(libgreet.repo, server.url());

    let packages = universe.resolve(&strings(&["hello"]), &[]).unwrap();
    let names: Vec<String> = packages
        .iter()
        .map(|p| format!("{} {}", p.name, p.version))
        .collect();
    assert_eq!(
        names,
        [
            "base-files 13.8",
            "hello 1.0-1",
            "libgreet 1.2-1+deb13u1",
            "polite-greeter 2.0"
        ]
    );
    assert!(packages[0].essential);

    let downloaded = debian::download(&fetcher, &packages).unwrap();
    assert_eq!(downloaded.len(), 4);
    for (package, path) in &downloaded {
        let bytes = std::fs::read(path).unwrap();
        let (version, sha, _) = &repo.debs[&package.name];
        assert_eq!(package.version.as_str(), version);
        assert_eq!(&sha256_hex(&bytes), sha, "{}", package.name);
        assert_eq!(bytes.len() as u64, package.size);
        // A real .deb: an ar archive starting with debian-binary "2.0\n".
        let mut archive = ar::Archive::new(bytes.as_slice());
        let mut first = archive.next_entry().unwrap().unwrap();
        assert_eq!(first.header().identifier(), b"debian-binary");
        let mut content = String::new();
        first.read_to_string(&mut content).unwrap();
        assert_eq!(content, "2.0\n");
    }

    // A missing package names the chain; the universe holds only what the suites list.
    let err = universe.resolve(&strings(&["unrelated"]), &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "package not-in-any-suite (needed by unrelated) is not in any configured suite"
    );
}

/// A vendor's repository (Raspberry Pi's, say), signed by its own key, read
/// beside the main one: `[[debian.repositories]]` in a spec.
const VENDOR_SUITE: &str = "vendor-test";
const VENDOR_PACKAGES: &[DebSpec] = &[
    DebSpec {
        name: "vendor-firmware",
        version: "1.0-1",
        arch: "all",
        fields: "Depends: base-files\n",
    },
    DebSpec {
        name: "libgreet",
        version: "1.3-1+vendor1",
        arch: "amd64",
        fields: "Pre-Depends: base-files\nSection: libs\n",
    },
];

#[test]
fn a_second_repository_with_its_own_keyring() {
    let main = build_repo();
    let vendor = build_repo_with(42, &[(VENDOR_SUITE, VENDOR_PACKAGES)]);
    let main_server = Server::start(&main.root, "/debian");
    let vendor_server = Server::start(&vendor.root, "/vendor");
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();
    let vendor_source = RepoSource {
        url: vendor_server.url(),
        suites: vec![VENDOR_SUITE.into()],
        components: vec!["main".into()],
        keyring: vendor.keyring.clone(),
    };
    let sources = [main.source(&main_server.url()), vendor_source.clone()];
    let universe = Universe::load(&fetcher, &sources, "amd64").unwrap();
    let packages = universe
        .resolve(&strings(&["hello", "vendor-firmware"]), &[])
        .unwrap();
    let got: BTreeMap<String, (String, String)> = packages
        .iter()
        .map(|p| (p.name.clone(), (p.version.to_string(), p.repo.clone())))
        .collect();
    // The vendor's package, and its libgreet: the highest version wins.
    assert_eq!(
        got["vendor-firmware"],
        ("1.0-1".to_string(), vendor_server.url())
    );
    assert_eq!(
        got["libgreet"],
        ("1.3-1+vendor1".to_string(), vendor_server.url())
    );
    assert_eq!(got["hello"].1, main_server.url());
    for (package, path) in debian::download(&fetcher, &packages).unwrap() {
        let want = if package.repo == vendor_server.url() {
            &vendor.debs[&package.name]
        } else {
            &main.debs[&package.name]
        };
        assert_eq!(sha256_hex(&std::fs::read(path).unwrap()), want.1);
    }

    // The vendor's suite checked against the main repository's keyring:
    // refused, naming the vendor's InRelease.
    let wrong = RepoSource {
        keyring: main.keyring.clone(),
        ..vendor_source
    };
    let err =
        Universe::load(&fetcher, &[main.source(&main_server.url()), wrong], "amd64").unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(VENDOR_SUITE) && msg.contains(&vendor_server.url()),
        "{msg}"
    );
}

#[test]
fn armored_keyring_and_file_urls() {
    let repo = build_repo();
    let armored = repo.keyring.with_extension("asc");
    let text = repo
        .trusted
        .to_public_key()
        .to_armored_string(ArmorOptions::default())
        .unwrap();
    std::fs::write(&armored, text).unwrap();
    let mut source = repo.source(&format!("file://{}", repo.root.display()));
    source.keyring = armored;
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();
    let downloaded = load_resolve_download(&fetcher, &source).unwrap();
    assert_eq!(downloaded.len(), 4);
}

#[test]
fn tampered_inrelease_is_rejected() {
    let repo = build_repo();
    let path = repo.root.join("dists").join(UPDATES).join("InRelease");
    let text = std::fs::read_to_string(&path).unwrap();
    // Change one byte of the signed text.
    let tampered = text.replacen("Origin: kiln tests", "Origin: kiln testz", 1);
    assert_ne!(text, tampered);
    std::fs::write(&path, tampered).unwrap();

    let server = Server::start(&repo.root, "/debian");
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();
    let err = Universe::load(&fetcher, &[repo.source(&server.url())], "amd64").unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    let url = format!("{}/dists/{UPDATES}/InRelease", server.url());
    assert!(
        msg.starts_with(&format!(
            "verifying InRelease of {UPDATES} ({url}): no signature made by a key in {}",
            repo.keyring.display()
        )),
        "{msg}"
    );
    assert!(
        msg.contains("does not verify: the signed text does not match the signature"),
        "{msg}"
    );
}

#[test]
fn inrelease_signed_only_by_unknown_keys_is_rejected() {
    let repo = build_repo();
    let other = generate_key(3, "other");
    std::fs::write(&repo.keyring, public_keyring(&[&other])).unwrap();
    let server = Server::start(&repo.root, "/debian");
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();
    let err = Universe::load(&fetcher, &[repo.source(&server.url())], "amd64").unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    assert!(
        msg.starts_with(&format!("verifying InRelease of {SUITE} (")),
        "{msg}"
    );
    assert!(msg.contains("no signature made by a key in"), "{msg}");
    assert!(msg.contains("key not in the keyring"), "{msg}");
}

#[test]
fn tampered_packages_index_is_rejected() {
    let repo = build_repo();
    // Replace the served index (after signing) with another valid xz file.
    let index = repo.by_hash_index(SUITE);
    std::fs::write(&index, xz(b"Package: evil\nVersion: 1\n")).unwrap();

    let server = Server::start(&repo.root, "/debian");
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();
    let err = Universe::load(&fetcher, &[repo.source(&server.url())], "amd64").unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    assert!(
        msg.contains(&format!(
            "downloading Packages index main/binary-amd64/Packages.xz of {SUITE} from {}/dists/{SUITE}/main/binary-amd64/by-hash/SHA256/",
            server.url()
        )),
        "{msg}"
    );
    assert!(
        msg.contains("size mismatch") || msg.contains("sha256 mismatch"),
        "{msg}"
    );

    // Same size, different content: a sha256 mismatch.
    let genuine = repo
        .root
        .join("dists")
        .join(SUITE)
        .join("main/binary-amd64/Packages.xz");
    let mut same_size = std::fs::read(genuine).unwrap();
    let last = same_size.len() - 1;
    same_size[last] ^= 0xff;
    std::fs::write(&index, &same_size).unwrap();
    let err = Universe::load(&fetcher, &[repo.source(&server.url())], "amd64").unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    assert!(
        msg.contains(&format!(
            "Packages index main/binary-amd64/Packages.xz of {SUITE}"
        )),
        "{msg}"
    );
    assert!(msg.contains("sha256 mismatch: expected "), "{msg}");
}

#[test]
fn tampered_deb_is_rejected() {
    let repo = build_repo();
    let (_, _, path) = &repo.debs["hello"];
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(path, &bytes).unwrap();

    let server = Server::start(&repo.root, "/debian");
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();
    let err = load_resolve_download(&fetcher, &repo.source(&server.url())).unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    assert!(
        msg.starts_with("downloading package hello 1.0-1 from http://127.0.0.1:"),
        "{msg}"
    );
    assert!(msg.contains(": sha256 mismatch: expected "), "{msg}");
    // Nothing unverified entered the cache.
    assert!(Cache::new(cache.path()).get(&sha256_hex(&bytes)).is_none());
}

#[test]
fn offline_builds_from_the_cache() {
    let repo = build_repo();
    let mut server = Server::start(&repo.root, "/debian");
    let url = server.url();
    let cache = tempfile::tempdir().unwrap();
    let online = load_resolve_download(
        &Fetcher::new(Cache::new(cache.path()), false).unwrap(),
        &repo.source(&url),
    )
    .unwrap();
    server.shutdown();
    assert!(
        TcpStream::connect(server.addr).is_err(),
        "the server is stopped"
    );

    let offline = Fetcher::new(Cache::new(cache.path()), true).unwrap();
    let again = load_resolve_download(&offline, &repo.source(&url)).unwrap();
    assert_eq!(online, again);

    // An empty cache: the first thing needed is named.
    let empty = tempfile::tempdir().unwrap();
    let offline_empty = Fetcher::new(Cache::new(empty.path()), true).unwrap();
    let err = load_resolve_download(&offline_empty, &repo.source(&url)).unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    assert!(
        msg.contains(&format!(
            "InRelease of {SUITE} ({url}/dists/{SUITE}/InRelease) is missing from the cache"
        )),
        "{msg}"
    );
    assert!(msg.contains("--offline"), "{msg}");

    // Indexes cached but one .deb evicted: the package is named.
    let (_, sha, _) = &repo.debs["hello"];
    std::fs::remove_file(Cache::new(cache.path()).get(sha).unwrap()).unwrap();
    let err = load_resolve_download(&offline, &repo.source(&url)).unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    assert!(msg.starts_with("package hello 1.0-1 ("), "{msg}");
    assert!(msg.contains("is missing from the cache"), "{msg}");
}

#[test]
fn missing_by_hash_index_falls_back_to_the_plain_path() {
    let repo = build_repo();
    std::fs::remove_file(repo.by_hash_index(SUITE)).unwrap();
    let server = Server::start(&repo.root, "/debian");
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();
    let downloaded = load_resolve_download(&fetcher, &repo.source(&server.url())).unwrap();
    assert_eq!(downloaded.len(), 4);
}

#[test]
fn http_errors_name_url_and_status() {
    let repo = build_repo();
    let server = Server::start(&repo.root, "/debian");
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();
    let mut source = repo.source(&server.url());
    source.suites = vec!["no-such-suite".to_string()];
    let err = Universe::load(&fetcher, &[source], "amd64").unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    assert_eq!(
        msg,
        format!(
            "downloading InRelease of no-such-suite from {}/dists/no-such-suite/InRelease: the server answered HTTP 404 Not Found",
            server.url()
        )
    );
}

/// Against the host's real mirror and keyring: trixie main, amd64.
#[test]
#[ignore = "needs the host's Debian mirror (network)"]
fn real_archive_trixie() {
    let started = std::time::Instant::now();
    let sources = debian::sources_for_suites(
        &strings(&["trixie"]),
        &strings(&["main"]),
        Path::new(kiln_builder::spec::DEFAULT_KEYRING),
    )
    .unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = match std::env::var_os("KILN_CACHE") {
        Some(dir) => Cache::new(dir),
        None => Cache::new(cache_dir.path()),
    };
    let fetcher = Fetcher::new(cache, false).unwrap();
    let universe = Universe::load(
        &fetcher,
        &sources,
        kiln_builder::spec::Arch::X86_64.debian(),
    )
    .unwrap();
    let loaded = started.elapsed();
    let packages = universe
        .resolve(
            &strings(&["busybox-static", "linux-image-cloud-amd64"]),
            &[],
        )
        .unwrap();
    let resolved = started.elapsed();
    let names: Vec<String> = packages
        .iter()
        .map(|p| format!("{} {}", p.name, p.version))
        .collect();
    eprintln!("{} packages in the universe", universe.len());
    eprintln!("closure: {names:#?}");
    assert!(names.iter().any(|n| n.starts_with("busybox-static ")));
    assert!(names.iter().any(|n| n.starts_with("linux-image-6.")));

    // Download and verify the small one.
    let busybox: Vec<_> = packages
        .iter()
        .filter(|p| p.name == "busybox-static")
        .cloned()
        .collect();
    let downloaded = debian::download(&fetcher, &busybox).unwrap();
    let (_, path) = &downloaded[0];
    assert_eq!(sha256_hex(&std::fs::read(path).unwrap()), busybox[0].sha256);
    eprintln!(
        "load {:.1?}, resolve {:.1?}, download {:.1?}",
        loaded,
        resolved - loaded,
        started.elapsed() - resolved
    );
}

/// Against the host's real mirrors: trixie, trixie-updates and trixie-security
/// (a different archive, with Valid-Until and a separate binary-all index).
#[test]
#[ignore = "needs the host's Debian mirrors (network)"]
fn real_archive_trixie_with_security() {
    let started = std::time::Instant::now();
    let sources = debian::sources_for_suites(
        &strings(&["trixie", "trixie-updates", "trixie-security"]),
        &strings(&["main"]),
        Path::new(kiln_builder::spec::DEFAULT_KEYRING),
    )
    .unwrap();
    assert_eq!(sources.len(), 2, "main and security archives: {sources:?}");
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = match std::env::var_os("KILN_CACHE") {
        Some(dir) => Cache::new(dir),
        None => Cache::new(cache_dir.path()),
    };
    let fetcher = Fetcher::new(cache, false).unwrap();
    let universe = Universe::load(&fetcher, &sources, "amd64").unwrap();
    let packages = universe
        .resolve(
            &strings(&["busybox-static", "linux-image-cloud-amd64"]),
            &strings(&["initramfs-tools"]),
        )
        .unwrap();
    let from: BTreeMap<&str, usize> = packages.iter().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p.suite.as_str()).or_default() += 1;
        m
    });
    eprintln!(
        "{} packages in the universe; closure of {} packages by suite {from:?}; {:.1?}",
        universe.len(),
        packages.len(),
        started.elapsed()
    );
    assert!(!packages.iter().any(|p| p.name == "initramfs-tools"));
}
