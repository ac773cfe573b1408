//! kiln netboot server (DHCP, TFTP, HTTP): see DESIGN.md, "The netboot server".
pub mod artifacts;
pub mod config;
pub mod dhcp;
pub mod http;
pub mod ipxe;
pub mod join;
pub mod leases;
pub mod metrics;
pub mod rpi;
pub mod serve;
pub mod state;
pub mod tftp;

/// Unix time in milliseconds (0 if the clock is before 1970).
pub(crate) fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix time in seconds.
pub(crate) fn unix_now() -> i64 {
    unix_now_ms() / 1000
}
