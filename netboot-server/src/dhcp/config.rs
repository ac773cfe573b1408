//! What the DHCP side is configured with: the mode, the server's address, the
//! boot files and URLs, and (full mode) the address pool.

use std::net::Ipv4Addr;

use crate::dhcp::client::MacAddr;

/// How the server takes part in DHCP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// proxyDHCP: boot information for network boot clients only, beside the
    /// site's DHCP server; never offers an address.
    Proxy,
    /// A full DHCP server for one pool.
    Full(Pool),
}

/// The DHCP side's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpConfig {
    pub mode: Mode,
    /// The server's own address on the boot network: option 54 (server
    /// identifier), siaddr (TFTP server) and the Raspberry Pi's option 66.
    pub server_addr: Ipv4Addr,
    pub boot: BootFiles,
}

/// The boot file each kind of client gets. Strings that are URLs may contain
/// `{server}` (the server's address) and `{mac}` (the client's MAC,
/// `aa:bb:cc:dd:ee:ff`), filled in per reply; anything else, such as iPXE's own
/// `${...}` settings, is passed through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootFiles {
    /// BIOS PXE ROMs, by TFTP.
    pub bios: String,
    /// x86-64 UEFI PXE, by TFTP. `snponly.efi` drives the NIC through the
    /// firmware's own SNP driver (what OVMF needs); `ipxe-amd64.efi` brings
    /// iPXE's drivers.
    pub uefi_x64: String,
    /// 32-bit x86 UEFI PXE, by TFTP; Debian ships no such iPXE build, so
    /// such clients are not served unless one is configured.
    pub uefi_ia32: Option<String>,
    /// arm64 UEFI PXE, by TFTP.
    pub uefi_arm64: String,
    /// x86-64 UEFI HTTP boot: the URL of an iPXE EFI binary.
    pub http_x64: String,
    /// arm64 UEFI HTTP boot: the URL of an iPXE EFI binary.
    pub http_arm64: String,
    /// iPXE: the URL of the machine's script.
    pub ipxe_script: String,
    /// The Raspberry Pi bootloader's option-43 match string (its EEPROM setting
    /// `PXE_OPTION43`, "Raspberry Pi Boot" unless changed).
    pub rpi_menu: String,
}

/// The file names Debian trixie's `ipxe` package ships (/usr/lib/ipxe).
pub mod debian {
    pub const UNDIONLY_KPXE: &str = "undionly.kpxe";
    pub const SNPONLY_EFI: &str = "snponly.efi";
    pub const IPXE_AMD64_EFI: &str = "ipxe-amd64.efi";
    pub const IPXE_ARM64_EFI: &str = "ipxe-arm64.efi";
}

impl BootFiles {
    /// The defaults, for an HTTP server at `http_base` (such as
    /// `http://{server}:8080`, no trailing slash): Debian's iPXE file names
    /// by TFTP, the same binaries under `/ipxe/` by HTTP, and the script at
    /// `/boot.ipxe?mac={mac}`.
    pub fn with_http_base(http_base: &str) -> BootFiles {
        BootFiles {
            bios: debian::UNDIONLY_KPXE.into(),
            uefi_x64: debian::SNPONLY_EFI.into(),
            uefi_ia32: None,
            uefi_arm64: debian::IPXE_ARM64_EFI.into(),
            http_x64: format!("{http_base}/ipxe/{}", debian::SNPONLY_EFI),
            http_arm64: format!("{http_base}/ipxe/{}", debian::IPXE_ARM64_EFI),
            ipxe_script: format!("{http_base}/boot.ipxe?mac={{mac}}"),
            rpi_menu: "Raspberry Pi Boot".into(),
        }
    }
}

impl Default for BootFiles {
    /// [`BootFiles::with_http_base`] with `http://{server}:8080`.
    fn default() -> Self {
        BootFiles::with_http_base("http://{server}:8080")
    }
}

/// Fills `{server}` and `{mac}` in a boot file name or URL.
pub fn expand(template: &str, server: Ipv4Addr, mac: MacAddr) -> String {
    template
        .replace("{server}", &server.to_string())
        .replace("{mac}", &mac.to_string())
}

/// A full-mode address pool: one subnet, a range inside it, and the options
/// handed out with its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    /// The first and last address handed out dynamically (inclusive).
    /// Inventory reservations may lie outside the range but inside the subnet.
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
    pub subnet_mask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    /// Lease time of a bound address, seconds.
    pub lease_secs: u32,
    /// How long an offered address is held for the client that was offered
    /// it, seconds.
    pub offer_secs: u32,
    /// How long an address a client declined (found in use) is kept out of
    /// the pool, seconds.
    pub decline_secs: u32,
}

impl Pool {
    /// A pool with the usual timings (1 h leases, 60 s offers, 10 min declines).
    pub fn new(first: Ipv4Addr, last: Ipv4Addr, subnet_mask: Ipv4Addr) -> Pool {
        Pool {
            first,
            last,
            subnet_mask,
            router: None,
            dns: Vec::new(),
            domain: None,
            lease_secs: 3600,
            offer_secs: 60,
            decline_secs: 600,
        }
    }

    /// Whether `addr` is in the pool's subnet (and is neither its network
    /// nor its broadcast address).
    pub fn in_subnet(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::from(self.subnet_mask);
        let net = u32::from(self.first) & mask;
        let a = u32::from(addr);
        a & mask == net && a != net && a != net | !mask
    }

    /// Whether `addr` is in the dynamic range.
    pub fn in_range(&self, addr: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&addr)
    }

    /// The subnet's broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        let mask = u32::from(self.subnet_mask);
        Ipv4Addr::from((u32::from(self.first) & mask) | !mask)
    }

    /// Checks that the pool makes sense; the error says what is wrong.
    pub fn validate(&self, server_addr: Ipv4Addr) -> Result<(), String> {
        let mask = u32::from(self.subnet_mask);
        if mask.leading_ones() + mask.trailing_zeros() != 32 || mask == 0 {
            return Err(format!(
                "subnet mask {} is not contiguous",
                self.subnet_mask
            ));
        }
        if self.first > self.last {
            return Err(format!("range {}-{} is backwards", self.first, self.last));
        }
        for end in [self.first, self.last] {
            if !self.in_subnet(end) {
                return Err(format!(
                    "range {}-{} is not inside the subnet of mask {}",
                    self.first, self.last, self.subnet_mask
                ));
            }
        }
        if self.lease_secs < 60 {
            return Err(format!(
                "lease time {} s is under a minute",
                self.lease_secs
            ));
        }
        if self.in_range(server_addr) {
            return Err(format!(
                "the server's own address {server_addr} is inside the range {}-{}",
                self.first, self.last
            ));
        }
        Ok(())
    }
}

impl Pool {
    /// The pool of the full-mode settings served on an interface with
    /// `interface_mask`, checked against the server's address. The subnet mask
    /// is the configured one, else the interface's, else /24.
    pub fn from_settings(
        f: &crate::config::FullDhcp,
        interface_mask: Option<Ipv4Addr>,
        server_addr: Ipv4Addr,
    ) -> Result<Pool, String> {
        let mask = f
            .subnet_mask
            .or(interface_mask)
            .unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
        let mut pool = Pool::new(f.first, f.last, mask);
        pool.router = f.router;
        pool.dns = f.dns.clone();
        pool.lease_secs = f.lease_seconds;
        pool.validate(server_addr)?;
        Ok(pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_mask_is_configured_else_the_interfaces_else_24() {
        let mut f = crate::config::FullDhcp {
            first: ip("10.88.1.0"),
            last: ip("10.88.255.254"),
            subnet_mask: None,
            router: None,
            dns: vec![],
            lease_seconds: 3600,
        };
        let server = ip("10.88.0.1");
        // /24 cannot hold this range.
        let e = Pool::from_settings(&f, None, server).unwrap_err();
        assert!(e.contains("not inside the subnet"), "{e}");
        let p = Pool::from_settings(&f, Some(ip("255.255.0.0")), server).unwrap();
        assert_eq!(p.subnet_mask, ip("255.255.0.0"));
        f.subnet_mask = Some(ip("255.255.128.0"));
        let e = Pool::from_settings(&f, Some(ip("255.255.0.0")), server).unwrap_err();
        assert!(
            e.contains("not inside the subnet of mask 255.255.128.0"),
            "{e}"
        );
    }

    #[test]
    fn pool_subnet_and_range() {
        let p = Pool::new(ip("10.0.0.100"), ip("10.0.0.200"), ip("255.255.255.0"));
        assert!(p.in_subnet(ip("10.0.0.1")));
        assert!(p.in_subnet(ip("10.0.0.254")));
        assert!(!p.in_subnet(ip("10.0.0.0")));
        assert!(!p.in_subnet(ip("10.0.0.255")));
        assert!(!p.in_subnet(ip("10.0.1.1")));
        assert!(p.in_range(ip("10.0.0.100")));
        assert!(p.in_range(ip("10.0.0.200")));
        assert!(!p.in_range(ip("10.0.0.201")));
        assert_eq!(p.broadcast(), ip("10.0.0.255"));
        assert_eq!(p.validate(ip("10.0.0.1")), Ok(()));
    }

    #[test]
    fn pool_validation_names_the_problem() {
        let mask = ip("255.255.255.0");
        let bad = Pool::new(ip("10.0.0.200"), ip("10.0.0.100"), mask);
        assert!(bad
            .validate(ip("10.0.0.1"))
            .unwrap_err()
            .contains("backwards"));
        let bad = Pool::new(ip("10.0.0.100"), ip("10.0.1.100"), mask);
        assert!(bad.validate(ip("10.0.0.1")).unwrap_err().contains("subnet"));
        let bad = Pool::new(ip("10.0.0.100"), ip("10.0.0.200"), ip("255.0.255.0"));
        assert!(bad
            .validate(ip("10.0.0.1"))
            .unwrap_err()
            .contains("contiguous"));
        let ok = Pool::new(ip("10.0.0.100"), ip("10.0.0.200"), mask);
        assert!(ok
            .validate(ip("10.0.0.150"))
            .unwrap_err()
            .contains("own address"));
    }

    #[test]
    fn expand_fills_server_and_mac_only() {
        let mac = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(
            expand(
                "http://{server}:8080/boot.ipxe?mac={mac}&x=${net0/mac}",
                ip("10.0.0.1"),
                mac
            ),
            "http://10.0.0.1:8080/boot.ipxe?mac=52:54:00:12:34:56&x=${net0/mac}"
        );
    }

    #[test]
    fn default_boot_files_are_debians() {
        let b = BootFiles::default();
        assert_eq!(b.bios, "undionly.kpxe");
        assert_eq!(b.uefi_x64, "snponly.efi");
        assert_eq!(b.uefi_arm64, "ipxe-arm64.efi");
        assert_eq!(b.http_x64, "http://{server}:8080/ipxe/snponly.efi");
        assert_eq!(b.ipxe_script, "http://{server}:8080/boot.ipxe?mac={mac}");
    }
}
