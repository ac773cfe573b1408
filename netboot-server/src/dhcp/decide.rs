//! The DHCP decision: a pure function of the request, the configuration, the
//! inventory and the leases (read only), and the time. It says what to send
//! where, and what to change in the lease store; the server does both.
//!
//! proxyDHCP (the default) answers network boot clients only and never an
//! address: on port 67 a DHCPOFFER with yiaddr 0.0.0.0 to a DISCOVER, on port
//! 4011 a DHCPACK to the REQUEST (or INFORM) a PXE client sends there after it
//! has its address from the site's DHCP server. Full mode is an RFC 2131
//! server for one pool, and adds the same boot information for netboot
//! clients.
//!
//! What each kind of client gets:
//! - PXE ROMs (BIOS, x86-64 and arm64 UEFI): siaddr = this server, the iPXE
//!   binary for the architecture as boot file (file field and option 67),
//!   option 60 "PXEClient", and option 43 with PXE_DISCOVERY_CONTROL = 8 ("boot
//!   the file in this offer, no boot server discovery").
//! - UEFI HTTP boot: option 60 "HTTPClient" (the firmware ignores offers
//!   without it) and the URL of the iPXE EFI binary as boot file.
//! - iPXE: the URL of its script as boot file.
//! - a Raspberry Pi's bootloader: option 43 with the PXE boot menu it looks
//!   for ("Raspberry Pi Boot"), option 60 "PXEClient", option 66 = this
//!   server's address as text, siaddr, and option 97 echoed. It fetches
//!   fixed file names, so no boot file.
//!
//! Option 97 (client machine GUID) is echoed to every netboot client, as
//! PXE servers do.

use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};

use crate::config::Admission;
use crate::dhcp::client::{classify, client_mac, BootArch, Client, ClientKind, MacAddr};
use crate::dhcp::config::{expand, DhcpConfig, Mode, Pool};
use crate::dhcp::lease::{LeaseOp, LeaseState, LeaseStore};
use crate::dhcp::packet::{request_type, requested_addr, server_id};

/// The DHCP server port.
pub const DHCP_SERVER_PORT: u16 = 67;
/// The DHCP client port.
pub const DHCP_CLIENT_PORT: u16 = 68;
/// The PXE boot server port (proxyDHCP requests).
pub const PXE_PORT: u16 = 4011;

/// What the inventory knows of a machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineInfo {
    /// The address reserved for it (full mode); inside the pool's subnet, in
    /// or out of the dynamic range.
    pub reserved_addr: Option<Ipv4Addr>,
    pub image: Option<String>,
    pub hostname: Option<String>,
    /// False for a machine the inventory lists but must not boot.
    pub allowed: bool,
}

/// The machine inventory, as the decision sees it.
pub trait Inventory {
    /// The machine with this MAC, if the inventory lists it.
    fn lookup(&self, mac: MacAddr) -> Option<MachineInfo>;

    /// The machine that sent a request: by MAC, or by the Raspberry Pi serial
    /// or SMBIOS UUID of its option 97 where the inventory knows those.
    fn lookup_client(
        &self,
        mac: MacAddr,
        _serial: Option<&str>,
        _uuid: Option<&str>,
    ) -> Option<MachineInfo> {
        self.lookup(mac)
    }

    /// The machine an address is reserved for, if any: a reserved address is
    /// never handed to another machine.
    fn reserved_for(&self, _addr: Ipv4Addr) -> Option<MacAddr> {
        None
    }
}

/// An inventory that lists nobody.
pub struct NoInventory;

impl Inventory for NoInventory {
    fn lookup(&self, _mac: MacAddr) -> Option<MachineInfo> {
        None
    }
}

impl Inventory for std::collections::BTreeMap<MacAddr, MachineInfo> {
    fn lookup(&self, mac: MacAddr) -> Option<MachineInfo> {
        self.get(&mac).cloned()
    }
    fn reserved_for(&self, addr: Ipv4Addr) -> Option<MacAddr> {
        self.iter()
            .find(|(_, m)| m.reserved_addr == Some(addr))
            .map(|(mac, _)| *mac)
    }
}

/// Everything the decision reads besides the request.
pub struct DhcpContext<'a> {
    pub config: &'a DhcpConfig,
    /// Who may boot. Under `Allowlist`, machines the inventory does not list
    /// (or lists as not allowed) get no boot information: proxy mode ignores
    /// them, full mode still gives them an address.
    pub admission: Admission,
    pub inventory: &'a dyn Inventory,
    /// The leases (full mode; proxy mode never reads it).
    pub leases: &'a dyn LeaseStore,
    /// Unix seconds.
    pub now: i64,
}

/// Which of the server's sockets a request arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// The DHCP port (67).
    Dhcp,
    /// The PXE port (4011), where PXE clients send proxyDHCP requests.
    Pxe,
}

/// A request as it arrived.
#[derive(Clone, Debug)]
pub struct Request {
    pub msg: Message,
    /// The socket it arrived on.
    pub port: Port,
    /// The sender.
    pub src: SocketAddrV4,
}

/// Where a reply goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyTo {
    /// 255.255.255.255:68 (the client has no address yet, or asked for
    /// broadcast, or it is a DHCPNAK).
    Broadcast,
    /// A unicast address and port: the client's ciaddr:68, the relay's
    /// giaddr:67, or the sender of a port-4011 request.
    Unicast(SocketAddrV4),
}

/// A reply and what to change in the lease store before sending it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub msg: Message,
    pub to: ReplyTo,
    pub lease: Option<LeaseOp>,
}

/// Why a request gets nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Not a BOOTREQUEST, or no option 53.
    NotARequest,
    /// Not an Ethernet client (htype 1, hlen 6).
    NoMac,
    /// proxyDHCP, and not a network boot client.
    NotNetboot,
    /// A network boot client kiln has no boot file for.
    UnsupportedArch(Option<u16>),
    /// The admission policy keeps this machine out.
    NotAdmitted,
    /// The message is for another DHCP server.
    OtherServer(Ipv4Addr),
    /// Relayed from a network this server has no pool for.
    UnknownNetwork(Ipv4Addr),
    /// No free address.
    PoolExhausted,
    /// A message this server does not answer in this mode, on this port.
    NotHandled(MessageType),
    /// A message that is not well-formed for its type (such as a DHCPREQUEST
    /// with neither a requested address nor ciaddr, or a DECLINE of an
    /// address the client does not hold).
    Invalid(&'static str),
    /// The lease store failed.
    Store(String),
}

/// What to do about a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Reply(Box<Reply>),
    /// No reply, only a lease change (DECLINE, RELEASE, or a client that took
    /// another server's offer).
    Record(LeaseOp),
    Ignore(Ignored),
}

impl Decision {
    /// The reply, if there is one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Decision::Reply(r) => Some(r),
            _ => None,
        }
    }
}

/// Decides what to do about a request.
pub fn decide(req: &Request, ctx: &DhcpContext<'_>) -> Decision {
    let Some(ty) = request_type(&req.msg) else {
        return Decision::Ignore(Ignored::NotARequest);
    };
    let Some(mac) = client_mac(&req.msg) else {
        return Decision::Ignore(Ignored::NoMac);
    };
    let client = classify(&req.msg, Some(mac));
    let machine =
        ctx.inventory
            .lookup_client(mac, client.serial.as_deref(), client.uuid.as_deref());
    let admitted = match ctx.admission {
        Admission::Auto => machine.as_ref().is_none_or(|m| m.allowed),
        Admission::Allowlist => machine.as_ref().is_some_and(|m| m.allowed),
    };
    let d = Decider {
        req,
        ctx,
        ty,
        mac,
        client,
        machine,
        admitted,
    };
    if req.port == Port::Pxe {
        return d.pxe_port();
    }
    match &ctx.config.mode {
        Mode::Proxy => d.proxy(),
        Mode::Full(pool) => d.full(pool),
    }
}

struct Decider<'r, 'c> {
    req: &'r Request,
    ctx: &'r DhcpContext<'c>,
    ty: MessageType,
    mac: MacAddr,
    client: Client,
    machine: Option<MachineInfo>,
    admitted: bool,
}

/// The boot information of a reply.
struct Boot {
    /// Option 60 to send.
    vendor_class: &'static str,
    /// The boot file (file field and option 67).
    file: Option<String>,
    /// Option 43.
    vendor_opts: Option<Vec<u8>>,
    /// Option 66, as text.
    tftp_server: Option<String>,
}

impl Decider<'_, '_> {
    fn server(&self) -> Ipv4Addr {
        self.ctx.config.server_addr
    }

    /// The boot information for this client, or why it gets none.
    fn boot(&self) -> Result<Boot, Ignored> {
        let files = &self.ctx.config.boot;
        let server = self.server();
        let url = |t: &str| expand(t, server, self.mac);
        let pxe = |file: &str| Boot {
            vendor_class: "PXEClient",
            file: Some(url(file)),
            vendor_opts: Some(pxe_boot_file_options()),
            tftp_server: None,
        };
        let boot = match self.client.kind {
            ClientKind::Other => return Err(Ignored::NotNetboot),
            ClientKind::UnsupportedArch(code) => return Err(Ignored::UnsupportedArch(code)),
            _ if !self.admitted => return Err(Ignored::NotAdmitted),
            ClientKind::Ipxe(_) => Boot {
                // iPXE takes a ProxyDHCP offer for one only with "PXEClient".
                vendor_class: "PXEClient",
                file: Some(url(&files.ipxe_script)),
                vendor_opts: None,
                tftp_server: None,
            },
            ClientKind::Pxe(BootArch::X86Bios) => pxe(&files.bios),
            ClientKind::Pxe(BootArch::X64Uefi) => pxe(&files.uefi_x64),
            ClientKind::Pxe(BootArch::Arm64Uefi) => pxe(&files.uefi_arm64),
            ClientKind::Pxe(BootArch::X86Uefi32) => match &files.uefi_ia32 {
                Some(f) => pxe(f),
                None => return Err(Ignored::UnsupportedArch(self.client.arch_code)),
            },
            ClientKind::Http(arch) => {
                let file = match arch {
                    BootArch::X64Uefi => &files.http_x64,
                    BootArch::Arm64Uefi => &files.http_arm64,
                    _ => return Err(Ignored::UnsupportedArch(self.client.arch_code)),
                };
                Boot {
                    vendor_class: "HTTPClient",
                    file: Some(url(file)),
                    vendor_opts: None,
                    tftp_server: None,
                }
            }
            ClientKind::RaspberryPi(_) => Boot {
                vendor_class: "PXEClient",
                file: None,
                vendor_opts: Some(raspberry_pi_options(&files.rpi_menu)),
                tftp_server: Some(server.to_string()),
            },
        };
        Ok(boot)
    }

    /// A reply of type `ty` with the request's xid, flags, giaddr and chaddr,
    /// and option 54.
    fn base(&self, ty: MessageType) -> Message {
        let m = &self.req.msg;
        let z = Ipv4Addr::UNSPECIFIED;
        let mut r = Message::new_with_id(m.xid(), z, z, z, m.giaddr(), m.chaddr());
        r.set_opcode(Opcode::BootReply)
            .set_htype(m.htype())
            .set_flags(m.flags());
        r.opts_mut().insert(DhcpOption::MessageType(ty));
        r.opts_mut()
            .insert(DhcpOption::ServerIdentifier(self.server()));
        // Echoed as RFC 6842 (client identifier) and RFC 3046 (relay agent
        // information) require.
        for code in [
            OptionCode::ClientIdentifier,
            OptionCode::RelayAgentInformation,
        ] {
            if let Some(o) = m.opts().get(code) {
                r.opts_mut().insert(o.clone());
            }
        }
        r
    }

    fn add_boot(&self, r: &mut Message, boot: &Boot) {
        r.set_siaddr(self.server());
        r.opts_mut().insert(DhcpOption::ClassIdentifier(
            boot.vendor_class.as_bytes().to_vec(),
        ));
        if let Some(file) = &boot.file {
            // The file field holds 127 bytes and a NUL; longer names (URLs)
            // go in option 67 only.
            if file.len() < 128 {
                r.set_fname_str(file);
            }
            r.opts_mut()
                .insert(DhcpOption::BootfileName(file.as_bytes().to_vec()));
        }
        if let Some(v) = &boot.vendor_opts {
            r.opts_mut().insert(DhcpOption::VendorExtensions(v.clone()));
        }
        if let Some(t) = &boot.tftp_server {
            r.opts_mut()
                .insert(DhcpOption::TFTPServerName(t.as_bytes().to_vec()));
        }
        if let Some(id) = &self.client.machine_id {
            r.opts_mut()
                .insert(DhcpOption::ClientMachineIdentifier(id.clone()));
        }
    }

    /// RFC 2131 4.1: to the relay if there is one, else to ciaddr if the
    /// client has one, else broadcast.
    fn destination(&self) -> ReplyTo {
        let m = &self.req.msg;
        if !m.giaddr().is_unspecified() {
            ReplyTo::Unicast(SocketAddrV4::new(m.giaddr(), DHCP_SERVER_PORT))
        } else if !m.ciaddr().is_unspecified() {
            ReplyTo::Unicast(SocketAddrV4::new(m.ciaddr(), DHCP_CLIENT_PORT))
        } else {
            // Unicast to yiaddr before the client has configured it would need
            // an ARP entry made by hand; broadcast reaches it as well.
            ReplyTo::Broadcast
        }
    }

    fn reply(&self, msg: Message, to: ReplyTo, lease: Option<LeaseOp>) -> Decision {
        Decision::Reply(Box::new(Reply { msg, to, lease }))
    }

    // ---- proxyDHCP, port 67

    fn proxy(&self) -> Decision {
        match self.ty {
            MessageType::Discover => match self.boot() {
                Ok(boot) => {
                    let mut r = self.base(MessageType::Offer);
                    self.add_boot(&mut r, &boot);
                    self.reply(r, self.destination(), None)
                }
                Err(why) => Decision::Ignore(why),
            },
            // A REQUEST or INFORM on 67 naming this server: answer as on 4011.
            MessageType::Request | MessageType::Inform
                if server_id(&self.req.msg) == Some(self.server()) =>
            {
                self.proxy_ack(self.destination())
            }
            MessageType::Request
            | MessageType::Inform
            | MessageType::Decline
            | MessageType::Release => match server_id(&self.req.msg) {
                Some(other) => Decision::Ignore(Ignored::OtherServer(other)),
                None => Decision::Ignore(Ignored::NotHandled(self.ty)),
            },
            ty => Decision::Ignore(Ignored::NotHandled(ty)),
        }
    }

    // ---- port 4011 (either mode)

    fn pxe_port(&self) -> Decision {
        match self.ty {
            MessageType::Request | MessageType::Inform => {
                let src = self.req.src;
                let to = if src.ip().is_unspecified() {
                    ReplyTo::Broadcast
                } else {
                    ReplyTo::Unicast(src)
                };
                self.proxy_ack(to)
            }
            ty => Decision::Ignore(Ignored::NotHandled(ty)),
        }
    }

    /// A DHCPACK with boot information and no address.
    fn proxy_ack(&self, to: ReplyTo) -> Decision {
        match self.boot() {
            Ok(boot) => {
                let mut r = self.base(MessageType::Ack);
                r.set_ciaddr(self.req.msg.ciaddr());
                self.add_boot(&mut r, &boot);
                self.reply(r, to, None)
            }
            Err(why) => Decision::Ignore(why),
        }
    }

    // ---- full mode

    fn full(&self, pool: &Pool) -> Decision {
        let giaddr = self.req.msg.giaddr();
        if !giaddr.is_unspecified() && !pool.in_subnet(giaddr) {
            return Decision::Ignore(Ignored::UnknownNetwork(giaddr));
        }
        let result = match self.ty {
            MessageType::Discover => self.discover(pool),
            MessageType::Request => self.request(pool),
            MessageType::Decline => self.decline(pool),
            MessageType::Release => self.release(),
            MessageType::Inform => Ok(self.inform(pool)),
            ty => Ok(Decision::Ignore(Ignored::NotHandled(ty))),
        };
        result.unwrap_or_else(|e| Decision::Ignore(Ignored::Store(format!("{e:#}"))))
    }

    fn reserved(&self, pool: &Pool) -> Option<Ipv4Addr> {
        self.machine
            .as_ref()
            .and_then(|m| m.reserved_addr)
            .filter(|a| pool.in_subnet(*a))
    }

    /// Whether `addr` may be (or stay) this client's: in the range or
    /// reserved for it, not reserved for another, not the server's or the
    /// router's, and with no live entry of another client or a decline.
    fn usable(&self, pool: &Pool, addr: Ipv4Addr) -> anyhow::Result<bool> {
        let inv = self.ctx.inventory;
        let reserved_for = inv.reserved_for(addr);
        let mine = reserved_for == Some(self.mac) || self.reserved(pool) == Some(addr);
        if !(pool.in_range(addr) || mine) || !pool.in_subnet(addr) {
            return Ok(false);
        }
        if reserved_for.is_some_and(|m| m != self.mac) {
            return Ok(false);
        }
        if addr == self.server() || Some(addr) == pool.router {
            return Ok(false);
        }
        Ok(match self.ctx.leases.by_addr(addr)? {
            None => true,
            Some(l) if !l.is_live(self.ctx.now) => true,
            Some(l) => l.mac == self.mac && l.state != LeaseState::Declined,
        })
    }

    /// The address to offer: the reservation, the client's current binding,
    /// the address it asks for, or the lowest free one.
    fn pick(&self, pool: &Pool) -> anyhow::Result<Option<Ipv4Addr>> {
        if let Some(r) = self.reserved(pool) {
            if self.usable(pool, r)? {
                return Ok(Some(r));
            }
            tracing::warn!(mac = %self.mac, addr = %r, "the reserved address is held by another client; offering one from the range");
        }
        if let Some(l) = self.ctx.leases.by_mac(self.mac)? {
            if self.usable(pool, l.addr)? {
                return Ok(Some(l.addr));
            }
        }
        if let Some(a) = requested_addr(&self.req.msg) {
            if self.usable(pool, a)? {
                return Ok(Some(a));
            }
        }
        let inv = self.ctx.inventory;
        let server = self.server();
        let router = pool.router;
        let me = self.mac;
        let skip = |a: Ipv4Addr| {
            a == server || Some(a) == router || inv.reserved_for(a).is_some_and(|m| m != me)
        };
        self.ctx
            .leases
            .find_free(pool.first, pool.last, self.ctx.now, &skip)
    }

    /// Address, pool options and (for an admitted netboot client) boot
    /// information.
    fn lease_reply(&self, pool: &Pool, ty: MessageType, addr: Option<Ipv4Addr>) -> Message {
        let mut r = self.base(ty);
        if let Some(a) = addr {
            r.set_yiaddr(a);
            r.opts_mut()
                .insert(DhcpOption::AddressLeaseTime(pool.lease_secs));
            r.opts_mut()
                .insert(DhcpOption::Renewal(pool.lease_secs / 2));
            r.opts_mut()
                .insert(DhcpOption::Rebinding(pool.lease_secs / 8 * 7));
        }
        r.opts_mut()
            .insert(DhcpOption::SubnetMask(pool.subnet_mask));
        r.opts_mut()
            .insert(DhcpOption::BroadcastAddr(pool.broadcast()));
        if let Some(router) = pool.router {
            r.opts_mut().insert(DhcpOption::Router(vec![router]));
        }
        if !pool.dns.is_empty() {
            r.opts_mut()
                .insert(DhcpOption::DomainNameServer(pool.dns.clone()));
        }
        if let Some(d) = &pool.domain {
            r.opts_mut().insert(DhcpOption::DomainName(d.clone()));
        }
        if let Some(h) = self.machine.as_ref().and_then(|m| m.hostname.clone()) {
            r.opts_mut().insert(DhcpOption::Hostname(h));
        }
        if let Ok(boot) = self.boot() {
            self.add_boot(&mut r, &boot);
        }
        r
    }

    fn discover(&self, pool: &Pool) -> anyhow::Result<Decision> {
        let Some(addr) = self.pick(pool)? else {
            return Ok(Decision::Ignore(Ignored::PoolExhausted));
        };
        // A live lease of the same address stays as it is; otherwise hold the
        // address for the client while it decides.
        let bound = self.ctx.leases.by_addr(addr)?.is_some_and(|l| {
            l.mac == self.mac && l.state == LeaseState::Bound && l.is_live(self.ctx.now)
        });
        let lease = (!bound).then(|| LeaseOp::Offer {
            mac: self.mac,
            addr,
            until: self.ctx.now + i64::from(pool.offer_secs),
        });
        let r = self.lease_reply(pool, MessageType::Offer, Some(addr));
        Ok(self.reply(r, self.destination(), lease))
    }

    fn nak(&self, why: &str) -> Decision {
        tracing::debug!(mac = %self.mac, why, "DHCPNAK");
        let mut r = self.base(MessageType::Nak);
        r.opts_mut().insert(DhcpOption::Message(why.to_string()));
        // RFC 2131 4.1: a NAK is broadcast, through the relay if there is one
        // (with the broadcast bit set so the relay broadcasts it).
        let giaddr = self.req.msg.giaddr();
        if giaddr.is_unspecified() {
            self.reply(r, ReplyTo::Broadcast, None)
        } else {
            r.set_flags(Flags::default().set_broadcast());
            self.reply(
                r,
                ReplyTo::Unicast(SocketAddrV4::new(giaddr, DHCP_SERVER_PORT)),
                None,
            )
        }
    }

    /// DHCPREQUEST. An address is ACKed when it is usable for the client
    /// (`usable`); otherwise NAKed. One leniency against RFC 2131
    /// 4.3.2, which has a server stay silent on an INIT-REBOOT or REBINDING
    /// client it has no record of: on its own subnet this server ACKs a free
    /// address (an authoritative server, as dnsmasq's `dhcp-authoritative`),
    /// so clients keep their addresses across a lost state file.
    fn request(&self, pool: &Pool) -> anyhow::Result<Decision> {
        let m = &self.req.msg;
        let sid = server_id(m);
        let requested = requested_addr(m);
        let ciaddr = m.ciaddr();
        // RFC 2131 4.3.2: SELECTING (server id), INIT-REBOOT (requested
        // address, no ciaddr), RENEWING/REBINDING (ciaddr).
        let addr = match sid {
            Some(s) if s != self.server() => {
                // The client took another server's offer: drop ours.
                return Ok(match self.ctx.leases.by_mac(self.mac)? {
                    Some(l) if l.state == LeaseState::Offered => {
                        Decision::Record(LeaseOp::Release {
                            mac: self.mac,
                            addr: l.addr,
                        })
                    }
                    _ => Decision::Ignore(Ignored::OtherServer(s)),
                });
            }
            Some(_) => match requested.or((!ciaddr.is_unspecified()).then_some(ciaddr)) {
                Some(a) => a,
                None => {
                    return Ok(Decision::Ignore(Ignored::Invalid(
                        "REQUEST without an address",
                    )))
                }
            },
            None => match (requested, ciaddr.is_unspecified()) {
                (Some(a), true) => a,
                (_, false) => ciaddr,
                (None, true) => {
                    return Ok(Decision::Ignore(Ignored::Invalid(
                        "REQUEST without an address",
                    )))
                }
            },
        };
        if !pool.in_subnet(addr) {
            return Ok(self.nak("address not on this network"));
        }
        if !self.usable(pool, addr)? {
            return Ok(self.nak("address not available"));
        }
        // A machine with a usable reservation gets that address, not another.
        if let Some(r) = self.reserved(pool) {
            if r != addr && self.usable(pool, r)? {
                return Ok(self.nak("address reserved elsewhere for this machine"));
            }
        }
        let lease = LeaseOp::Commit {
            mac: self.mac,
            addr,
            expires: self.ctx.now + i64::from(pool.lease_secs),
        };
        let mut r = self.lease_reply(pool, MessageType::Ack, Some(addr));
        r.set_ciaddr(ciaddr);
        Ok(self.reply(r, self.destination(), Some(lease)))
    }

    fn decline(&self, pool: &Pool) -> anyhow::Result<Decision> {
        let m = &self.req.msg;
        if let Some(s) = server_id(m).filter(|s| *s != self.server()) {
            return Ok(Decision::Ignore(Ignored::OtherServer(s)));
        }
        let Some(addr) = requested_addr(m) else {
            return Ok(Decision::Ignore(Ignored::Invalid(
                "DECLINE without an address",
            )));
        };
        Ok(match self.ctx.leases.by_addr(addr)? {
            Some(l) if l.mac == self.mac && l.state != LeaseState::Declined => {
                tracing::warn!(mac = %self.mac, %addr, "the client found its address in use; keeping it out of the pool");
                Decision::Record(LeaseOp::Decline {
                    mac: self.mac,
                    addr,
                    until: self.ctx.now + i64::from(pool.decline_secs),
                })
            }
            _ => Decision::Ignore(Ignored::Invalid(
                "DECLINE of an address the client does not hold",
            )),
        })
    }

    fn release(&self) -> anyhow::Result<Decision> {
        let m = &self.req.msg;
        if let Some(s) = server_id(m).filter(|s| *s != self.server()) {
            return Ok(Decision::Ignore(Ignored::OtherServer(s)));
        }
        let addr = m.ciaddr();
        Ok(match self.ctx.leases.by_addr(addr)? {
            Some(l) if l.mac == self.mac && l.state != LeaseState::Declined => {
                Decision::Record(LeaseOp::Release {
                    mac: self.mac,
                    addr,
                })
            }
            _ => Decision::Ignore(Ignored::Invalid(
                "RELEASE of an address the client does not hold",
            )),
        })
    }

    fn inform(&self, pool: &Pool) -> Decision {
        let mut r = self.lease_reply(pool, MessageType::Ack, None);
        r.set_ciaddr(self.req.msg.ciaddr());
        self.reply(r, self.destination(), None)
    }
}

/// Option 43 for a PXE ROM booting the file of the offer:
/// PXE_DISCOVERY_CONTROL (6) = 8, "download the boot file of this offer; no
/// boot server discovery, no menu" (PXE 2.1, table 2-1).
pub fn pxe_boot_file_options() -> Vec<u8> {
    vec![6, 1, 8, 255]
}

/// Option 43 for a Raspberry Pi bootloader, as dnsmasq's
/// `pxe-service=0,"Raspberry Pi Boot"` makes it and the Pi documentation
/// shows it: PXE_DISCOVERY_CONTROL (6) = 3 (no broadcast or multicast
/// discovery), PXE_MENU_PROMPT (10) = timeout 0 and "PXE", PXE_BOOT_MENU (9) =
/// one item of type 0 described as `menu` (the string the bootloader matches,
/// "Raspberry Pi Boot"), and the end mark.
pub fn raspberry_pi_options(menu: &str) -> Vec<u8> {
    // A sub-option's length is one byte: a menu text past 252 bytes is cut.
    let menu = &menu.as_bytes()[..menu.len().min(252)];
    let mut v = vec![6, 1, 3, 10, 4, 0, b'P', b'X', b'E', 9];
    v.push(3 + menu.len() as u8);
    v.extend_from_slice(&[0, 0, menu.len() as u8]);
    v.extend_from_slice(menu);
    v.push(255);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raspberry_pi_option_43_matches_the_documented_bytes() {
        // The Raspberry Pi network boot documentation's tcpdump of a working
        // reply: "Vendor-Option Option 43, length 32: 6.1.3.10.4.0.80.88.69.9.20.0.0.17.82.97.115.112.98.101.114.114.121.32.80.105.32.66.111.111.116.255"
        let documented: Vec<u8> = "6.1.3.10.4.0.80.88.69.9.20.0.0.17.82.97.115.112.98.101.114.114.121.32.80.105.32.66.111.111.116.255"
            .split('.')
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(raspberry_pi_options("Raspberry Pi Boot"), documented);
        assert_eq!(documented.len(), 32);
    }

    #[test]
    fn long_menu_text_is_cut_to_fit() {
        let v = raspberry_pi_options(&"x".repeat(300));
        assert_eq!(v[10], 255);
        assert_eq!(v[13], 252);
        assert_eq!(v.len(), 10 + 1 + 3 + 252 + 1);
    }
}
