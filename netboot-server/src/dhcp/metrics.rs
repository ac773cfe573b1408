//! DHCP counters, for `/metrics`: messages received and sent by type,
//! requests ignored, datagrams that were not DHCP, send failures.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use dhcproto::v4::MessageType;

/// The message types counted; anything else counts as "other".
const TYPES: [(MessageType, &str); 8] = [
    (MessageType::Discover, "discover"),
    (MessageType::Offer, "offer"),
    (MessageType::Request, "request"),
    (MessageType::Decline, "decline"),
    (MessageType::Ack, "ack"),
    (MessageType::Nak, "nak"),
    (MessageType::Release, "release"),
    (MessageType::Inform, "inform"),
];
const OTHER: usize = TYPES.len();

/// Counters; cheap to update from any task.
#[derive(Debug, Default)]
pub struct DhcpMetrics {
    received: [AtomicU64; OTHER + 1],
    sent: [AtomicU64; OTHER + 1],
    /// Requests that got no reply (not a netboot client in proxy mode, not
    /// admitted, another server's, ...).
    pub ignored: AtomicU64,
    /// Datagrams that did not parse as DHCP.
    pub malformed: AtomicU64,
    /// Replies that could not be encoded or sent, lease store failures.
    pub errors: AtomicU64,
}

fn index(ty: MessageType) -> usize {
    TYPES.iter().position(|(t, _)| *t == ty).unwrap_or(OTHER)
}

impl DhcpMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn count_received(&self, ty: MessageType) {
        self.received[index(ty)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_sent(&self, ty: MessageType) {
        self.sent[index(ty)].fetch_add(1, Ordering::Relaxed);
    }

    /// Received messages of a type.
    pub fn received(&self, ty: MessageType) -> u64 {
        self.received[index(ty)].load(Ordering::Relaxed)
    }

    /// Sent messages of a type.
    pub fn sent(&self, ty: MessageType) -> u64 {
        self.sent[index(ty)].load(Ordering::Relaxed)
    }

    /// The counters in Prometheus text format.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let names = TYPES.iter().map(|(_, n)| *n).chain(["other"]);
        out.push_str("# HELP kiln_dhcp_received_total DHCP messages received, by type.\n");
        out.push_str("# TYPE kiln_dhcp_received_total counter\n");
        for (i, n) in names.clone().enumerate() {
            let v = self.received[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "kiln_dhcp_received_total{{type=\"{n}\"}} {v}");
        }
        out.push_str("# HELP kiln_dhcp_sent_total DHCP messages sent, by type.\n");
        out.push_str("# TYPE kiln_dhcp_sent_total counter\n");
        for (i, n) in names.enumerate() {
            let v = self.sent[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "kiln_dhcp_sent_total{{type=\"{n}\"}} {v}");
        }
        for (name, help, c) in [
            (
                "kiln_dhcp_ignored_total",
                "DHCP requests that got no reply.",
                &self.ignored,
            ),
            (
                "kiln_dhcp_malformed_total",
                "Datagrams on the DHCP ports that were not DHCP.",
                &self.malformed,
            ),
            (
                "kiln_dhcp_errors_total",
                "DHCP replies not sent and lease store failures.",
                &self.errors,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", c.load(Ordering::Relaxed));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let m = DhcpMetrics::new();
        m.count_received(MessageType::Discover);
        m.count_received(MessageType::Discover);
        m.count_received(MessageType::Unknown(99));
        m.count_sent(MessageType::Offer);
        m.malformed.fetch_add(3, Ordering::Relaxed);
        assert_eq!(m.received(MessageType::Discover), 2);
        assert_eq!(m.sent(MessageType::Offer), 1);
        let text = m.render_prometheus();
        assert!(text.contains("kiln_dhcp_received_total{type=\"discover\"} 2\n"));
        assert!(text.contains("kiln_dhcp_received_total{type=\"other\"} 1\n"));
        assert!(text.contains("kiln_dhcp_sent_total{type=\"offer\"} 1\n"));
        assert!(text.contains("kiln_dhcp_malformed_total 3\n"));
    }
}
