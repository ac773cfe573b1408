//! Who is asking: the client's hardware address and what kind of network boot
//! firmware it runs, read from a request's options.
//!
//! The signals, in the order they decide:
//! - option 77 (user class) "iPXE": iPXE is already running; it gets the URL of
//!   its script, whatever its architecture.
//! - a Raspberry Pi's EEPROM bootloader (Pi 4 and 5): vendor class `PXEClient`
//!   with architecture 0 (it claims "x86 BIOS"), told apart from a real BIOS by
//!   option 97, whose GUID starts with the FourCC "RPi4"/"RPi5" (bootloader
//!   setting `DHCP_OPTION97`, on by default), or failing that by the MAC's OUI.
//! - option 60 (vendor class) `HTTPClient:Arch:xxxxx...`: UEFI HTTP boot.
//! - option 60 `PXEClient:Arch:xxxxx:UNDI:yyyzzz`: a PXE ROM; option 93 (client
//!   system architecture, RFC 4578 and IANA's registry) says which, falling
//!   back to the `Arch:` field of option 60.
//! - anything else is a plain DHCP client.

use std::fmt;
use std::str::FromStr;

use dhcproto::v4::{DhcpOption, HType, Message, OptionCode};

/// An Ethernet MAC address. Displays as lower-case, colon-separated hex, the
/// form the state store and the inventory use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The first three bytes: the vendor's OUI.
    pub fn oui(&self) -> [u8; 3] {
        [self.0[0], self.0[1], self.0[2]]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Error of parsing a MAC address.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a MAC address (six hex bytes separated by ':' or '-')")]
pub struct BadMac(String);

impl FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(BadMac(s.to_string()));
        }
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(&parts) {
            if part.len() != 2 {
                return Err(BadMac(s.to_string()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| BadMac(s.to_string()))?;
        }
        Ok(MacAddr(mac))
    }
}

/// The MAC address of a request: Ethernet hardware type with a 6-byte chaddr.
pub fn client_mac(msg: &Message) -> Option<MacAddr> {
    if msg.htype() != HType::Eth || msg.hlen() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(msg.chaddr());
    Some(MacAddr(mac))
}

/// OUIs of the Raspberry Pi Foundation / Raspberry Pi Trading (IEEE MA-L
/// registry): b8:27:eb (Pi 1-3), dc:a6:32 and e4:5f:01 (Pi 4), 28:cd:c1,
/// d8:3a:dd and 2c:cf:67 (Pi 4/5, CM4/CM5, Pi 400/500).
pub const RASPBERRY_PI_OUIS: [[u8; 3]; 6] = [
    [0xb8, 0x27, 0xeb],
    [0xdc, 0xa6, 0x32],
    [0xe4, 0x5f, 0x01],
    [0x28, 0xcd, 0xc1],
    [0xd8, 0x3a, 0xdd],
    [0x2c, 0xcf, 0x67],
];

/// The processor and firmware a boot file must be built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BootArch {
    /// x86 BIOS (option 93 = 0).
    X86Bios,
    /// 32-bit x86 UEFI (6; 15 for HTTP boot).
    X86Uefi32,
    /// x86-64 UEFI (7 and 9; 16 for HTTP boot).
    X64Uefi,
    /// arm64 UEFI (11; 19 for HTTP boot).
    Arm64Uefi,
}

impl BootArch {
    /// The architecture of an option-93 value (RFC 4578 and IANA's "Processor
    /// Architecture Types"), for PXE and HTTP boot codes alike.
    pub fn from_code(code: u16) -> Option<BootArch> {
        Some(match code {
            0 => BootArch::X86Bios,
            6 | 15 => BootArch::X86Uefi32,
            7 | 9 | 16 => BootArch::X64Uefi,
            11 | 19 => BootArch::Arm64Uefi,
            _ => return None,
        })
    }
}

/// Which Raspberry Pi, from the FourCC in option 97.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PiModel {
    /// "RPi4": Pi 4, Pi 400, CM4.
    Pi4,
    /// "RPi5": Pi 5, Pi 500, CM5.
    Pi5,
    /// Recognised by its MAC's OUI only (bootloader with `DHCP_OPTION97=0`, or
    /// a custom prefix).
    Unknown,
}

/// What kind of client sent a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientKind {
    /// iPXE (user class "iPXE"); the architecture if it said one.
    Ipxe(Option<BootArch>),
    /// A PXE ROM (vendor class `PXEClient`).
    Pxe(BootArch),
    /// UEFI HTTP boot (vendor class `HTTPClient`).
    Http(BootArch),
    /// A Raspberry Pi's bootloader.
    RaspberryPi(PiModel),
    /// A PXE or HTTP boot client of an architecture kiln has no boot file for
    /// (the option-93 code, if any).
    UnsupportedArch(Option<u16>),
    /// Not a network boot client (an operating system's DHCP client).
    Other,
}

impl ClientKind {
    /// Whether the client is booting from the network (including the ones kiln
    /// cannot serve).
    pub fn is_netboot(&self) -> bool {
        !matches!(self, ClientKind::Other)
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            ClientKind::Ipxe(_) => "ipxe",
            ClientKind::Pxe(BootArch::X86Bios) => "pxe-bios",
            ClientKind::Pxe(BootArch::X86Uefi32) => "pxe-uefi-ia32",
            ClientKind::Pxe(BootArch::X64Uefi) => "pxe-uefi-x64",
            ClientKind::Pxe(BootArch::Arm64Uefi) => "pxe-uefi-arm64",
            ClientKind::Http(BootArch::X64Uefi) => "http-uefi-x64",
            ClientKind::Http(BootArch::Arm64Uefi) => "http-uefi-arm64",
            ClientKind::Http(_) => "http-other",
            ClientKind::RaspberryPi(PiModel::Pi4) => "rpi4",
            ClientKind::RaspberryPi(PiModel::Pi5) => "rpi5",
            ClientKind::RaspberryPi(PiModel::Unknown) => "rpi",
            ClientKind::UnsupportedArch(_) => "unsupported-arch",
            ClientKind::Other => "other",
        }
    }
}

/// What a request says about its sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    pub kind: ClientKind,
    /// The first option-93 code, or the `Arch:` of option 60.
    pub arch_code: Option<u16>,
    /// Option 60, as text (lossy).
    pub vendor_class: Option<String>,
    /// Option 97 as sent (type byte and GUID), echoed in replies.
    pub machine_id: Option<Vec<u8>>,
    /// A Raspberry Pi's serial number (8 lower-case hex digits, the name of
    /// its TFTP directory), from option 97.
    pub serial: Option<String>,
    /// The SMBIOS UUID a PXE client sends in option 97 (lower-case, hyphens),
    /// unless it is all zeros or all ones (unset).
    pub uuid: Option<String>,
}

/// The serial number in a Raspberry Pi's option 97: its last four bytes,
/// little-endian (type 0, FourCC, board revision, MAC, serial; the old layout
/// repeats the serial four times, so the last four bytes hold it too).
pub fn pi_serial(machine_id: &[u8]) -> Option<String> {
    let [0, rest @ ..] = machine_id else {
        return None;
    };
    let tail: [u8; 4] = rest.get(12..16)?.try_into().ok()?;
    Some(format!("{:08x}", u32::from_le_bytes(tail)))
}

/// The UUID in a PXE client's option 97 (type 0, 16 bytes), printed the way
/// SMBIOS 2.6 and dmidecode do: the first three fields are little-endian.
pub fn machine_uuid(machine_id: &[u8]) -> Option<String> {
    let [0, g @ ..] = machine_id else {
        return None;
    };
    let g: &[u8; 16] = g.try_into().ok()?;
    if g.iter().all(|b| *b == 0) || g.iter().all(|b| *b == 0xff) {
        return None;
    }
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let rev = |b: &[u8]| hex(&b.iter().rev().copied().collect::<Vec<_>>());
    Some(format!(
        "{}-{}-{}-{}-{}",
        rev(&g[0..4]),
        rev(&g[4..6]),
        rev(&g[6..8]),
        hex(&g[8..10]),
        hex(&g[10..16])
    ))
}

/// Reads the client's kind and identifiers from a request.
pub fn classify(msg: &Message, mac: Option<MacAddr>) -> Client {
    let opts = msg.opts();
    let vendor_class = match opts.get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(v)) => Some(String::from_utf8_lossy(v).into_owned()),
        _ => None,
    };
    let machine_id = match opts.get(OptionCode::ClientMachineIdentifier) {
        Some(DhcpOption::ClientMachineIdentifier(v)) => Some(v.clone()),
        _ => None,
    };
    let arch_code = match opts.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Some(u16::from(*a)),
        _ => vendor_class.as_deref().and_then(vendor_class_arch),
    };
    let user_class_ipxe = match opts.get(OptionCode::UserClass) {
        Some(DhcpOption::UserClass(v)) => user_class_has(v, b"iPXE"),
        _ => false,
    };
    let vc = vendor_class.as_deref().unwrap_or("");
    let pxe = vc.starts_with("PXEClient");
    let http = vc.starts_with("HTTPClient");
    let arch = arch_code.and_then(BootArch::from_code);

    let kind = if user_class_ipxe {
        ClientKind::Ipxe(arch)
    } else if pxe && arch_code.unwrap_or(0) == 0 && is_raspberry_pi(machine_id.as_deref(), mac) {
        ClientKind::RaspberryPi(pi_model(machine_id.as_deref()))
    } else if http {
        arch.map_or(ClientKind::UnsupportedArch(arch_code), ClientKind::Http)
    } else if pxe {
        arch.map_or(ClientKind::UnsupportedArch(arch_code), ClientKind::Pxe)
    } else {
        ClientKind::Other
    };
    let (serial, uuid) = match (&kind, machine_id.as_deref()) {
        (ClientKind::RaspberryPi(_), Some(id)) => (pi_serial(id), None),
        (_, Some(id)) => (None, machine_uuid(id)),
        _ => (None, None),
    };
    Client {
        kind,
        arch_code,
        vendor_class,
        machine_id,
        serial,
        uuid,
    }
}

/// The `Arch:xxxxx` field of a `PXEClient:`/`HTTPClient:` vendor class.
pub fn vendor_class_arch(vendor_class: &str) -> Option<u16> {
    let rest = vendor_class
        .split(':')
        .skip_while(|f| *f != "Arch")
        .nth(1)?;
    if rest.len() != 5 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// Whether a user class option names `class`: iPXE sends the bare string
/// ("iPXE"), RFC 3004 clients a list of length-prefixed classes.
fn user_class_has(data: &[u8], class: &[u8]) -> bool {
    if data == class {
        return true;
    }
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = len as usize;
        if len == 0 || len > tail.len() {
            return false;
        }
        if &tail[..len] == class {
            return true;
        }
        rest = &tail[len..];
    }
    false
}

/// The FourCC at the start of a Raspberry Pi's option-97 GUID (after the type
/// byte 0), if it is one of the known ones.
fn pi_fourcc(machine_id: Option<&[u8]>) -> Option<PiModel> {
    let id = machine_id?;
    let guid = id.strip_prefix(&[0u8])?;
    match guid.get(..4)? {
        b"RPi4" => Some(PiModel::Pi4),
        b"RPi5" => Some(PiModel::Pi5),
        _ => None,
    }
}

fn is_raspberry_pi(machine_id: Option<&[u8]>, mac: Option<MacAddr>) -> bool {
    pi_fourcc(machine_id).is_some() || mac.is_some_and(|m| RASPBERRY_PI_OUIS.contains(&m.oui()))
}

fn pi_model(machine_id: Option<&[u8]>) -> PiModel {
    pi_fourcc(machine_id).unwrap_or(PiModel::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{Architecture, MessageType};
    use std::net::Ipv4Addr;

    fn msg(mac: [u8; 6], opts: Vec<DhcpOption>) -> Message {
        let z = Ipv4Addr::UNSPECIFIED;
        let mut m = Message::new_with_id(1, z, z, z, z, &mac);
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        for o in opts {
            m.opts_mut().insert(o);
        }
        m
    }

    fn kind(mac: [u8; 6], opts: Vec<DhcpOption>) -> ClientKind {
        let m = msg(mac, opts);
        classify(&m, client_mac(&m)).kind
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

    fn vc(s: &str) -> DhcpOption {
        DhcpOption::ClassIdentifier(s.as_bytes().to_vec())
    }

    fn arch(n: u16) -> DhcpOption {
        DhcpOption::ClientSystemArchitecture(Architecture::from(n))
    }

    #[test]
    fn mac_display_and_parse() {
        let m = MacAddr([0xb8, 0x27, 0xeb, 0x0a, 0xbc, 0x01]);
        assert_eq!(m.to_string(), "b8:27:eb:0a:bc:01");
        assert_eq!("B8-27-EB-0A-BC-01".parse::<MacAddr>().unwrap(), m);
        assert!("b8:27:eb:0a:bc".parse::<MacAddr>().is_err());
        assert!("b8:27:eb:0a:bc:1".parse::<MacAddr>().is_err());
        assert!("b8:27:eb:0a:bc:zz".parse::<MacAddr>().is_err());
    }

    #[test]
    fn vendor_class_arch_field() {
        assert_eq!(
            vendor_class_arch("PXEClient:Arch:00007:UNDI:003001"),
            Some(7)
        );
        assert_eq!(vendor_class_arch("HTTPClient:Arch:00016"), Some(16));
        assert_eq!(vendor_class_arch("PXEClient"), None);
        assert_eq!(vendor_class_arch("PXEClient:Arch:7"), None);
        assert_eq!(vendor_class_arch("PXEClient:Arch:0000x"), None);
    }

    #[test]
    fn pxe_architectures() {
        let pxe = |n: u16| kind(MAC, vec![vc("PXEClient:Arch:00000:UNDI:002001"), arch(n)]);
        assert_eq!(pxe(0), ClientKind::Pxe(BootArch::X86Bios));
        assert_eq!(pxe(6), ClientKind::Pxe(BootArch::X86Uefi32));
        assert_eq!(pxe(7), ClientKind::Pxe(BootArch::X64Uefi));
        assert_eq!(pxe(9), ClientKind::Pxe(BootArch::X64Uefi));
        assert_eq!(pxe(11), ClientKind::Pxe(BootArch::Arm64Uefi));
        assert_eq!(pxe(10), ClientKind::UnsupportedArch(Some(10)));
        assert_eq!(pxe(27), ClientKind::UnsupportedArch(Some(27)));
    }

    #[test]
    fn arch_from_vendor_class_when_option_93_is_missing() {
        assert_eq!(
            kind(MAC, vec![vc("PXEClient:Arch:00011:UNDI:003000")]),
            ClientKind::Pxe(BootArch::Arm64Uefi)
        );
        // No arch at all: a BIOS PXE ROM of old.
        assert_eq!(
            kind(MAC, vec![vc("PXEClient")]),
            ClientKind::UnsupportedArch(None)
        );
    }

    #[test]
    fn http_boot() {
        let http = |n: u16| kind(MAC, vec![vc("HTTPClient:Arch:00016:UNDI:003001"), arch(n)]);
        assert_eq!(http(16), ClientKind::Http(BootArch::X64Uefi));
        assert_eq!(http(19), ClientKind::Http(BootArch::Arm64Uefi));
        assert_eq!(http(18), ClientKind::UnsupportedArch(Some(18)));
    }

    #[test]
    fn ipxe_user_class_wins() {
        let bare = DhcpOption::UserClass(b"iPXE".to_vec());
        assert_eq!(
            kind(
                MAC,
                vec![
                    vc("PXEClient:Arch:00000:UNDI:002001"),
                    arch(0),
                    bare.clone()
                ]
            ),
            ClientKind::Ipxe(Some(BootArch::X86Bios))
        );
        // RFC 3004 list form.
        let list = DhcpOption::UserClass(b"\x03foo\x04iPXE".to_vec());
        assert_eq!(kind(MAC, vec![list]), ClientKind::Ipxe(None));
        // A Pi OUI running iPXE is iPXE.
        assert_eq!(
            kind([0xdc, 0xa6, 0x32, 1, 2, 3], vec![vc("PXEClient"), bare]),
            ClientKind::Ipxe(None)
        );
        // Not iPXE.
        let other = DhcpOption::UserClass(b"\x05iPXE2".to_vec());
        assert_eq!(kind(MAC, vec![other]), ClientKind::Other);
        assert!(!user_class_has(b"\x09iPXE", b"iPXE"));
        assert!(!user_class_has(b"", b"iPXE"));
    }

    fn pi_guid(fourcc: &[u8; 4]) -> DhcpOption {
        let mut id = vec![0u8];
        id.extend_from_slice(fourcc);
        id.extend_from_slice(&[0x11, 0x31, 0xc0, 0x00, 0x32, 0x01, 0x36, 0xc2]);
        id.extend_from_slice(&[0xef, 0xfd, 0xfe, 0x9f]);
        DhcpOption::ClientMachineIdentifier(id)
    }

    #[test]
    fn raspberry_pi_by_fourcc_and_by_oui() {
        let pi_vc = vc("PXEClient:Arch:00000:UNDI:002001");
        // FourCC, even behind a MAC that is not a Pi's (MAC_ADDRESS override).
        assert_eq!(
            kind(MAC, vec![pi_vc.clone(), arch(0), pi_guid(b"RPi4")]),
            ClientKind::RaspberryPi(PiModel::Pi4)
        );
        assert_eq!(
            kind(MAC, vec![pi_vc.clone(), arch(0), pi_guid(b"RPi5")]),
            ClientKind::RaspberryPi(PiModel::Pi5)
        );
        // OUI fallback: the old GUID (serial four times).
        let old = DhcpOption::ClientMachineIdentifier([0u8; 17].to_vec());
        for oui in RASPBERRY_PI_OUIS {
            let mac = [oui[0], oui[1], oui[2], 9, 8, 7];
            assert_eq!(
                kind(mac, vec![pi_vc.clone(), arch(0), old.clone()]),
                ClientKind::RaspberryPi(PiModel::Unknown)
            );
        }
        // A Pi running UEFI firmware (arch 11) is an arm64 UEFI client.
        assert_eq!(
            kind(
                [0xdc, 0xa6, 0x32, 1, 2, 3],
                vec![vc("PXEClient:Arch:00011:UNDI:003000"), arch(11)]
            ),
            ClientKind::Pxe(BootArch::Arm64Uefi)
        );
        // A BIOS PXE ROM that is not a Pi.
        assert_eq!(
            kind(MAC, vec![pi_vc, arch(0), old]),
            ClientKind::Pxe(BootArch::X86Bios)
        );
        // The FourCC needs the type byte 0 before it.
        let shifted = DhcpOption::ClientMachineIdentifier(b"RPi4RPi4RPi4RPi4".to_vec());
        assert_eq!(
            kind(MAC, vec![vc("PXEClient"), arch(0), shifted]),
            ClientKind::Pxe(BootArch::X86Bios)
        );
    }

    #[test]
    fn serials_and_uuids_from_option_97() {
        // The published Pi 4 decode (fixtures/dhcp/README.md): serial e5ef6e9d.
        let pi4 = [
            0, 82, 80, 105, 52, 18, 49, 192, 0, 50, 167, 237, 137, 157, 110, 239, 229,
        ];
        assert_eq!(pi_serial(&pi4).as_deref(), Some("e5ef6e9d"));
        assert_eq!(pi_serial(&[0, 1, 2, 3, 4]), None);
        let mut old = vec![0u8];
        for _ in 0..4 {
            old.extend_from_slice(&[0x9d, 0x6e, 0xef, 0xe5]);
        }
        assert_eq!(pi_serial(&old).as_deref(), Some("e5ef6e9d"));
        // dmidecode prints the SMBIOS bytes 33 22 11 00 55 44 77 66 88 99 ...
        // as 00112233-4455-6677-8899-aabbccddeeff.
        let mut g = vec![0u8, 0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66];
        g.extend_from_slice(&[0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);
        assert_eq!(
            machine_uuid(&g).as_deref(),
            Some("00112233-4455-6677-8899-aabbccddeeff")
        );
        assert_eq!(machine_uuid(&[0u8; 17]), None);
        assert_eq!(
            machine_uuid(&[[0u8].as_slice(), &[0xff; 16]].concat()),
            None
        );
        assert_eq!(machine_uuid(&g[..16]), None);
        assert_eq!(machine_uuid(&[[1u8].as_slice(), &g[1..]].concat()), None);
        // classify fills them in by kind.
        let m = msg(
            MAC,
            vec![
                vc("PXEClient:Arch:00000:UNDI:002001"),
                arch(0),
                DhcpOption::ClientMachineIdentifier(pi4.to_vec()),
            ],
        );
        let c = classify(&m, Some(MacAddr(MAC)));
        assert_eq!((c.serial.as_deref(), c.uuid), (Some("e5ef6e9d"), None));
        let m = msg(
            MAC,
            vec![
                vc("PXEClient:Arch:00007:UNDI:003001"),
                arch(7),
                DhcpOption::ClientMachineIdentifier(g.clone()),
            ],
        );
        let c = classify(&m, Some(MacAddr(MAC)));
        assert_eq!(c.serial, None);
        assert_eq!(
            c.uuid.as_deref(),
            Some("00112233-4455-6677-8899-aabbccddeeff")
        );
    }

    #[test]
    fn plain_dhcp_clients() {
        assert_eq!(kind(MAC, vec![]), ClientKind::Other);
        assert_eq!(kind(MAC, vec![vc("udhcp 1.35.0")]), ClientKind::Other);
        assert_eq!(kind(MAC, vec![vc("MSFT 5.0")]), ClientKind::Other);
        // A Pi OUI without PXEClient: Raspberry Pi OS's own DHCP client.
        assert_eq!(
            kind([0xb8, 0x27, 0xeb, 1, 2, 3], vec![vc("dhcpcd-9.4.1")]),
            ClientKind::Other
        );
    }

    #[test]
    fn non_ethernet_has_no_mac() {
        let mut m = msg(MAC, vec![]);
        m.set_htype(HType::from(32u8));
        assert_eq!(client_mac(&m), None);
        let m = msg(MAC, vec![]);
        assert_eq!(client_mac(&m), Some(MacAddr(MAC)));
    }
}
