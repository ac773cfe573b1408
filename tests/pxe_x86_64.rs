//! End to end, x86_64: build images/pxe-x86_64.toml (twice, for
//! reproducibility; also as a non-root user), check the artifacts with real
//! tools, and boot it in QEMU (TCG).

mod common;

use std::process::Command;

use common::*;

const NODE: &str = "# node config served by the test
hostname: node-x86
k3s:
  token: \"test-token-x86\"
  node-label:
    - \"kiln.test/arch=x86_64\"

  write-kubeconfig-mode: \"0644\"
";

#[test]
fn pxe_x86_64_builds_reproducibly_and_boots() {
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    let server = release_server(&www);

    // The first build may take compressed blocks from earlier runs' cache;
    // the second compresses every block afresh. Equal bytes show both that
    // builds are reproducible and that the block cache changes nothing.
    let a = build_pxe("x86_64", &tmp.path().join("a"), &server, &[]);
    let _ = std::fs::remove_dir_all(shared_cache().join("squashfs"));
    let b = build_pxe("x86_64", &tmp.path().join("b"), &server, &[]);
    let (ma, mb) = (manifest(&a), manifest(&b));
    for name in ["vmlinuz", "initrd.img", "rootfs.squashfs"] {
        assert_eq!(
            artifact_sha(&ma, name),
            artifact_sha(&mb, name),
            "{name} differs between two builds"
        );
        let (sha, _) = kiln_builder::hash_file(&a.join(name)).unwrap();
        assert_eq!(
            sha,
            artifact_sha(&ma, name),
            "manifest sha256 of {name} is wrong"
        );
    }
    assert_eq!(
        std::fs::read(a.join("manifest.json")).unwrap(),
        std::fs::read(b.join("manifest.json")).unwrap()
    );
    check_artifacts(&a, &ma);

    // From the now warm cache, offline: the same bytes.
    let c = build_pxe(
        "x86_64",
        &tmp.path().join("c"),
        &server,
        &[("KILN_OFFLINE", "1".into())],
    );
    assert_eq!(
        std::fs::read(c.join("manifest.json")).unwrap(),
        std::fs::read(a.join("manifest.json")).unwrap()
    );

    let (ok, stdout, _) = kiln(&["inspect", a.to_str().unwrap()], &[]);
    assert!(
        ok && stdout.contains("rootfs.squashfs") && stdout.contains("busybox-static"),
        "{stdout}"
    );

    if is_root() && have("setpriv") {
        nonroot_build_matches(tmp.path(), &server, &ma);
    } else {
        skip(
            "non-root build",
            "not running as root (this test already ran as a non-root user)",
        );
    }

    if !have("qemu-system-x86_64") {
        skip(
            "pxe_x86_64 boot",
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)",
        );
        return;
    }
    boot_and_check("x86_64", &a, &server, NODE, "server");
    boot_refuses_bad_root("x86_64", &a, &server);
}

/// The same build by an unprivileged user (uid 65534) gives the same bytes.
fn nonroot_build_matches(tmp: &std::path::Path, server: &HttpServer, m: &serde_json::Value) {
    let cache = tmp.join("nobody-cache");
    let out = tmp.join("nobody-out");
    let st = Command::new("cp")
        .arg("-a")
        .arg(shared_cache())
        .arg(&cache)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::create_dir_all(&out).unwrap();
    for p in [&cache, &out] {
        assert!(Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(p)
            .status()
            .unwrap()
            .success());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "images/pxe-x86_64.toml", "--out"])
        .arg(&out)
        .current_dir(repo())
        .env("KILN_CACHE", &cache)
        .env("KILN_K3S_URL", server.url("releases"))
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "non-root build failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mn = manifest(&out.join("pxe-x86_64"));
    for name in ["vmlinuz", "initrd.img", "rootfs.squashfs"] {
        assert_eq!(
            artifact_sha(&mn, name),
            artifact_sha(m, name),
            "non-root {name} differs"
        );
    }
}
