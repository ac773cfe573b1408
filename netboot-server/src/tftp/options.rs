//! Option negotiation (RFC 2347) for blksize (RFC 2348), timeout and tsize
//! (RFC 2349) and windowsize (RFC 7440). A pure function of the request's
//! options, the file's size and the server's limits.
//!
//! The rules, per RFC 2347: options the server does not know are left out of
//! the OACK; so is an option whose value is not a valid decimal number or is
//! out of the range its RFC gives. The server may answer a smaller blksize or
//! windowsize than asked (never a larger one). When no option is accepted, no
//! OACK is sent and the transfer starts with DATA 1 as in RFC 1350.

use std::time::Duration;

use super::packet::{DEFAULT_BLKSIZE, MAX_BLKSIZE, MIN_BLKSIZE};

/// The server's side of the negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest block the server will agree to: the path MTU less 32 bytes of
    /// IPv4/UDP/TFTP headers (1468 on Ethernet). At most [`MAX_BLKSIZE`].
    pub max_blksize: u16,
    /// Largest window the server will agree to.
    pub max_windowsize: u16,
    /// Upper bound of `windowsize * blksize`: the data one transfer keeps
    /// in memory for retransmission.
    pub max_window_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_blksize: MAX_BLKSIZE,
            max_windowsize: 64,
            max_window_bytes: 1 << 20,
        }
    }
}

/// The outcome of a negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    /// The retransmission timeout the client asked for, if it did (1..=255 s).
    pub timeout: Option<Duration>,
    /// The transfer size announced in the OACK, if the client asked for it.
    pub tsize: Option<u64>,
    /// The OACK's options, in the order the client sent them, with the
    /// client's spelling of the names. Empty: send no OACK.
    pub oack: Vec<(String, String)>,
}

/// Parses a decimal option value: ASCII digits only (no sign, no spaces, not
/// empty). Values too large for u64 saturate, so that "huge" stays huge.
pub fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |acc, b| {
        acc.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// Negotiates the options of a read request. `size` is the number of bytes
/// the transfer will send, when it is known up front (for tsize).
pub fn negotiate(requested: &[(String, String)], size: Option<u64>, limits: &Limits) -> Negotiated {
    let find = |name: &str| -> Option<(&str, u64)> {
        // The first occurrence of a name counts; later duplicates are ignored.
        requested
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(k, v)| Some((k.as_str(), parse_decimal(v)?)))
    };

    let max_blksize = limits.max_blksize.clamp(MIN_BLKSIZE, MAX_BLKSIZE);
    let blksize = find("blksize")
        .filter(|&(_, v)| v >= u64::from(MIN_BLKSIZE))
        .map(|(k, v)| (k, v.min(u64::from(max_blksize)) as u16));

    let block = blksize.map_or(DEFAULT_BLKSIZE, |(_, b)| b);
    let max_window = (limits.max_window_bytes / usize::from(block))
        .clamp(1, usize::from(limits.max_windowsize.max(1))) as u64;
    let windowsize = find("windowsize")
        .filter(|&(_, v)| (1..=65535).contains(&v))
        .map(|(k, v)| (k, v.min(max_window) as u16));

    let timeout = find("timeout").filter(|&(_, v)| (1..=255).contains(&v));
    let tsize = find("tsize").and_then(|(k, _)| Some((k, size?)));

    // The OACK lists the accepted options in the client's order.
    let mut oack = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for (k, _) in requested {
        let lower = k.to_ascii_lowercase();
        if seen.contains(&lower) {
            continue;
        }
        let value = match lower.as_str() {
            "blksize" => blksize.map(|(_, v)| u64::from(v)),
            "windowsize" => windowsize.map(|(_, v)| u64::from(v)),
            "timeout" => timeout.map(|(_, v)| v),
            "tsize" => tsize.map(|(_, v)| v),
            _ => None,
        };
        if let Some(v) = value {
            oack.push((k.clone(), v.to_string()));
            seen.push(lower);
        }
    }

    Negotiated {
        blksize: block,
        windowsize: windowsize.map_or(1, |(_, w)| w),
        timeout: timeout.map(|(_, t)| Duration::from_secs(t)),
        tsize: tsize.map(|(_, s)| s),
        oack,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn oack(n: &Negotiated) -> Vec<(&str, &str)> {
        n.oack
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn no_options_means_no_oack() {
        let n = negotiate(&[], Some(10), &Limits::default());
        assert_eq!(n.blksize, 512);
        assert_eq!(n.windowsize, 1);
        assert_eq!(n.timeout, None);
        assert_eq!(n.tsize, None);
        assert!(n.oack.is_empty());
    }

    #[test]
    fn all_options_accepted_in_client_order() {
        let n = negotiate(
            &req(&[
                ("tsize", "0"),
                ("blksize", "1468"),
                ("timeout", "3"),
                ("windowsize", "16"),
            ]),
            Some(123_456),
            &Limits::default(),
        );
        assert_eq!(n.blksize, 1468);
        assert_eq!(n.windowsize, 16);
        assert_eq!(n.timeout, Some(Duration::from_secs(3)));
        assert_eq!(n.tsize, Some(123_456));
        assert_eq!(
            oack(&n),
            [
                ("tsize", "123456"),
                ("blksize", "1468"),
                ("timeout", "3"),
                ("windowsize", "16")
            ]
        );
    }

    #[test]
    fn blksize_is_clamped() {
        let limits = Limits {
            max_blksize: 1468,
            ..Limits::default()
        };
        let n = negotiate(&req(&[("blksize", "65464")]), None, &limits);
        assert_eq!((n.blksize, oack(&n)), (1468, vec![("blksize", "1468")]));
        // Above the RFC 2348 maximum: clamped, not refused.
        let n = negotiate(&req(&[("blksize", "100000")]), None, &Limits::default());
        assert_eq!(n.blksize, 65464);
        let n = negotiate(
            &req(&[("blksize", "99999999999999999999999999999")]),
            None,
            &Limits::default(),
        );
        assert_eq!(n.blksize, 65464);
        // Smaller than asked is fine, the low end is 8.
        let n = negotiate(&req(&[("blksize", "8")]), None, &Limits::default());
        assert_eq!(n.blksize, 8);
        // A nonsensical server limit is raised to the RFC minimum.
        let tiny = Limits {
            max_blksize: 0,
            ..Limits::default()
        };
        assert_eq!(
            negotiate(&req(&[("blksize", "512")]), None, &tiny).blksize,
            8
        );
    }

    #[test]
    fn invalid_values_are_ignored() {
        for (k, v) in [
            ("blksize", "7"),
            ("blksize", "0"),
            ("blksize", ""),
            ("blksize", "-512"),
            ("blksize", "+512"),
            ("blksize", " 512"),
            ("blksize", "512 "),
            ("blksize", "0x200"),
            ("blksize", "1e3"),
            ("timeout", "0"),
            ("timeout", "256"),
            ("timeout", "99999999999999999999999"),
            ("windowsize", "0"),
            ("windowsize", "65536"),
            ("tsize", "abc"),
        ] {
            let n = negotiate(&req(&[(k, v)]), Some(5), &Limits::default());
            assert!(n.oack.is_empty(), "{k}={v:?} gave {:?}", n.oack);
            assert_eq!((n.blksize, n.windowsize, n.timeout), (512, 1, None));
        }
    }

    #[test]
    fn unknown_options_are_ignored() {
        let n = negotiate(
            &req(&[
                ("multicast", ""),
                ("rollover", "0"),
                ("utimeout", "5000"),
                ("tsize", "0"),
            ]),
            Some(7),
            &Limits::default(),
        );
        assert_eq!(oack(&n), [("tsize", "7")]);
    }

    #[test]
    fn names_are_case_insensitive_and_echoed_as_sent() {
        let n = negotiate(&req(&[("BlkSize", "1024")]), None, &Limits::default());
        assert_eq!(n.blksize, 1024);
        assert_eq!(oack(&n), [("BlkSize", "1024")]);
    }

    #[test]
    fn duplicates_first_wins() {
        let n = negotiate(
            &req(&[("blksize", "1024"), ("BLKSIZE", "2048")]),
            None,
            &Limits::default(),
        );
        assert_eq!(n.blksize, 1024);
        assert_eq!(oack(&n), [("blksize", "1024")]);
    }

    #[test]
    fn tsize_answers_the_real_size_or_nothing() {
        // The client's value (0 on a read) does not matter.
        let n = negotiate(&req(&[("tsize", "0")]), Some(0), &Limits::default());
        assert_eq!(oack(&n), [("tsize", "0")]);
        let n = negotiate(&req(&[("tsize", "999")]), Some(1 << 40), &Limits::default());
        assert_eq!(oack(&n), [("tsize", "1099511627776")]);
        // Unknown size (netascii from a file): the option is left out.
        let n = negotiate(
            &req(&[("tsize", "0"), ("blksize", "1468")]),
            None,
            &Limits::default(),
        );
        assert_eq!(n.tsize, None);
        assert_eq!(oack(&n), [("blksize", "1468")]);
    }

    #[test]
    fn windowsize_is_bounded_by_limits_and_memory() {
        let limits = Limits {
            max_blksize: 65464,
            max_windowsize: 64,
            max_window_bytes: 1 << 20,
        };
        let n = negotiate(&req(&[("windowsize", "16")]), None, &limits);
        assert_eq!(n.windowsize, 16);
        let n = negotiate(&req(&[("windowsize", "65535")]), None, &limits);
        assert_eq!(n.windowsize, 64);
        // 1 MiB / 65464 = 16 blocks of the largest size.
        let n = negotiate(
            &req(&[("windowsize", "64"), ("blksize", "65464")]),
            None,
            &limits,
        );
        assert_eq!((n.blksize, n.windowsize), (65464, 16));
        assert_eq!(oack(&n), [("windowsize", "16"), ("blksize", "65464")]);
        // Never below 1.
        let small = Limits {
            max_window_bytes: 10,
            ..limits
        };
        let n = negotiate(&req(&[("windowsize", "8")]), None, &small);
        assert_eq!(n.windowsize, 1);
    }

    #[test]
    fn decimal_parsing() {
        assert_eq!(parse_decimal("0"), Some(0));
        assert_eq!(parse_decimal("0001468"), Some(1468));
        assert_eq!(parse_decimal("18446744073709551616"), Some(u64::MAX));
        assert_eq!(parse_decimal(""), None);
        assert_eq!(parse_decimal("12a"), None);
        assert_eq!(parse_decimal("١٢"), None);
    }
}
