//! End to end: real firmware network-boots the x86_64 PXE image through
//! `kiln serve`, inside network namespaces the test makes: QEMU's BIOS
//! (SeaBIOS with its iPXE NIC ROM) and UEFI (OVMF's own PXE, which loads
//! snponly.efi by TFTP, then iPXE), in full DHCP mode and in proxy mode beside
//! a separate address-only DHCP server (dnsmasq, in a second namespace on the
//! same bridge). `/api/machines` must show the machine's stages in order.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Firmware {
    Bios,
    Uefi,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dhcp {
    Full,
    Proxy,
}

#[test]
fn bios_pxe_full_dhcp() {
    netboot("bios-full", 61, Firmware::Bios, Dhcp::Full);
}

#[test]
fn bios_pxe_proxy_dhcp_beside_dnsmasq() {
    netboot("bios-proxy", 62, Firmware::Bios, Dhcp::Proxy);
}

#[test]
fn uefi_pxe_full_dhcp() {
    netboot("uefi-full", 63, Firmware::Uefi, Dhcp::Full);
}

#[test]
fn uefi_pxe_proxy_dhcp_beside_dnsmasq() {
    netboot("uefi-proxy", 64, Firmware::Uefi, Dhcp::Proxy);
}

fn netboot(tag: &str, subnet: u8, firmware: Firmware, dhcp: Dhcp) {
    if !is_root() {
        skip(tag, "needs root (network namespace, tap device)");
        return;
    }
    for prog in ["qemu-system-x86_64", "curl", "dnsmasq"] {
        if !have(prog) {
            skip(tag, &format!("{prog} not installed (bash .ci/setup)"));
            return;
        }
    }
    if firmware == Firmware::Uefi && !Path::new(OVMF_CODE).exists() {
        skip(tag, "OVMF not installed (apt-get install ovmf)");
        return;
    }
    // One guest at a time: two cores run TCG guests slowly enough.
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let images = image();
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

    let ns = Netns::create(tag, subnet);
    ns.add_tap("tap0");
    let net = format!("10.77.{subnet}");
    let mac = format!("52:54:00:{subnet:02x}:00:01");
    // Proxy mode: the site's DHCP server (addresses only) on another host.
    let _site_dhcp = (dhcp == Dhcp::Proxy).then(|| site_dhcp(&ns, &net, tmp.path()));
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
        .arg(images)
        .args([
            "--default-image",
            "pxe-x86_64",
            "--dhcp",
            if dhcp == Dhcp::Full { "full" } else { "proxy" },
        ])
        .args(["--range", &format!("{net}.100-{net}.150")])
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
    .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
    match firmware {
        // SeaBIOS runs the NIC's iPXE option ROM.
        Firmware::Bios => {
            qemu.args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")]);
        }
        // OVMF with its own virtio-net driver and PXE (no option ROM).
        Firmware::Uefi => {
            let vars = tmp.path().join("OVMF_VARS.fd");
            std::fs::copy(OVMF_VARS, &vars).unwrap();
            qemu.args(["-machine", "q35"])
                .args([
                    "-drive",
                    &format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
                ])
                .args([
                    "-drive",
                    &format!("if=pflash,format=raw,file={}", vars.display()),
                ])
                .args([
                    "-device",
                    &format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
                ]);
        }
    }
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
        .find(|m| m["mac"] == mac.as_str())
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
    if dhcp == Dhcp::Full {
        assert!(
            m["address"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{net}."))),
            "{machines}"
        );
    }
}

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Builds images/pxe-x86_64.toml once for all tests of this file.
fn image() -> &'static Path {
    static IMAGES: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("netboot-e2e");
        let www = dir.join("www");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&www).unwrap();
        k3s_release_layout(&www);
        let releases = HttpServer::start(&www);
        build_pxe("x86_64", &dir.join("images"), &releases, &[]);
        dir.join("images")
    })
}

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// An address-only DHCP server (dnsmasq, no DNS, no boot options) in a second
/// namespace joined to the bridge by a veth pair, like the site's DHCP server
/// on another host.
fn site_dhcp(ns: &Netns, net: &str, tmp: &Path) -> (Background, SiteNs) {
    let site = SiteNs(format!("{}-site", ns.name));
    let run = |args: &[&str]| {
        let st = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?}");
    };
    run(&["netns", "add", &site.0]);
    run(&[
        "-n", &ns.name, "link", "add", "vsite", "type", "veth", "peer", "name", "eth0", "netns",
        &site.0,
    ]);
    run(&[
        "-n", &ns.name, "link", "set", "vsite", "master", "br0", "up",
    ]);
    run(&["-n", &site.0, "link", "set", "lo", "up"]);
    run(&[
        "-n",
        &site.0,
        "addr",
        "add",
        &format!("{net}.2/24"),
        "dev",
        "eth0",
    ]);
    run(&["-n", &site.0, "link", "set", "eth0", "up"]);
    let child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &site.0,
            "dnsmasq",
            "--no-daemon",
            "--port=0",
            "--interface=eth0",
            "--bind-interfaces",
        ])
        .arg(format!("--dhcp-range={net}.200,{net}.220,1h"))
        .arg(format!(
            "--dhcp-leasefile={}",
            tmp.join("site.leases").display()
        ))
        .args([
            "--no-resolv",
            "--no-hosts",
            "--log-dhcp",
            "--conf-file=/dev/null",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.join("site-dhcp.log")).unwrap())
        .spawn()
        .unwrap();
    (Background(child), site)
}

/// The site DHCP server's namespace, removed when dropped.
struct SiteNs(String);

impl Drop for SiteNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}
