//! The DHCP decision, from real request bytes (tests/fixtures/dhcp/, see its
//! README: captured from QEMU firmware and busybox udhcpc, the Raspberry Pi 4
//! packet constructed from a published decode) and from requests derived
//! from them, in proxy and full mode.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use kiln_netboot_server::config::Admission;
use kiln_netboot_server::dhcp::decide::raspberry_pi_options;
use kiln_netboot_server::dhcp::packet::{encode, parse};
use kiln_netboot_server::dhcp::{
    apply, classify, client_mac, decide, BootArch, BootFiles, ClientKind, Decision, DhcpConfig,
    DhcpContext, Ignored, Inventory, LeaseOp, LeaseState, LeaseStore, MacAddr, MachineInfo,
    MemoryLeaseStore, Mode, NoInventory, PiModel, Pool, Port, Reply, ReplyTo, Request,
};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const NOW: i64 = 1_700_000_000;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn msg(name: &str) -> Message {
    parse(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn proxy_config() -> DhcpConfig {
    DhcpConfig {
        mode: Mode::Proxy,
        server_addr: SERVER,
        boot: BootFiles::with_http_base("http://{server}:8080"),
    }
}

fn pool() -> Pool {
    let mut p = Pool::new(ip("10.0.0.100"), ip("10.0.0.199"), ip("255.255.255.0"));
    p.router = Some(ip("10.0.0.254"));
    p.dns = vec![ip("10.0.0.53")];
    p.domain = Some("lab.example".into());
    p
}

fn full_config() -> DhcpConfig {
    DhcpConfig {
        mode: Mode::Full(pool()),
        ..proxy_config()
    }
}

/// A test world: configuration, inventory, leases, time.
struct World {
    config: DhcpConfig,
    admission: Admission,
    inventory: BTreeMap<MacAddr, MachineInfo>,
    leases: MemoryLeaseStore,
    now: i64,
}

impl World {
    fn proxy() -> World {
        World {
            config: proxy_config(),
            admission: Admission::Auto,
            inventory: BTreeMap::new(),
            leases: MemoryLeaseStore::new(),
            now: NOW,
        }
    }

    fn full() -> World {
        World {
            config: full_config(),
            ..World::proxy()
        }
    }

    fn decide_at(&self, m: &Message, port: Port, src: SocketAddrV4) -> Decision {
        let ctx = DhcpContext {
            config: &self.config,
            admission: self.admission,
            inventory: &self.inventory,
            leases: &self.leases,
            now: self.now,
        };
        decide(
            &Request {
                msg: m.clone(),
                port,
                src,
            },
            &ctx,
        )
    }

    fn decide(&self, m: &Message) -> Decision {
        self.decide_at(m, Port::Dhcp, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68))
    }

    /// Decides and applies the lease change, as the server does.
    fn step(&mut self, m: &Message) -> Decision {
        let d = self.decide(m);
        let op = match &d {
            Decision::Reply(r) => r.lease.clone(),
            Decision::Record(op) => Some(op.clone()),
            Decision::Ignore(_) => None,
        };
        if let Some(op) = op {
            apply(&mut self.leases, &op).unwrap();
        }
        d
    }
}

fn reply(d: &Decision) -> &Reply {
    d.reply()
        .unwrap_or_else(|| panic!("expected a reply, got {d:?}"))
}

fn opt(m: &Message, code: OptionCode) -> Option<&DhcpOption> {
    m.opts().get(code)
}

fn bytes_opt(m: &Message, code: OptionCode) -> Option<Vec<u8>> {
    match opt(m, code)? {
        DhcpOption::ClassIdentifier(v)
        | DhcpOption::BootfileName(v)
        | DhcpOption::VendorExtensions(v)
        | DhcpOption::TFTPServerName(v)
        | DhcpOption::ClientMachineIdentifier(v) => Some(v.clone()),
        other => panic!("{other:?} is not a bytes option"),
    }
}

fn text_opt(m: &Message, code: OptionCode) -> Option<String> {
    bytes_opt(m, code).map(|v| String::from_utf8(v).unwrap())
}

fn msg_type(m: &Message) -> MessageType {
    m.opts().msg_type().unwrap()
}

fn file(m: &Message) -> Option<String> {
    m.fname_str().map(|r| r.unwrap().to_string())
}

fn kind(name: &str) -> ClientKind {
    let m = msg(name);
    classify(&m, client_mac(&m)).kind
}

/// The checks every reply to a request passes.
fn check_reply_basics(req: &Message, r: &Message) {
    assert_eq!(r.xid(), req.xid());
    assert_eq!(r.chaddr(), req.chaddr());
    assert_eq!(r.giaddr(), req.giaddr());
    assert_eq!(r.flags(), req.flags());
    assert_eq!(
        opt(r, OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );
    // It encodes, to at least the BOOTP minimum, and decodes to the same.
    let bytes = encode(r).unwrap();
    assert!(bytes.len() >= 300);
    assert_eq!(encode(&parse(&bytes).unwrap()).unwrap(), bytes);
}

/// The checks every proxyDHCP reply passes: no address, boot information
/// from this server, the client's GUID echoed.
fn check_proxy_reply(req: &Message, r: &Message) {
    check_reply_basics(req, r);
    assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(r.siaddr(), SERVER);
    assert!(opt(r, OptionCode::AddressLeaseTime).is_none());
    assert!(opt(r, OptionCode::SubnetMask).is_none());
    assert_eq!(
        bytes_opt(r, OptionCode::ClientMachineIdentifier),
        bytes_opt(req, OptionCode::ClientMachineIdentifier)
    );
}

// ---- classification of the fixtures

#[test]
fn fixtures_classify() {
    assert_eq!(
        kind("seabios-ipxe-discover.bin"),
        ClientKind::Ipxe(Some(BootArch::X86Bios))
    );
    assert_eq!(
        kind("ovmf-x64-discover.bin"),
        ClientKind::Pxe(BootArch::X64Uefi)
    );
    assert_eq!(
        kind("aavmf-arm64-discover.bin"),
        ClientKind::Pxe(BootArch::Arm64Uefi)
    );
    assert_eq!(
        kind("ovmf-x64-http-discover.bin"),
        ClientKind::Http(BootArch::X64Uefi)
    );
    assert_eq!(
        kind("rpi4-discover.bin"),
        ClientKind::RaspberryPi(PiModel::Pi4)
    );
    assert_eq!(kind("udhcpc-discover.bin"), ClientKind::Other);
    for f in [
        "seabios-ipxe-discover.bin",
        "ovmf-x64-discover.bin",
        "aavmf-arm64-discover.bin",
        "ovmf-x64-http-discover.bin",
        "rpi4-discover.bin",
        "udhcpc-discover.bin",
    ] {
        assert_eq!(msg_type(&msg(f)), MessageType::Discover, "{f}");
    }
}

// ---- proxyDHCP, one client kind at a time

#[test]
fn proxy_seabios_ipxe_rom_gets_its_script_url() {
    // QEMU's NIC ROM is iPXE: its very first DISCOVER carries user class
    // "iPXE" (and arch 0), so it skips the TFTP stage.
    let w = World::proxy();
    let req = msg("seabios-ipxe-discover.bin");
    let d = w.decide(&req);
    let r = reply(&d);
    assert_eq!(msg_type(&r.msg), MessageType::Offer);
    check_proxy_reply(&req, &r.msg);
    let url = "http://10.0.0.1:8080/boot.ipxe?mac=52:54:00:12:34:01";
    assert_eq!(file(&r.msg).as_deref(), Some(url));
    assert_eq!(
        text_opt(&r.msg, OptionCode::BootfileName).as_deref(),
        Some(url)
    );
    assert_eq!(
        text_opt(&r.msg, OptionCode::ClassIdentifier).as_deref(),
        Some("PXEClient")
    );
    assert!(opt(&r.msg, OptionCode::VendorExtensions).is_none());
    // No broadcast flag, no address yet: broadcast.
    assert_eq!(r.to, ReplyTo::Broadcast);
    assert_eq!(r.lease, None);
}

#[test]
fn proxy_bios_pxe_rom_gets_undionly() {
    // A BIOS PXE ROM that is not iPXE: the SeaBIOS packet without iPXE's
    // user class and encapsulated options.
    let mut req = msg("seabios-ipxe-discover.bin");
    req.opts_mut().remove(OptionCode::UserClass);
    req.opts_mut().retain(|c, _| u8::from(*c) != 175);
    assert_eq!(
        classify(&req, client_mac(&req)).kind,
        ClientKind::Pxe(BootArch::X86Bios)
    );
    let d = World::proxy().decide(&req);
    let r = reply(&d);
    check_proxy_reply(&req, &r.msg);
    assert_eq!(file(&r.msg).as_deref(), Some("undionly.kpxe"));
    assert_eq!(
        bytes_opt(&r.msg, OptionCode::VendorExtensions),
        Some(vec![6, 1, 8, 255])
    );
}

#[test]
fn proxy_ovmf_gets_snponly_by_tftp() {
    let req = msg("ovmf-x64-discover.bin");
    let d = World::proxy().decide(&req);
    let r = reply(&d);
    assert_eq!(msg_type(&r.msg), MessageType::Offer);
    check_proxy_reply(&req, &r.msg);
    assert_eq!(file(&r.msg).as_deref(), Some("snponly.efi"));
    assert_eq!(
        text_opt(&r.msg, OptionCode::ClassIdentifier).as_deref(),
        Some("PXEClient")
    );
    // PXE_DISCOVERY_CONTROL = 8: boot the file of this offer.
    assert_eq!(
        bytes_opt(&r.msg, OptionCode::VendorExtensions),
        Some(vec![6, 1, 8, 255])
    );
    // OVMF sets the broadcast flag; the reply is broadcast either way.
    assert!(req.flags().broadcast());
    assert_eq!(r.to, ReplyTo::Broadcast);
}

#[test]
fn proxy_ovmf_x64_file_is_configurable() {
    let mut w = World::proxy();
    w.config.boot.uefi_x64 = "ipxe-amd64.efi".into();
    let d = w.decide(&msg("ovmf-x64-discover.bin"));
    assert_eq!(file(&reply(&d).msg).as_deref(), Some("ipxe-amd64.efi"));
}

#[test]
fn proxy_aavmf_gets_the_arm64_binary() {
    let req = msg("aavmf-arm64-discover.bin");
    let d = World::proxy().decide(&req);
    let r = reply(&d);
    check_proxy_reply(&req, &r.msg);
    assert_eq!(file(&r.msg).as_deref(), Some("ipxe-arm64.efi"));
    assert_eq!(
        text_opt(&r.msg, OptionCode::ClassIdentifier).as_deref(),
        Some("PXEClient")
    );
}

#[test]
fn proxy_uefi_http_boot_gets_a_url_and_httpclient() {
    let req = msg("ovmf-x64-http-discover.bin");
    let d = World::proxy().decide(&req);
    let r = reply(&d);
    check_proxy_reply(&req, &r.msg);
    let url = "http://10.0.0.1:8080/ipxe/snponly.efi";
    assert_eq!(
        text_opt(&r.msg, OptionCode::BootfileName).as_deref(),
        Some(url)
    );
    assert_eq!(file(&r.msg).as_deref(), Some(url));
    // EDK2's HTTP boot takes only offers that say HTTPClient.
    assert_eq!(
        text_opt(&r.msg, OptionCode::ClassIdentifier).as_deref(),
        Some("HTTPClient")
    );
    assert!(opt(&r.msg, OptionCode::VendorExtensions).is_none());
}

#[test]
fn proxy_arm64_http_boot() {
    let mut req = msg("ovmf-x64-http-discover.bin");
    req.opts_mut()
        .insert(DhcpOption::ClientSystemArchitecture(19.into()));
    req.opts_mut().insert(DhcpOption::ClassIdentifier(
        b"HTTPClient:Arch:00019:UNDI:003001".to_vec(),
    ));
    let d = World::proxy().decide(&req);
    assert_eq!(
        text_opt(&reply(&d).msg, OptionCode::BootfileName).as_deref(),
        Some("http://10.0.0.1:8080/ipxe/ipxe-arm64.efi")
    );
}

#[test]
fn long_urls_go_in_option_67_only() {
    let mut w = World::proxy();
    let long = format!("http://{{server}}:8080/{}", "x".repeat(200));
    w.config.boot.ipxe_script = long.clone();
    let d = w.decide(&msg("seabios-ipxe-discover.bin"));
    let r = reply(&d);
    assert_eq!(file(&r.msg), None);
    assert_eq!(
        text_opt(&r.msg, OptionCode::BootfileName),
        Some(long.replace("{server}", "10.0.0.1"))
    );
    // Encodes and parses back.
    let back = parse(&encode(&r.msg).unwrap()).unwrap();
    assert_eq!(back.opts(), r.msg.opts());
}

#[test]
fn proxy_raspberry_pi_4_gets_the_pi_boot_menu() {
    let req = msg("rpi4-discover.bin");
    let d = World::proxy().decide(&req);
    let r = reply(&d);
    assert_eq!(msg_type(&r.msg), MessageType::Offer);
    check_proxy_reply(&req, &r.msg);
    assert_eq!(
        bytes_opt(&r.msg, OptionCode::VendorExtensions),
        Some(raspberry_pi_options("Raspberry Pi Boot"))
    );
    let o43 = bytes_opt(&r.msg, OptionCode::VendorExtensions).unwrap();
    assert!(o43.windows(17).any(|w| w == b"Raspberry Pi Boot"));
    assert_eq!(
        text_opt(&r.msg, OptionCode::TFTPServerName).as_deref(),
        Some("10.0.0.1")
    );
    assert_eq!(
        text_opt(&r.msg, OptionCode::ClassIdentifier).as_deref(),
        Some("PXEClient")
    );
    // Option 97 echoed byte for byte, "RPi4" and all.
    let guid = bytes_opt(&r.msg, OptionCode::ClientMachineIdentifier).unwrap();
    assert_eq!(&guid[1..5], b"RPi4");
    // The bootloader fetches fixed names: no boot file.
    assert_eq!(file(&r.msg), None);
    assert!(opt(&r.msg, OptionCode::BootfileName).is_none());
}

#[test]
fn raspberry_pi_5_and_oui_fallback() {
    // Pi 5: the same bootloader request with FourCC "RPi5" (documented for
    // DHCP_OPTION97 on Pi 5), behind a MAC that is not a Pi OUI.
    let mut req = msg("rpi4-discover.bin");
    let mut guid = bytes_opt(&req, OptionCode::ClientMachineIdentifier).unwrap();
    guid[1..5].copy_from_slice(b"RPi5");
    req.opts_mut()
        .insert(DhcpOption::ClientMachineIdentifier(guid));
    req.set_chaddr(&[0x52, 0x54, 0, 9, 9, 9]);
    assert_eq!(
        classify(&req, client_mac(&req)).kind,
        ClientKind::RaspberryPi(PiModel::Pi5)
    );
    assert!(reply(&World::proxy().decide(&req))
        .msg
        .opts()
        .contains(OptionCode::VendorExtensions));

    // DHCP_OPTION97=0 (the serial four times): recognised by the OUI only.
    let mut req = msg("rpi4-discover.bin");
    req.opts_mut().insert(DhcpOption::ClientMachineIdentifier(
        [vec![0u8], [0x9d, 0x6e, 0xef, 0xe5].repeat(4)].concat(),
    ));
    assert_eq!(
        classify(&req, client_mac(&req)).kind,
        ClientKind::RaspberryPi(PiModel::Unknown)
    );
    // ... and without a Pi OUI it is a BIOS PXE ROM.
    req.set_chaddr(&[0x52, 0x54, 0, 9, 9, 9]);
    assert_eq!(
        classify(&req, client_mac(&req)).kind,
        ClientKind::Pxe(BootArch::X86Bios)
    );
}

#[test]
fn raspberry_pi_menu_string_is_configurable() {
    let mut w = World::proxy();
    w.config.boot.rpi_menu = "Kiln Boot".into();
    let d = w.decide(&msg("rpi4-discover.bin"));
    let o43 = bytes_opt(&reply(&d).msg, OptionCode::VendorExtensions).unwrap();
    assert!(o43.windows(9).any(|w| w == b"Kiln Boot"));
}

#[test]
fn proxy_ignores_plain_dhcp_clients() {
    let d = World::proxy().decide(&msg("udhcpc-discover.bin"));
    assert_eq!(d, Decision::Ignore(Ignored::NotNetboot));
}

#[test]
fn proxy_ignores_architectures_without_a_boot_file() {
    let w = World::proxy();
    let mut req = msg("aavmf-arm64-discover.bin");
    req.opts_mut()
        .insert(DhcpOption::ClientSystemArchitecture(10.into()));
    assert_eq!(
        w.decide(&req),
        Decision::Ignore(Ignored::UnsupportedArch(Some(10)))
    );
    // 32-bit x86 UEFI: not served unless a file is configured.
    req.opts_mut()
        .insert(DhcpOption::ClientSystemArchitecture(6.into()));
    assert_eq!(
        w.decide(&req),
        Decision::Ignore(Ignored::UnsupportedArch(Some(6)))
    );
    let mut w = World::proxy();
    w.config.boot.uefi_ia32 = Some("ipxe-ia32.efi".into());
    assert_eq!(
        file(&reply(&w.decide(&req)).msg).as_deref(),
        Some("ipxe-ia32.efi")
    );
}

#[test]
fn proxy_never_offers_an_address_whatever_the_client_asks() {
    let w = World::proxy();
    for f in [
        "seabios-ipxe-discover.bin",
        "ovmf-x64-discover.bin",
        "aavmf-arm64-discover.bin",
        "ovmf-x64-http-discover.bin",
        "rpi4-discover.bin",
    ] {
        let mut req = msg(f);
        req.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(ip("10.0.0.42")));
        let d = w.decide(&req);
        let r = reply(&d);
        assert_eq!(r.msg.yiaddr(), Ipv4Addr::UNSPECIFIED, "{f}");
        assert_eq!(r.lease, None, "{f}");
    }
}

#[test]
fn proxy_admission_allowlist() {
    let mut w = World::proxy();
    w.admission = Admission::Allowlist;
    let req = msg("ovmf-x64-discover.bin");
    assert_eq!(w.decide(&req), Decision::Ignore(Ignored::NotAdmitted));
    let mac: MacAddr = "52:54:00:12:34:02".parse().unwrap();
    w.inventory.insert(
        mac,
        MachineInfo {
            allowed: true,
            ..Default::default()
        },
    );
    assert!(w.decide(&req).reply().is_some());
    // Listed but not allowed.
    w.inventory.insert(
        mac,
        MachineInfo {
            allowed: false,
            ..Default::default()
        },
    );
    assert_eq!(w.decide(&req), Decision::Ignore(Ignored::NotAdmitted));
    // Under auto, a machine listed as not allowed is still kept out.
    w.admission = Admission::Auto;
    assert_eq!(w.decide(&req), Decision::Ignore(Ignored::NotAdmitted));
}

#[test]
fn proxy_port_4011_request_gets_an_ack_with_the_boot_file() {
    // What EDK2 (and iPXE) send to the proxy after taking the site's address:
    // a REQUEST to port 4011, ciaddr set.
    let w = World::proxy();
    let mut req = msg("ovmf-x64-discover.bin");
    req.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Request));
    req.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    req.set_ciaddr(ip("10.0.0.57"));
    let src = SocketAddrV4::new(ip("10.0.0.57"), 68);
    let d = w.decide_at(&req, Port::Pxe, src);
    let r = reply(&d);
    assert_eq!(msg_type(&r.msg), MessageType::Ack);
    check_proxy_reply(&req, &r.msg);
    assert_eq!(r.msg.ciaddr(), ip("10.0.0.57"));
    assert_eq!(file(&r.msg).as_deref(), Some("snponly.efi"));
    assert_eq!(r.to, ReplyTo::Unicast(src));
    // INFORM too.
    req.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Inform));
    assert!(w.decide_at(&req, Port::Pxe, src).reply().is_some());
    // A DISCOVER on 4011 is not answered.
    let d = w.decide_at(&msg("ovmf-x64-discover.bin"), Port::Pxe, src);
    assert_eq!(
        d,
        Decision::Ignore(Ignored::NotHandled(MessageType::Discover))
    );
    // Nor a plain client.
    let mut plain = msg("udhcpc-discover.bin");
    plain
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Request));
    assert_eq!(
        w.decide_at(&plain, Port::Pxe, src),
        Decision::Ignore(Ignored::NotNetboot)
    );
}

#[test]
fn proxy_ignores_requests_for_the_site_dhcp_server() {
    let w = World::proxy();
    let mut req = msg("ovmf-x64-discover.bin");
    req.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Request));
    req.opts_mut()
        .insert(DhcpOption::ServerIdentifier(ip("10.0.0.2")));
    req.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.0.0.57")));
    assert_eq!(
        w.decide(&req),
        Decision::Ignore(Ignored::OtherServer(ip("10.0.0.2")))
    );
    // Naming this server on port 67: answered like port 4011, to broadcast.
    req.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    let d = w.decide(&req);
    let r = reply(&d);
    assert_eq!(msg_type(&r.msg), MessageType::Ack);
    assert_eq!(r.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(r.to, ReplyTo::Broadcast);
}

#[test]
fn proxy_relayed_discover_goes_back_to_the_relay() {
    let mut req = msg("ovmf-x64-discover.bin");
    req.set_giaddr(ip("10.9.0.1"));
    let d = World::proxy().decide(&req);
    let r = reply(&d);
    assert_eq!(
        r.to,
        ReplyTo::Unicast(SocketAddrV4::new(ip("10.9.0.1"), 67))
    );
    assert_eq!(r.msg.giaddr(), ip("10.9.0.1"));
}

// ---- full mode

fn request_for(discover: &Message, ty: MessageType) -> Message {
    let mut m = discover.clone();
    m.opts_mut().insert(DhcpOption::MessageType(ty));
    m
}

fn selecting(discover: &Message, addr: Ipv4Addr, server: Ipv4Addr) -> Message {
    let mut m = request_for(discover, MessageType::Request);
    m.opts_mut().insert(DhcpOption::RequestedIpAddress(addr));
    m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    m
}

fn with_mac(m: &Message, last: u8) -> Message {
    let mut m = m.clone();
    m.set_chaddr(&[0x52, 0x54, 0, 0xaa, 0xbb, last]);
    m
}

#[test]
fn full_discover_request_ack_for_udhcpc() {
    let mut w = World::full();
    let disc = msg("udhcpc-discover.bin");
    let d = w.step(&disc);
    let r = reply(&d);
    assert_eq!(msg_type(&r.msg), MessageType::Offer);
    check_reply_basics(&disc, &r.msg);
    assert_eq!(r.msg.yiaddr(), ip("10.0.0.100"));
    assert_eq!(
        opt(&r.msg, OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(ip("255.255.255.0")))
    );
    assert_eq!(
        opt(&r.msg, OptionCode::Router),
        Some(&DhcpOption::Router(vec![ip("10.0.0.254")]))
    );
    assert_eq!(
        opt(&r.msg, OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![ip("10.0.0.53")]))
    );
    assert_eq!(
        opt(&r.msg, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(3600))
    );
    assert_eq!(
        opt(&r.msg, OptionCode::Renewal),
        Some(&DhcpOption::Renewal(1800))
    );
    assert_eq!(
        opt(&r.msg, OptionCode::Rebinding),
        Some(&DhcpOption::Rebinding(3150))
    );
    assert_eq!(
        opt(&r.msg, OptionCode::DomainName),
        Some(&DhcpOption::DomainName("lab.example".into()))
    );
    // No boot information for a plain client.
    assert!(opt(&r.msg, OptionCode::ClassIdentifier).is_none());
    assert_eq!(file(&r.msg), None);
    assert_eq!(r.to, ReplyTo::Broadcast);
    let mac = client_mac(&disc).unwrap();
    assert_eq!(
        r.lease,
        Some(LeaseOp::Offer {
            mac,
            addr: ip("10.0.0.100"),
            until: NOW + 60
        })
    );

    // The same client asking again gets the same address.
    let d = w.step(&disc);
    assert_eq!(reply(&d).msg.yiaddr(), ip("10.0.0.100"));
    // Another client gets the next one.
    let d = w.step(&with_mac(&disc, 1));
    assert_eq!(reply(&d).msg.yiaddr(), ip("10.0.0.101"));

    // SELECTING: REQUEST naming this server and the offered address.
    let req = selecting(&disc, ip("10.0.0.100"), SERVER);
    let d = w.step(&req);
    let r = reply(&d);
    assert_eq!(msg_type(&r.msg), MessageType::Ack);
    assert_eq!(r.msg.yiaddr(), ip("10.0.0.100"));
    assert_eq!(
        r.lease,
        Some(LeaseOp::Commit {
            mac,
            addr: ip("10.0.0.100"),
            expires: NOW + 3600
        })
    );
    let l = w.leases.by_mac(mac).unwrap().unwrap();
    assert_eq!((l.addr, l.state), (ip("10.0.0.100"), LeaseState::Bound));

    // A DISCOVER from a bound client offers its address without touching
    // the lease.
    let d = w.step(&disc);
    assert_eq!(reply(&d).msg.yiaddr(), ip("10.0.0.100"));
    assert_eq!(reply(&d).lease, None);
    assert_eq!(
        w.leases.by_mac(mac).unwrap().unwrap().state,
        LeaseState::Bound
    );
}

#[test]
fn full_request_for_another_server_drops_our_offer() {
    let mut w = World::full();
    let disc = msg("udhcpc-discover.bin");
    w.step(&disc);
    let mac = client_mac(&disc).unwrap();
    let d = w.step(&selecting(&disc, ip("10.0.0.7"), ip("10.0.0.2")));
    assert_eq!(
        d,
        Decision::Record(LeaseOp::Release {
            mac,
            addr: ip("10.0.0.100")
        })
    );
    assert_eq!(w.leases.by_mac(mac).unwrap(), None);
    // Again, with nothing offered: ignored.
    let d = w.step(&selecting(&disc, ip("10.0.0.7"), ip("10.0.0.2")));
    assert_eq!(d, Decision::Ignore(Ignored::OtherServer(ip("10.0.0.2"))));
}

#[test]
fn full_naks_addresses_that_are_not_the_clients() {
    let mut w = World::full();
    let a = msg("udhcpc-discover.bin");
    let b = with_mac(&a, 2);
    w.step(&a);
    w.step(&selecting(&a, ip("10.0.0.100"), SERVER));
    // B asks for A's address (SELECTING).
    let d = w.step(&selecting(&b, ip("10.0.0.100"), SERVER));
    let r = reply(&d);
    assert_eq!(msg_type(&r.msg), MessageType::Nak);
    assert_eq!(r.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(r.to, ReplyTo::Broadcast);
    assert_eq!(r.lease, None);
    check_reply_basics(&b, &r.msg);
    // INIT-REBOOT for an address on another network.
    let mut reboot = request_for(&b, MessageType::Request);
    reboot
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("192.168.1.20")));
    assert_eq!(msg_type(&reply(&w.step(&reboot)).msg), MessageType::Nak);
    // ... for the network or broadcast address, or one outside the range.
    for bad in ["10.0.0.0", "10.0.0.255", "10.0.0.20"] {
        reboot
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress(ip(bad)));
        assert_eq!(
            msg_type(&reply(&w.step(&reboot)).msg),
            MessageType::Nak,
            "{bad}"
        );
    }
    // ... for the server's or the router's address (even if in range).
    let mut w2 = World::full();
    if let Mode::Full(p) = &mut w2.config.mode {
        p.first = ip("10.0.0.1");
        p.last = ip("10.0.0.254");
    }
    for bad in ["10.0.0.1", "10.0.0.254"] {
        reboot
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress(ip(bad)));
        assert_eq!(
            msg_type(&reply(&w2.step(&reboot)).msg),
            MessageType::Nak,
            "{bad}"
        );
    }
    // RENEWING with A's address from B.
    let mut renew = request_for(&b, MessageType::Request);
    renew.set_ciaddr(ip("10.0.0.100"));
    assert_eq!(msg_type(&reply(&w.step(&renew)).msg), MessageType::Nak);
    // A REQUEST with no address at all is not answered.
    let bare = request_for(&b, MessageType::Request);
    assert!(matches!(
        w.step(&bare),
        Decision::Ignore(Ignored::Invalid(_))
    ));
}

#[test]
fn full_init_reboot_and_renewing() {
    let mut w = World::full();
    let a = msg("udhcpc-discover.bin");
    let mac = client_mac(&a).unwrap();
    w.step(&a);
    w.step(&selecting(&a, ip("10.0.0.100"), SERVER));
    // INIT-REBOOT: requested address, no server id, no ciaddr.
    let mut reboot = request_for(&a, MessageType::Request);
    reboot
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.0.0.100")));
    w.now += 100;
    let d = w.step(&reboot);
    let r = reply(&d);
    assert_eq!(msg_type(&r.msg), MessageType::Ack);
    assert_eq!(r.to, ReplyTo::Broadcast);
    assert_eq!(
        r.lease,
        Some(LeaseOp::Commit {
            mac,
            addr: ip("10.0.0.100"),
            expires: NOW + 100 + 3600
        })
    );
    // RENEWING: ciaddr, unicast to it.
    let mut renew = request_for(&a, MessageType::Request);
    renew.set_ciaddr(ip("10.0.0.100"));
    let d = w.step(&renew);
    let r = reply(&d);
    assert_eq!(msg_type(&r.msg), MessageType::Ack);
    assert_eq!(r.msg.yiaddr(), ip("10.0.0.100"));
    assert_eq!(r.msg.ciaddr(), ip("10.0.0.100"));
    assert_eq!(
        r.to,
        ReplyTo::Unicast(SocketAddrV4::new(ip("10.0.0.100"), 68))
    );
    // A client the server has no record of, asking for a free address in
    // the range (its lease came from a server that lost its state): ACKed.
    let c = with_mac(&a, 3);
    let mut reboot = request_for(&c, MessageType::Request);
    reboot
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.0.0.150")));
    assert_eq!(msg_type(&reply(&w.step(&reboot)).msg), MessageType::Ack);
}

#[test]
fn full_decline_keeps_the_address_out() {
    let mut w = World::full();
    let a = msg("udhcpc-discover.bin");
    let mac = client_mac(&a).unwrap();
    w.step(&a);
    w.step(&selecting(&a, ip("10.0.0.100"), SERVER));
    let mut decline = request_for(&a, MessageType::Decline);
    decline
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.0.0.100")));
    decline
        .opts_mut()
        .insert(DhcpOption::ServerIdentifier(SERVER));
    let d = w.step(&decline);
    assert_eq!(
        d,
        Decision::Record(LeaseOp::Decline {
            mac,
            addr: ip("10.0.0.100"),
            until: NOW + 600
        })
    );
    // Nobody gets it, not even the client that declined it.
    assert_eq!(reply(&w.step(&a)).msg.yiaddr(), ip("10.0.0.101"));
    assert_eq!(
        reply(&w.step(&with_mac(&a, 9))).msg.yiaddr(),
        ip("10.0.0.102")
    );
    // After the hold, it is free again.
    w.now += 600;
    w.leases.expire(w.now).unwrap();
    assert_eq!(
        reply(&w.step(&with_mac(&a, 10))).msg.yiaddr(),
        ip("10.0.0.100")
    );
    // A DECLINE of an address the client does not hold is ignored.
    let mut bogus = request_for(&with_mac(&a, 11), MessageType::Decline);
    bogus
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.0.0.150")));
    assert!(matches!(
        w.step(&bogus),
        Decision::Ignore(Ignored::Invalid(_))
    ));
}

#[test]
fn full_release_frees_the_address() {
    let mut w = World::full();
    let a = msg("udhcpc-discover.bin");
    let mac = client_mac(&a).unwrap();
    w.step(&a);
    w.step(&selecting(&a, ip("10.0.0.100"), SERVER));
    // Someone else releasing it: ignored.
    let mut other = request_for(&with_mac(&a, 5), MessageType::Release);
    other.set_ciaddr(ip("10.0.0.100"));
    assert!(matches!(
        w.step(&other),
        Decision::Ignore(Ignored::Invalid(_))
    ));
    let mut release = request_for(&a, MessageType::Release);
    release.set_ciaddr(ip("10.0.0.100"));
    release
        .opts_mut()
        .insert(DhcpOption::ServerIdentifier(SERVER));
    assert_eq!(
        w.step(&release),
        Decision::Record(LeaseOp::Release {
            mac,
            addr: ip("10.0.0.100")
        })
    );
    assert_eq!(w.leases.by_mac(mac).unwrap(), None);
    assert_eq!(
        reply(&w.step(&with_mac(&a, 6))).msg.yiaddr(),
        ip("10.0.0.100")
    );
}

#[test]
fn full_inform_gets_options_and_no_address() {
    let w = World::full();
    let mut inform = request_for(&msg("udhcpc-discover.bin"), MessageType::Inform);
    inform.set_ciaddr(ip("10.0.0.33"));
    let d = w.decide(&inform);
    let r = reply(&d);
    assert_eq!(msg_type(&r.msg), MessageType::Ack);
    assert_eq!(r.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(opt(&r.msg, OptionCode::AddressLeaseTime).is_none());
    assert!(opt(&r.msg, OptionCode::Router).is_some());
    assert_eq!(
        r.to,
        ReplyTo::Unicast(SocketAddrV4::new(ip("10.0.0.33"), 68))
    );
    assert_eq!(r.lease, None);
}

#[test]
fn full_pxe_clients_get_an_address_and_boot_information() {
    let mut w = World::full();
    let req = msg("ovmf-x64-discover.bin");
    let d = w.step(&req);
    let r = reply(&d);
    assert_eq!(r.msg.yiaddr(), ip("10.0.0.100"));
    assert_eq!(r.msg.siaddr(), SERVER);
    assert_eq!(file(&r.msg).as_deref(), Some("snponly.efi"));
    assert_eq!(
        text_opt(&r.msg, OptionCode::ClassIdentifier).as_deref(),
        Some("PXEClient")
    );
    // The ACK carries it too.
    let d = w.step(&selecting(&req, ip("10.0.0.100"), SERVER));
    assert_eq!(file(&reply(&d).msg).as_deref(), Some("snponly.efi"));
    // The Pi: address and the boot menu.
    let d = w.step(&msg("rpi4-discover.bin"));
    let r = reply(&d);
    assert_eq!(r.msg.yiaddr(), ip("10.0.0.101"));
    assert!(opt(&r.msg, OptionCode::VendorExtensions).is_some());
    assert!(opt(&r.msg, OptionCode::TFTPServerName).is_some());
}

#[test]
fn full_allowlist_gives_unlisted_machines_an_address_but_no_boot() {
    let mut w = World::full();
    w.admission = Admission::Allowlist;
    let d = w.step(&msg("ovmf-x64-discover.bin"));
    let r = reply(&d);
    assert_eq!(r.msg.yiaddr(), ip("10.0.0.100"));
    assert_eq!(file(&r.msg), None);
    assert!(opt(&r.msg, OptionCode::ClassIdentifier).is_none());
}

#[test]
fn full_reservations() {
    let mut w = World::full();
    let a = msg("ovmf-x64-discover.bin");
    let mac = client_mac(&a).unwrap();
    // Reserved outside the range (inside the subnet), and one inside it.
    w.inventory.insert(
        mac,
        MachineInfo {
            reserved_addr: Some(ip("10.0.0.20")),
            hostname: Some("node-1".into()),
            allowed: true,
            ..Default::default()
        },
    );
    let other: MacAddr = "52:54:00:aa:bb:07".parse().unwrap();
    w.inventory.insert(
        other,
        MachineInfo {
            reserved_addr: Some(ip("10.0.0.100")),
            allowed: true,
            ..Default::default()
        },
    );
    assert_eq!(w.inventory.reserved_for(ip("10.0.0.100")), Some(other));
    let d = w.step(&a);
    let r = reply(&d);
    assert_eq!(r.msg.yiaddr(), ip("10.0.0.20"));
    assert_eq!(
        opt(&r.msg, OptionCode::Hostname),
        Some(&DhcpOption::Hostname("node-1".into()))
    );
    // It may not take another address while its reservation is usable.
    let mut reboot = request_for(&a, MessageType::Request);
    reboot
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.0.0.150")));
    assert_eq!(msg_type(&reply(&w.step(&reboot)).msg), MessageType::Nak);
    assert_eq!(
        msg_type(&reply(&w.step(&selecting(&a, ip("10.0.0.20"), SERVER))).msg),
        MessageType::Ack
    );
    // Others never get a reserved address, even when asking for it.
    let mut c = with_mac(&msg("udhcpc-discover.bin"), 8);
    c.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.0.0.100")));
    assert_eq!(reply(&w.step(&c)).msg.yiaddr(), ip("10.0.0.101"));
    // The reserved machine itself gets its in-range reservation.
    let d = w.step(&with_mac(&msg("udhcpc-discover.bin"), 7));
    assert_eq!(reply(&d).msg.yiaddr(), ip("10.0.0.100"));
}

#[test]
fn full_pool_exhaustion_and_expiry() {
    let mut w = World::full();
    if let Mode::Full(p) = &mut w.config.mode {
        p.first = ip("10.0.0.100");
        p.last = ip("10.0.0.100");
    }
    let a = msg("udhcpc-discover.bin");
    assert_eq!(reply(&w.step(&a)).msg.yiaddr(), ip("10.0.0.100"));
    let b = with_mac(&a, 1);
    assert_eq!(w.step(&b), Decision::Ignore(Ignored::PoolExhausted));
    // A's offer runs out after 60 s: B gets the address.
    w.now += 60;
    assert_eq!(reply(&w.step(&b)).msg.yiaddr(), ip("10.0.0.100"));
    // Now A finds it taken; its own old entry is gone.
    assert_eq!(w.step(&a), Decision::Ignore(Ignored::PoolExhausted));
}

#[test]
fn full_relayed_requests() {
    let mut w = World::full();
    let mut a = msg("udhcpc-discover.bin");
    a.set_giaddr(ip("10.0.0.2"));
    // The relay's option 82 (circuit id "eth7") comes back unchanged.
    let o82 = [1u8, 4, b'e', b't', b'h', b'7'];
    let mut raw = encode(&a).unwrap();
    let end = raw.iter().rposition(|b| *b == 255).unwrap();
    raw.splice(end..end, [82u8, o82.len() as u8].into_iter().chain(o82));
    let a = parse(&raw).unwrap();
    assert!(a.opts().contains(OptionCode::RelayAgentInformation));
    let d = w.step(&a);
    let r = reply(&d);
    assert_eq!(
        opt(&r.msg, OptionCode::RelayAgentInformation),
        opt(&a, OptionCode::RelayAgentInformation)
    );
    // So does the client identifier (RFC 6842).
    assert_eq!(
        opt(&r.msg, OptionCode::ClientIdentifier),
        opt(&a, OptionCode::ClientIdentifier)
    );
    assert!(opt(&r.msg, OptionCode::ClientIdentifier).is_some());
    assert_eq!(
        r.to,
        ReplyTo::Unicast(SocketAddrV4::new(ip("10.0.0.2"), 67))
    );
    assert_eq!(r.msg.giaddr(), ip("10.0.0.2"));
    assert_eq!(r.msg.yiaddr(), ip("10.0.0.100"));
    // A NAK through a relay: unicast to it with the broadcast bit.
    let mut bad = selecting(&a, ip("10.0.0.20"), SERVER);
    bad.set_giaddr(ip("10.0.0.2"));
    let d = w.step(&bad);
    let r = reply(&d);
    assert_eq!(msg_type(&r.msg), MessageType::Nak);
    assert_eq!(
        r.to,
        ReplyTo::Unicast(SocketAddrV4::new(ip("10.0.0.2"), 67))
    );
    assert!(r.msg.flags().broadcast());
    // From a network the pool is not on: ignored.
    let mut far = msg("udhcpc-discover.bin");
    far.set_giaddr(ip("10.9.0.1"));
    assert_eq!(
        w.step(&far),
        Decision::Ignore(Ignored::UnknownNetwork(ip("10.9.0.1")))
    );
}

// ---- what is not a request

#[test]
fn not_requests_are_ignored() {
    let w = World::full();
    let mut m = msg("udhcpc-discover.bin");
    m.opts_mut().remove(OptionCode::MessageType);
    assert_eq!(w.decide(&m), Decision::Ignore(Ignored::NotARequest));
    let mut m = msg("udhcpc-discover.bin");
    m.set_opcode(dhcproto::v4::Opcode::BootReply);
    assert_eq!(w.decide(&m), Decision::Ignore(Ignored::NotARequest));
    let mut m = msg("udhcpc-discover.bin");
    m.set_chaddr(&[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(w.decide(&m), Decision::Ignore(Ignored::NoMac));
    let m = request_for(&msg("udhcpc-discover.bin"), MessageType::Offer);
    assert_eq!(
        w.decide(&m),
        Decision::Ignore(Ignored::NotHandled(MessageType::Offer))
    );
    let m = request_for(&msg("ovmf-x64-discover.bin"), MessageType::Release);
    assert_eq!(
        World::proxy().decide(&m),
        Decision::Ignore(Ignored::NotHandled(MessageType::Release))
    );
}

#[test]
fn no_inventory_and_boot_file_defaults() {
    let config = proxy_config();
    let leases = MemoryLeaseStore::new();
    let ctx = DhcpContext {
        config: &config,
        admission: Admission::Allowlist,
        inventory: &NoInventory,
        leases: &leases,
        now: NOW,
    };
    let req = Request {
        msg: msg("ovmf-x64-discover.bin"),
        port: Port::Dhcp,
        src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
    };
    assert_eq!(decide(&req, &ctx), Decision::Ignore(Ignored::NotAdmitted));
}

/// Every truncation of every fixture, and many random corruptions, in both
/// modes: parse and decide never panic, and what they answer encodes.
#[test]
fn corrupted_fixtures_never_panic() {
    let names = [
        "seabios-ipxe-discover.bin",
        "ovmf-x64-discover.bin",
        "aavmf-arm64-discover.bin",
        "ovmf-x64-http-discover.bin",
        "rpi4-discover.bin",
        "udhcpc-discover.bin",
    ];
    let worlds = [World::proxy(), World::full()];
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut tried = 0;
    for name in names {
        let orig = fixture(name);
        let mut cases: Vec<Vec<u8>> = (0..orig.len()).map(|n| orig[..n].to_vec()).collect();
        for _ in 0..2000 {
            let mut b = orig.clone();
            for _ in 0..1 + rand() % 4 {
                let i = (rand() as usize) % b.len();
                b[i] = rand() as u8;
            }
            if rand() % 4 == 0 {
                let n = (rand() as usize) % b.len();
                b.truncate(n);
            }
            cases.push(b);
        }
        for b in cases {
            tried += 1;
            let Ok(m) = parse(&b) else { continue };
            for w in &worlds {
                for port in [Port::Dhcp, Port::Pxe] {
                    let d = w.decide_at(&m, port, SocketAddrV4::new(ip("10.0.0.9"), 68));
                    if let Some(r) = d.reply() {
                        encode(&r.msg).unwrap();
                    }
                }
            }
        }
    }
    assert!(tried > 12_000);
}

/// The server's own inventory (the config's `[[machine]]` list) finds a Pi by
/// the serial in its option 97 and a PXE client by its SMBIOS UUID, so an
/// allowlist admits machines whose MAC nobody wrote down.
#[test]
fn allowlist_admits_by_serial_and_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serve.toml");
    let config = |machines: &str| {
        std::fs::write(
            &path,
            format!(
                "interface = \"kiln0\"\nimages = \"/srv\"\ndefault_image = \"x\"\n\
                 [admission]\npolicy = \"allowlist\"\n{machines}"
            ),
        )
        .unwrap();
        kiln_netboot_server::config::ServeConfig::load(&kiln_netboot_server::config::Flags {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap()
    };
    let decide_with = |inv: &kiln_netboot_server::config::ServeConfig, m: &Message| {
        let w = World::proxy();
        let ctx = DhcpContext {
            config: &w.config,
            admission: Admission::Allowlist,
            inventory: inv,
            leases: &w.leases,
            now: NOW,
        };
        let src = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
        decide(
            &Request {
                msg: m.clone(),
                port: Port::Dhcp,
                src,
            },
            &ctx,
        )
    };
    let pi = msg("rpi4-discover.bin");
    let nobody = config("");
    assert_eq!(
        decide_with(&nobody, &pi),
        Decision::Ignore(Ignored::NotAdmitted)
    );
    let by_serial = config("[[machine]]\nserial = \"e5ef6e9d\"\n");
    assert!(decide_with(&by_serial, &pi).reply().is_some());
    let other_serial = config("[[machine]]\nserial = \"e5ef6e9e\"\n");
    assert_eq!(
        decide_with(&other_serial, &pi),
        Decision::Ignore(Ignored::NotAdmitted)
    );

    // OVMF with an SMBIOS UUID (QEMU's -uuid) in option 97.
    let mut ovmf = msg("ovmf-x64-discover.bin");
    let mut guid = vec![0u8, 0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66];
    guid.extend_from_slice(&[0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);
    ovmf.opts_mut()
        .insert(DhcpOption::ClientMachineIdentifier(guid));
    let by_uuid = config("[[machine]]\nuuid = \"00112233-4455-6677-8899-aabbccddeeff\"\n");
    assert!(decide_with(&by_uuid, &ovmf).reply().is_some());
    assert_eq!(
        decide_with(&by_uuid, &msg("ovmf-x64-discover.bin")),
        Decision::Ignore(Ignored::NotAdmitted)
    );
}
