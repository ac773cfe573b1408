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
    /// AAVMF (arm64 UEFI): its PXE loads ipxe-arm64.efi.
    UefiArm64,
    /// OVMF with PXE turned off: UEFI HTTP boot (HTTPClient) loads
    /// snponly.efi by HTTP.
    UefiHttp,
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

#[test]
fn arm64_uefi_pxe_full_dhcp() {
    netboot("arm64-full", 65, Firmware::UefiArm64, Dhcp::Full);
}

#[test]
fn uefi_http_boot_full_dhcp() {
    netboot("uefi-http-full", 66, Firmware::UefiHttp, Dhcp::Full);
}

fn netboot(tag: &str, subnet: u8, firmware: Firmware, dhcp: Dhcp) {
    if !is_root() {
        skip(tag, "needs root (network namespace, tap device)");
        return;
    }
    let (arch, qemu_bin, console) = match firmware {
        Firmware::UefiArm64 => ("aarch64", "qemu-system-aarch64", "ttyAMA0"),
        _ => ("x86_64", "qemu-system-x86_64", "ttyS0"),
    };
    for prog in [qemu_bin, "curl", "dnsmasq", "python3"] {
        if !have(prog) {
            skip(tag, &format!("{prog} not installed (bash .ci/setup)"));
            return;
        }
    }
    let firmware_file = match firmware {
        Firmware::Bios => None,
        Firmware::Uefi | Firmware::UefiHttp => Some((OVMF_CODE, OVMF_VARS, "ovmf")),
        Firmware::UefiArm64 => Some((AAVMF_CODE, AAVMF_VARS, "qemu-efi-aarch64")),
    };
    if let Some((code, _, pkg)) = firmware_file {
        if !Path::new(code).exists() {
            skip(
                tag,
                &format!("{code} not installed (apt-get install {pkg})"),
            );
            return;
        }
    }
    // One guest at a time: two cores run TCG guests slowly enough.
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let images = image(arch);
    // The namespace has no route out: fetch (and verify) the iPXE binaries
    // into the cache now; kiln serve then runs offline.
    prefetch_ipxe();

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
            "[dhcp]\nrouter = \"{ip}\"\ndns = [\"{ip}\"]\n\n[image.pxe-{arch}]\nkernel_args = \"console={console} panic=-1\"\n"
        ),
    )
    .unwrap();
    let serve_log = || std::fs::read_to_string(tmp.path().join("serve.log")).unwrap_or_default();
    let http = format!("{ip}:8080");
    let state = tmp.path().join("state.db");
    let log = &tmp.path().join("serve.log");
    let run = ServeRun {
        config: &config,
        images,
        default_image: &format!("pxe-{arch}"),
        dhcp: if dhcp == Dhcp::Full { "full" } else { "proxy" },
        net: &net,
        http: &http,
        state: &state,
        verbose: false,
        log,
    };
    // Returns once it answers HTTP (DHCP and TFTP are up by then).
    let start_serve = || start_kiln_serve(&ns, &run);
    let mut serve = start_serve();
    if tag == "bios-full" {
        // Garbage first: malformed DHCP and TFTP packets must not hurt the boot.
        flood(&ns, &ip);
    }

    let mut qemu = ns.command(qemu_bin);
    qemu.args(["-m", "1024", "-nographic", "-no-reboot", "-accel", "tcg"])
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
    match firmware {
        // SeaBIOS runs the NIC's iPXE option ROM.
        Firmware::Bios => {
            qemu.args([
                "-boot",
                "n",
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={mac}"),
            ]);
        }
        // UEFI firmware with its own virtio-net driver and PXE (no option ROM).
        Firmware::Uefi | Firmware::UefiHttp | Firmware::UefiArm64 => {
            let (code, vars_template, _) = firmware_file.unwrap();
            let vars = tmp.path().join("VARS.fd");
            std::fs::copy(vars_template, &vars).unwrap();
            if firmware != Firmware::UefiArm64 {
                qemu.args(["-machine", "q35", "-boot", "n"]);
            } else {
                qemu.args(["-machine", "virt", "-cpu", "cortex-a72"]);
            }
            qemu.args([
                "-drive",
                &format!("if=pflash,format=raw,readonly=on,file={code}"),
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
    if firmware == Firmware::UefiHttp {
        // OVMF's platform knobs: no PXE, so its boot manager tries HTTP boot.
        qemu.args([
            "-fw_cfg",
            "name=opt/org.tianocore/IPv4PXESupport,string=n",
            "-fw_cfg",
            "name=opt/org.tianocore/IPv6PXESupport,string=n",
        ]);
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
        if machines.contains("k3s-ready") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let first_console = guest.console();
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
    assert_eq!(stages, BOOT_STAGES, "{machines}\n{}", serve_log());
    if dhcp == Dhcp::Full {
        assert!(
            m["address"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{net}."))),
            "{machines}"
        );
    }
    let get_metrics = || {
        let o = ns
            .command("curl")
            .args(["-sf", &format!("http://{ip}:8080/metrics")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    if firmware == Firmware::UefiHttp {
        // iPXE came by HTTP (the firmware's HTTP boot), nothing by TFTP.
        let metrics = get_metrics();
        assert!(
            metrics
                .lines()
                .any(|l| l.contains("route=\"/ipxe/{file}\",status=\"200\"") && !l.ends_with(" 0")),
            "{metrics}"
        );
        assert!(
            metrics.lines().any(|l| l == "kiln_tftp_bytes_sent_total 0"),
            "{metrics}"
        );
    }
    if tag == "bios-full" {
        // The flood arrived and was counted, and the boot went on regardless
        // (SeaBIOS' iPXE ROM fetches its script by HTTP, so no TFTP data here).
        let metrics = get_metrics();
        let value = |name: &str| -> u64 {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        assert!(value("kiln_dhcp_malformed_total ") >= 1000, "{metrics}");
        assert!(value("kiln_tftp_malformed_total ") >= 100, "{metrics}");
        // kill -9 and a restart keep the machine and its stages.
        drop(serve);
        serve = start_serve();
        let o = ns
            .command("curl")
            .args(["-sf", &format!("http://{ip}:8080/api/machines")])
            .output()
            .unwrap();
        let after: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let m2 = after
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mac"] == mac.as_str())
            .expect("kept after kill -9");
        assert_eq!(
            m2["stages"], m["stages"],
            "stages changed across kill -9 and restart"
        );
        assert_eq!(m2["address"], m["address"]);

        // The diskless node reboots: it makes a new secret (its old one was
        // in RAM), which the server takes once after its network boot; it
        // keeps its name.
        let mut q = ns.command(qemu_bin);
        q.args(["-m", "1024", "-nographic", "-no-reboot", "-accel", "tcg"])
            .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
            .args(["-boot", "n", "-device"])
            .arg(format!("virtio-net-pci,netdev=n0,mac={mac}"));
        let mut again = Guest::start(q);
        again.wait_for("k3s-standin: config-end", Duration::from_secs(300));
        let console = again.console();
        let hostname = |c: &str| {
            c.lines()
                .find(|l| l.starts_with("k3s-standin: hostname="))
                .map(str::to_string)
        };
        assert_eq!(hostname(&console), hostname(&first_console));
        assert!(
            console.contains("kiln: node secret: new")
                && console.contains("kiln: stage=config\n")
                && !console.contains("config-cached"),
            "{console}\n{}",
            serve_log()
        );
        assert!(
            serve_log().contains("a diskless member network-booted and sent a new secret"),
            "{}",
            serve_log()
        );
    }
    drop(serve);
}

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Builds images/pxe-<arch>.toml once for all tests of this file.
fn image(arch: &str) -> &'static Path {
    static X86_64: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    static AARCH64: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let cell = if arch == "aarch64" { &AARCH64 } else { &X86_64 };
    cell.get_or_init(|| {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("netboot-e2e-{arch}"));
        let www = dir.join("www");
        let _ = std::fs::remove_dir_all(&dir);
        let releases = release_server(&www);
        build_pxe(arch, &dir.join("images"), &releases, &[]);
        dir.join("images")
    })
}

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";

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

/// Sends malformed and truncated DHCP (67, 4011) and TFTP (69) datagrams to
/// the server inside the namespace: 3000 in all, from python3's socket module.
fn flood(ns: &Netns, ip: &str) {
    let script = format!(
        r#"
import os, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(1000):
    n = i % 300
    junk = os.urandom(n)
    # a DHCP header with a bad option length, truncated packets, noise
    dhcp = bytes([1, 1, 6, 0]) + os.urandom(232) + bytes([99, 130, 83, 99, 53, 200, 1])
    s.sendto(dhcp[: 240 + (i % 8)], ("{ip}", 67))
    s.sendto(junk, ("{ip}", 4011))
    tftp = [b"\x00\x01" + junk, b"\x00\x01file", b"\x00\x05\x00\x00", b"\x00\x09", junk][i % 5]
    s.sendto(tftp, ("{ip}", 69))
"#
    );
    let st = ns
        .command("python3")
        .arg("-c")
        .arg(script)
        .status()
        .unwrap();
    assert!(st.success(), "the flood script failed");
}
