//! kiln netboot server (DHCP, TFTP, HTTP): see DESIGN.md, "The netboot server".
pub mod artifacts;
pub mod config;
pub mod dhcp;
pub mod http;
pub mod ipxe;
pub mod leases;
pub mod metrics;
pub mod rpi;
pub mod serve;
pub mod state;
pub mod tftp;
