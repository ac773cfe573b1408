//! DHCP for network boot: proxyDHCP (the default) or a full server.
//!
//! - [`client`]: who is asking (MAC, PXE/HTTP/iPXE/Raspberry Pi, architecture).
//! - [`decide()`]: the pure decision, request + configuration + inventory +
//!   leases + time -> reply and lease change.
//! - [`lease`]: the [`LeaseStore`] trait and an in-memory store.
//! - [`packet`]: bytes to messages and back, never panicking.
//! - [`server`]: the sockets (67, and 4011 for PXE), one task each.
//! - [`metrics`]: counters by message type.

pub mod client;
pub mod config;
pub mod decide;
pub mod lease;
pub mod metrics;
pub mod packet;
pub mod server;

pub use client::{classify, client_mac, BootArch, Client, ClientKind, MacAddr, PiModel};
pub use config::{BootFiles, DhcpConfig, Mode, Pool};
pub use decide::{
    decide, Decision, DhcpContext, Ignored, Inventory, MachineInfo, NoInventory, Port, Reply,
    ReplyTo, Request,
};
pub use lease::{apply, Lease, LeaseOp, LeaseState, LeaseStore, MemoryLeaseStore};
pub use metrics::DhcpMetrics;
pub use server::{DhcpServer, ServerOptions};

/// The inventory of `kiln serve`'s configuration: every listed machine is
/// allowed, with its reserved address, image and hostname. A machine is found
/// by its MAC, else by the serial or UUID the request carries.
impl Inventory for crate::config::ServeConfig {
    fn lookup(&self, mac: MacAddr) -> Option<MachineInfo> {
        self.lookup_client(mac, None, None)
    }

    fn lookup_client(
        &self,
        mac: MacAddr,
        serial: Option<&str>,
        uuid: Option<&str>,
    ) -> Option<MachineInfo> {
        self.find_machine(&mac.to_string(), serial, uuid)
            .map(|m| MachineInfo {
                reserved_addr: m.address,
                image: m.image.clone(),
                hostname: m.hostname.clone(),
                allowed: true,
            })
    }

    fn reserved_for(&self, addr: std::net::Ipv4Addr) -> Option<MacAddr> {
        self.machines
            .iter()
            .find(|m| m.address == Some(addr))
            .and_then(|m| m.mac.as_deref()?.parse().ok())
    }
}
