//! The kiln command line: errors that name the file, key and line, and
//! `kiln inspect` catching a changed artifact. Quick: no network, no QEMU.

mod common;

use common::kiln;

#[test]
fn a_bad_spec_names_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(common::repo().join("images/pxe-x86_64.toml"))
        .unwrap()
        .replace("arch = \"x86_64\"", "arch = \"sparc\"");
    std::fs::write(&spec, text).unwrap();
    let (ok, _, err) = kiln(&["build", spec.to_str().unwrap()], &[]);
    assert!(!ok);
    let line = std::fs::read_to_string(&spec)
        .unwrap()
        .lines()
        .position(|l| l.starts_with("arch"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("bad.toml:{line}:8: arch: unknown variant `sparc`")),
        "{err}"
    );

    let (ok, _, err) = kiln(&["build", "/nonexistent/spec.toml"], &[]);
    assert!(
        !ok && err.contains("/nonexistent/spec.toml: cannot read the spec"),
        "{err}"
    );
}

#[test]
fn offline_with_an_empty_cache_names_what_is_missing() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (ok, _, err) = kiln(
        &[
            "build",
            "images/pxe-x86_64.toml",
            "--offline",
            "--out",
            out.path().to_str().unwrap(),
        ],
        &[
            ("KILN_CACHE", cache.path().display().to_string()),
            ("KILN_DEBIAN_MIRROR", "http://127.0.0.1:9/debian".into()),
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("InRelease of trixie") && err.contains("missing from the cache"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "a failed build left files behind"
    );
}

#[test]
fn inspect_reports_a_changed_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path();
    std::fs::write(img.join("vmlinuz"), b"kernel bytes").unwrap();
    let (sha, size) = kiln_builder::hash_file(&img.join("vmlinuz")).unwrap();
    let manifest = serde_json::json!({
        "name": "t", "arch": "x86_64", "kiln_version": "0", "spec_sha256": "00", "source_date_epoch": 0,
        "kernel": {"package": "linux-image-x", "version": "6.0"},
        "k3s": null,
        "artifacts": [{"name": "vmlinuz", "sha256": sha, "size": size}],
        "packages": [{"name": "busybox-static", "version": "1:1.37.0-6", "architecture": "amd64", "sha256": "ab", "size": 1}]
    });
    std::fs::write(img.join("manifest.json"), manifest.to_string()).unwrap();
    let (ok, out, _) = kiln(&["inspect", img.to_str().unwrap()], &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("busybox-static") && out.contains(&sha) && out.contains(" ok"),
        "{out}"
    );
    std::fs::write(img.join("vmlinuz"), b"kernel bytez").unwrap();
    let (ok, out, _) = kiln(&["inspect", img.to_str().unwrap()], &[]);
    assert!(!ok && out.contains("MISMATCH"), "{out}");
    std::fs::remove_file(img.join("vmlinuz")).unwrap();
    let (ok, out, _) = kiln(&["inspect", img.to_str().unwrap()], &[]);
    assert!(!ok && out.contains("MISSING"), "{out}");
}

#[test]
fn forget_secret_names_a_machine_that_is_not_a_member() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let (ok, _, err) = kiln(
        &[
            "forget-secret",
            "52:54:00:00:00:01",
            "--state",
            state.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        !ok && err.contains("52:54:00:00:00:01 is not a cluster member in"),
        "{err}"
    );
    let (ok, _, err) = kiln(
        &["forget-secret", "52:54", "--state", state.to_str().unwrap()],
        &[],
    );
    assert!(
        !ok && err.contains("\"52:54\" is not a MAC address"),
        "{err}"
    );
}
