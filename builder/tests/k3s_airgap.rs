//! k3s air-gap image tarballs through the real download path: a k3s release
//! layout (`download/<tag>/...` with sha256sum files) served on 127.0.0.1 and
//! named by `KILN_K3S_URL`, fetched by `k3s::fetch`, checked against the
//! release's sha256sum file, laid into a root tree; a tampered asset and an
//! asset the sha256sum file does not list fail with errors that name it.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::Server;
use kiln_builder::cache::{sha256_hex, Cache};
use kiln_builder::fetch::Fetcher;
use kiln_builder::k3s;
use kiln_builder::spec::{Arch, K3s};
use kiln_builder::tree::Tree;

/// A release whose assets match its sha256sum files.
const GOOD: &str = "v1.33.5+k3s1";
/// A release whose air-gap tarball was changed after its sums were written.
const TAMPERED: &str = "v1.33.5+k3s2";
const AIRGAP_AMD64: &str = "k3s-airgap-images-amd64.tar.zst";
const AIRGAP_ARM64: &str = "k3s-airgap-images-arm64.tar.zst";

/// Stand-in bytes for an asset (not a real tarball: only the bytes matter).
fn asset_bytes(name: &str) -> Vec<u8> {
    (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 ^ name.len() as u8)
        .collect()
}

/// Writes `<root>/download/<tag>/` with k3s, k3s-arm64, both air-gap
/// tarballs and the two sha256sum files.
fn release(root: &Path, tag: &str, tamper: bool) {
    let dir = root.join("download").join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let mut sums = [String::new(), String::new()];
    for (asset, i) in [
        ("k3s", 0),
        (AIRGAP_AMD64, 0),
        ("k3s-arm64", 1),
        (AIRGAP_ARM64, 1),
    ] {
        let bytes = asset_bytes(asset);
        sums[i].push_str(&format!("{}  {asset}\n", sha256_hex(&bytes)));
        let mut served = bytes;
        if tamper && asset.starts_with("k3s-airgap") {
            served[1000] ^= 1;
        }
        std::fs::write(dir.join(asset), served).unwrap();
    }
    std::fs::write(dir.join("sha256sum-amd64.txt"), &sums[0]).unwrap();
    std::fs::write(dir.join("sha256sum-arm64.txt"), &sums[1]).unwrap();
}

/// One loopback server for every test of this file: `KILN_K3S_URL` is
/// process-wide, so all tests point it at the same place.
fn server() -> &'static SocketAddr {
    static SERVER: OnceLock<Server> = OnceLock::new();
    &SERVER
        .get_or_init(|| {
            let root = tempfile::tempdir().unwrap().keep();
            release(&root, GOOD, false);
            release(&root, TAMPERED, true);
            let server = Server::start(&root, "");
            // Safe enough here: every test sets the same value before reading it.
            std::env::set_var("KILN_K3S_URL", format!("{}/", server.url()));
            server
        })
        .addr
}

fn spec(tag: &str, images: &[&str], files: &[PathBuf]) -> K3s {
    K3s {
        version: tag.to_string(),
        sha256: None,
        file: None,
        airgap_images: images.iter().map(|s| s.to_string()).collect(),
        airgap_files: files.to_vec(),
    }
}

#[test]
fn airgap_assets_are_fetched_verified_and_laid() {
    let addr = server();
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();
    let local_dir = tempfile::tempdir().unwrap();
    let local = local_dir.path().join("extra-images.tar");
    std::fs::write(&local, b"a local tarball").unwrap();

    let got = k3s::fetch(
        &fetcher,
        &spec(GOOD, &[AIRGAP_AMD64], std::slice::from_ref(&local)),
        Arch::X86_64,
    )
    .unwrap();
    assert_eq!(got.sha256, sha256_hex(&asset_bytes("k3s")));
    let names: Vec<&str> = got.airgap.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, [AIRGAP_AMD64, "extra-images.tar"]);
    assert_eq!(got.airgap[0].sha256, sha256_hex(&asset_bytes(AIRGAP_AMD64)));
    assert_eq!(
        got.airgap[0].source,
        format!("http://{addr}/download/v1.33.5%2Bk3s1/{AIRGAP_AMD64}")
    );
    assert_eq!(got.airgap[1].sha256, sha256_hex(b"a local tarball"));
    assert_eq!(got.airgap[1].source, local.display().to_string());

    let mut tree = Tree::new();
    k3s::lay_airgap(&mut tree, &got.airgap).unwrap();
    let laid = |name: &str| {
        tree.read(&format!("var/lib/rancher/k3s/agent/images/{name}"))
            .unwrap_or_else(|| panic!("{name} not laid"))
            .to_vec()
    };
    assert_eq!(laid(AIRGAP_AMD64), asset_bytes(AIRGAP_AMD64));
    assert_eq!(laid("extra-images.tar"), b"a local tarball");
    let entry = tree
        .get(&format!("var/lib/rancher/k3s/agent/images/{AIRGAP_AMD64}"))
        .unwrap();
    assert_eq!(entry.mode, 0o644);

    // Offline, the same release comes from the cache.
    let offline = Fetcher::new(Cache::new(cache.path()), true).unwrap();
    let again = k3s::fetch(&offline, &spec(GOOD, &[AIRGAP_AMD64], &[]), Arch::X86_64).unwrap();
    assert_eq!(again.airgap[0].path, got.airgap[0].path);
}

#[test]
fn the_arm64_tarball_comes_with_a_local_k3s_binary() {
    server();
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("k3s");
    std::fs::write(&binary, b"a local k3s").unwrap();
    let mut s = spec(GOOD, &[AIRGAP_ARM64], &[]);
    s.file = Some(binary.clone());
    let got = k3s::fetch(&fetcher, &s, Arch::Aarch64).unwrap();
    assert_eq!(got.path, binary);
    assert_eq!(got.airgap[0].sha256, sha256_hex(&asset_bytes(AIRGAP_ARM64)));
}

#[test]
fn a_tampered_airgap_asset_is_refused_by_name() {
    server();
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();
    let e = k3s::fetch(
        &fetcher,
        &spec(TAMPERED, &[AIRGAP_AMD64], &[]),
        Arch::X86_64,
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains(&format!("fetching the k3s air-gap images {AIRGAP_AMD64}")),
        "{e}"
    );
    assert!(e.contains("sha256 mismatch"), "{e}");
    // Nothing unverified is left in the cache.
    let bad = sha256_hex(&{
        let mut b = asset_bytes(AIRGAP_AMD64);
        b[1000] ^= 1;
        b
    });
    assert!(Cache::new(cache.path()).get(&bad).is_none());
}

#[test]
fn an_asset_the_sums_do_not_list_is_refused_by_name() {
    server();
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(Cache::new(cache.path()), false).unwrap();
    let e = k3s::fetch(
        &fetcher,
        &spec(GOOD, &["k3s-airgap-images-amd64.tar.gz"], &[]),
        Arch::X86_64,
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("sha256sum-amd64.txt has no sha256 for k3s-airgap-images-amd64.tar.gz"),
        "{e}"
    );
}
