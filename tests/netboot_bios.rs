//! End to end: QEMU's BIOS PXE (SeaBIOS with its iPXE NIC ROM) boots the
//! x86_64 PXE image through `kiln serve` in full DHCP mode, inside a network
//! namespace the test makes; `/api/machines` shows the stages in order.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn bios_pxe_boots_through_kiln_serve_full_mode() {
    if !is_root() {
        skip(
            "bios_pxe_boots_through_kiln_serve_full_mode",
            "needs root (network namespace, tap device)",
        );
        return;
    }
    if !have("qemu-system-x86_64") {
        skip(
            "bios_pxe_boots_through_kiln_serve_full_mode",
            "qemu-system-x86_64 not installed",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    k3s_release_layout(&www);
    let releases = HttpServer::start(&www);
    let images = tmp.path().join("images");
    build_pxe("x86_64", &images, &releases, &[]);

    // The namespace has no route out: fetch (and verify) the iPXE binaries
    // into the cache now; kiln serve then runs offline.
    let fetcher =
        kiln_builder::fetch::Fetcher::new(kiln_builder::cache::Cache::new(shared_cache()), false)
            .unwrap();
    kiln_netboot_server::ipxe::fetch(
        &fetcher,
        "trixie",
        std::path::Path::new(kiln_builder::spec::DEFAULT_KEYRING),
    )
    .expect("fetching iPXE from Debian");

    let ns = Netns::create("bios", 61);
    ns.add_tap("tap0");
    let ip = ns.server_ip();
    let config = tmp.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[dhcp]\nrouter = \"{ip}\"\ndns = [\"{ip}\"]\n\n[image.pxe-x86_64]\nkernel_args = \"console=ttyS0 panic=-1\"\n"
        ),
    )
    .unwrap();
    let serve = ns
        .command(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--interface", "br0", "--images"])
        .arg(&images)
        .args(["--default-image", "pxe-x86_64", "--dhcp", "full", "--range"])
        .arg("10.77.61.100-10.77.61.150")
        .args(["--http", &format!("{ip}:8080"), "--state"])
        .arg(tmp.path().join("state.db"))
        .env("KILN_CACHE", shared_cache())
        .env("KILN_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let mut serve = Background(serve);
    let serve_log = || std::fs::read_to_string(tmp.path().join("serve.log")).unwrap_or_default();
    // Wait until it answers HTTP (DHCP and TFTP are up by then).
    let start = Instant::now();
    loop {
        let up = ns
            .command("curl")
            .args([
                "-sf",
                "-o",
                "/dev/null",
                &format!("http://{ip}:8080/metrics"),
            ])
            .status()
            .unwrap();
        if up.success() {
            break;
        }
        if let Ok(Some(st)) = serve.0.try_wait() {
            panic!("kiln serve exited ({st}):\n{}", serve_log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "kiln serve did not come up:\n{}",
            serve_log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let mut qemu = ns.command("qemu-system-x86_64");
    qemu.args([
        "-m",
        "1024",
        "-nographic",
        "-no-reboot",
        "-accel",
        "tcg",
        "-boot",
        "n",
    ])
    .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
    .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:61:00:01"]);
    let guest = Guest::start(qemu);
    let start = Instant::now();
    while !guest.console().contains("k3s-standin: config-end") {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no boot within 300 s; console:\n{}\nkiln serve log:\n{}",
            guest.console(),
            serve_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The last stage report may still be on its way.
    let mut machines = String::new();
    for _ in 0..60 {
        let o = ns
            .command("curl")
            .args(["-sf", &format!("http://{ip}:8080/api/machines")])
            .output()
            .unwrap();
        machines = String::from_utf8_lossy(&o.stdout).into_owned();
        if machines.contains("k3s-started") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(guest);
    let v: serde_json::Value =
        serde_json::from_str(&machines).unwrap_or_else(|e| panic!("{e}: {machines}"));
    let m = v
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mac"] == "52:54:00:61:00:01")
        .expect("the guest is listed");
    let stages: Vec<&str> = m["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        ["initramfs", "network", "rootfs", "config", "k3s-started"],
        "{machines}\n{}",
        serve_log()
    );
    assert!(
        m["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("10.77.61.")),
        "{machines}"
    );
}
