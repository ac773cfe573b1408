//! `/metrics` in the Prometheus text format: DHCP messages by type, TFTP and
//! HTTP transfers and bytes, boots by stage.
//!
//! Each server keeps its own counters as atomics on its hot path (no registry
//! lock per packet); this module renders them at scrape time. The text format
//! for plain counters and gauges is a few lines, which is why it is written
//! here rather than mirrored into a metrics crate's registry.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::dhcp::DhcpMetrics;
use crate::tftp::TftpStats;

/// HTTP counters.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Responses by (route, status).
    responses: Mutex<BTreeMap<(String, u16), u64>>,
    /// Body bytes of successful responses (by Content-Length).
    pub bytes_sent: AtomicU64,
    /// Boot stages reported by nodes, by stage name.
    stages: Mutex<BTreeMap<String, u64>>,
}

impl HttpMetrics {
    pub fn count_response(&self, route: &str, status: u16, bytes: u64) {
        *self
            .responses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route.to_string(), status))
            .or_default() += 1;
        if (200..300).contains(&status) {
            self.bytes_sent.fetch_add(bytes, Relaxed);
        }
    }

    pub fn count_stage(&self, stage: &str) {
        *self
            .stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(stage.to_string())
            .or_default() += 1;
    }
}

/// Every counter of the server.
#[derive(Debug, Default)]
pub struct Metrics {
    pub dhcp: Arc<DhcpMetrics>,
    pub tftp: Arc<TftpStats>,
    pub http: HttpMetrics,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

impl Metrics {
    /// All counters in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = self.dhcp.render_prometheus();
        let t = self.tftp.snapshot();
        family(
            &mut out,
            "kiln_tftp_requests_total",
            "counter",
            "TFTP read and write requests.",
        );
        let _ = writeln!(out, "kiln_tftp_requests_total {}", t.requests);
        family(
            &mut out,
            "kiln_tftp_transfers_total",
            "counter",
            "TFTP transfers by result.",
        );
        for (result, v) in [
            ("refused", t.requests_refused),
            ("started", t.transfers_started),
            ("completed", t.transfers_completed),
            ("failed", t.transfers_failed),
            ("aborted", t.transfers_aborted),
        ] {
            let _ = writeln!(out, "kiln_tftp_transfers_total{{result=\"{result}\"}} {v}");
        }
        family(
            &mut out,
            "kiln_tftp_active_transfers",
            "gauge",
            "TFTP transfers running now.",
        );
        let _ = writeln!(out, "kiln_tftp_active_transfers {}", t.active);
        family(
            &mut out,
            "kiln_tftp_bytes_sent_total",
            "counter",
            "File bytes sent by TFTP, retransmissions included.",
        );
        let _ = writeln!(out, "kiln_tftp_bytes_sent_total {}", t.bytes_sent);
        family(
            &mut out,
            "kiln_tftp_malformed_total",
            "counter",
            "Datagrams on the TFTP port that were not requests.",
        );
        let _ = writeln!(out, "kiln_tftp_malformed_total {}", t.malformed_packets);

        family(
            &mut out,
            "kiln_http_responses_total",
            "counter",
            "HTTP responses by route and status.",
        );
        for ((route, status), v) in self
            .http
            .responses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "kiln_http_responses_total{{route=\"{route}\",status=\"{status}\"}} {v}"
            );
        }
        family(
            &mut out,
            "kiln_http_bytes_sent_total",
            "counter",
            "Body bytes of successful HTTP responses.",
        );
        let _ = writeln!(
            out,
            "kiln_http_bytes_sent_total {}",
            self.http.bytes_sent.load(Relaxed)
        );
        family(
            &mut out,
            "kiln_boot_stages_total",
            "counter",
            "Boot stages reported by nodes, by stage.",
        );
        for (stage, v) in self
            .http
            .stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "kiln_boot_stages_total{{stage=\"{stage}\"}} {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let m = Metrics::default();
        m.http.count_response("/images/{image}/{file}", 200, 1000);
        m.http.count_response("/images/{image}/{file}", 404, 10);
        m.http.count_stage("rootfs");
        m.tftp.bytes_sent.fetch_add(512, Relaxed);
        let text = m.render();
        assert!(
            text.contains(
                "kiln_http_responses_total{route=\"/images/{image}/{file}\",status=\"200\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains("kiln_http_bytes_sent_total 1000\n"), "{text}");
        assert!(
            text.contains("kiln_boot_stages_total{stage=\"rootfs\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("kiln_tftp_bytes_sent_total 512\n"), "{text}");
        assert!(
            text.contains("# TYPE kiln_dhcp_received_total counter\n"),
            "{text}"
        );
    }
}
