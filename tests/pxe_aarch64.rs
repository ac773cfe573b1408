//! End to end, aarch64: build images/pxe-aarch64.toml and boot it in QEMU
//! (`-M virt`, TCG) as a k3s agent.

mod common;

use common::*;

const NODE: &str = "hostname: node-arm
role: agent
k3s:
  server: \"https://10.0.2.2:6443\"
  token: \"test-token-arm\"
  node-label:
    - \"kiln.test/arch=aarch64\"
";

#[test]
fn pxe_aarch64_builds_and_boots_as_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    let server = release_server(&www);
    let image = build_pxe("aarch64", &tmp.path().join("out"), &server, &[]);
    check_artifacts(&image, &manifest(&image));
    if !have("qemu-system-aarch64") {
        skip(
            "pxe_aarch64 boot",
            "qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)",
        );
        return;
    }
    boot_and_check("aarch64", &image, &server, NODE, "agent");
    boot_refuses_bad_root("aarch64", &image, &server);
}
