//! Debian version numbers and their ordering (deb-version(7), dpkg's rules).
//!
//! Hand-written rather than taken from a crate: the algorithm is short and
//! fully specified by Debian policy §5.6.12, and the crates that implement it
//! either pull in a large dependency tree or are not kept up to date.

use std::cmp::Ordering;
use std::fmt;

use anyhow::{bail, Result};

/// A parsed Debian version: `[epoch:]upstream[-revision]`.
///
/// Equality and ordering follow dpkg: `1.0`, `0:1.0` and `1.0-0` are equal.
#[derive(Clone, Debug)]
pub struct Version {
    raw: String,
    epoch: u64,
    upstream_start: usize,
    upstream_end: usize,
}

impl Version {
    /// Parses a version string. Only a missing upstream part or a non-numeric
    /// epoch are errors; like dpkg, other odd characters are tolerated.
    pub fn parse(s: &str) -> Result<Version> {
        let raw = s.trim();
        if raw.is_empty() {
            bail!("empty version");
        }
        if raw.chars().any(char::is_whitespace) {
            bail!("version {raw:?} contains whitespace");
        }
        let (epoch, upstream_start) = match raw.find(':') {
            Some(colon) => {
                let epoch = &raw[..colon];
                if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
                    bail!("version {raw:?} has an epoch that is not a number");
                }
                let epoch = epoch.parse::<u64>().map_err(|_| {
                    anyhow::anyhow!("version {raw:?} has an epoch that is too large")
                })?;
                (epoch, colon + 1)
            }
            None => (0, 0),
        };
        let upstream_end = match raw[upstream_start..].rfind('-') {
            Some(dash) => upstream_start + dash,
            None => raw.len(),
        };
        if upstream_end == upstream_start {
            bail!("version {raw:?} has an empty upstream version");
        }
        if upstream_end + 1 == raw.len() && upstream_end != raw.len() {
            bail!("version {raw:?} has an empty Debian revision");
        }
        Ok(Version {
            raw: raw.to_string(),
            epoch,
            upstream_start,
            upstream_end,
        })
    }

    /// The epoch (0 when absent).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The upstream part, between the epoch and the last `-`.
    pub fn upstream(&self) -> &str {
        &self.raw[self.upstream_start..self.upstream_end]
    }

    /// The Debian revision after the last `-` ("" when absent).
    pub fn revision(&self) -> &str {
        if self.upstream_end < self.raw.len() {
            &self.raw[self.upstream_end + 1..]
        } else {
            ""
        }
    }

    /// The version exactly as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl std::str::FromStr for Version {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Version> {
        Version::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        Version::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Version) -> Ordering {
        self.epoch
            .cmp(&other.epoch)
            .then_with(|| compare_part(self.upstream(), other.upstream()))
            .then_with(|| compare_part(self.revision(), other.revision()))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Version) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Version) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

/// Compares two version strings; an unparsable version sorts before any valid one
/// (and two unparsable ones compare as strings), so sorting never panics.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    match (Version::parse(a), Version::parse(b)) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        (Ok(_), Err(_)) => Ordering::Greater,
        (Err(_), Ok(_)) => Ordering::Less,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

/// Sort weight of one non-digit character: `~` before the end of the string,
/// the end before letters, letters before everything else.
fn weight(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

/// Compares an upstream version or a revision: alternating runs of non-digits
/// (compared by `weight`, character by character) and digits (compared as numbers).
fn compare_part(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        // Non-digit run.
        loop {
            let ca = a.get(i).copied().filter(|c| !c.is_ascii_digit());
            let cb = b.get(j).copied().filter(|c| !c.is_ascii_digit());
            if ca.is_none() && cb.is_none() {
                break;
            }
            let (wa, wb) = (weight(ca), weight(cb));
            if wa != wb {
                return wa.cmp(&wb);
            }
            // Equal weights imply both are the same non-digit character.
            i += 1;
            j += 1;
        }
        // Digit run, compared numerically without overflow: skip leading zeros,
        // then the longer run is larger, else the first differing digit decides.
        let start_a = i;
        while i < a.len() && a[i].is_ascii_digit() {
            i += 1;
        }
        let start_b = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        let da = trim_zeros(&a[start_a..i]);
        let db = trim_zeros(&b[start_b..j]);
        let ord = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
        if ord != Ordering::Equal {
            return ord;
        }
    }
    Ordering::Equal
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let first = digits
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(digits.len());
    &digits[first..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    /// Expected orderings, each checked against `dpkg --compare-versions`.
    const CASES: &[(&str, char, &str)] = &[
        ("1.0~rc1", '<', "1.0"),
        ("1:0.1", '>', "2.0"),
        ("1.0-1", '<', "1.0-1+b1"),
        ("2.30-1", '>', "2.4-1"),
        ("0:1.0", '=', "1.0"),
        ("1.0", '=', "1.0-0"),
        ("1.0~~", '<', "1.0~~a"),
        ("1.0~~a", '<', "1.0~"),
        ("1.0~", '<', "1.0"),
        ("1.0", '<', "1.0a"),
        ("1.0a", '<', "1.0+"),
        ("1.0", '<', "1.0.1"),
        ("0.0001", '=', "0.1"),
        ("2:0", '>', "1:9"),
        ("7.6p2-4", '>', "7.6-0"),
        ("1.0.3-3", '>', "1.0-1"),
        ("1.3", '>', "1.2.2-2"),
        ("0-pre", '=', "0-pre"),
        ("0-pre", '<', "0-pree"),
        ("1.1.6r2-2", '>', "1.1.6r-1"),
        ("2.6b2-1", '>', "2.6b-2"),
        ("98.1p5-1", '<', "98.1-pre2-b6-2"),
        ("0.4a6-2", '>', "0.4-1"),
        ("1:3.0.5-2", '<', "1:3.0.5.1"),
        ("10.3", '<', "10.3-6"),
        ("1.2.3", '<', "1.2.10"),
        ("1.0-1~bpo1", '<', "1.0-1"),
        ("1.0+dfsg-1", '>', "1.0-1"),
        ("1.0-a", '>', "1.0-1"),
        ("6.1.0-10-amd64", '>', "6.1.0-9-amd64"),
        ("2.0-1", '<', "2.0-1.1"),
        ("3.0~git20200101", '<', "3.0"),
        ("1.0.0+git-1", '>', "1.0.0-1"),
        ("1.0-1-1", '>', "1.0-1"),
        ("0.0.0-0", '>', "0"),
        ("1.0", '<', "1:0.1"),
        ("99999999999999999999999", '<', "100000000000000000000000"),
        ("1.00000000000000000000001", '=', "1.1"),
    ];

    #[test]
    fn dpkg_orderings() {
        for &(a, op, b) in CASES {
            let expected = match op {
                '<' => Ordering::Less,
                '=' => Ordering::Equal,
                _ => Ordering::Greater,
            };
            assert_eq!(v(a).cmp(&v(b)), expected, "{a} {op} {b}");
            assert_eq!(v(b).cmp(&v(a)), expected.reverse(), "{b} vs {a}");
            assert_eq!(compare_versions(a, b), expected, "{a} {op} {b}");
        }
    }

    #[test]
    fn tilde_sorts_before_everything() {
        let mut list = vec!["1.0a", "1.0", "1.0~", "1.0~~a", "1.0~~", "1.0+", "1.0.1"];
        list.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            list,
            ["1.0~~", "1.0~~a", "1.0~", "1.0", "1.0a", "1.0+", "1.0.1"]
        );
    }

    #[test]
    fn parts() {
        let x = v("2:1.2-3-4+b1");
        assert_eq!(x.epoch(), 2);
        assert_eq!(x.upstream(), "1.2-3");
        assert_eq!(x.revision(), "4+b1");
        assert_eq!(x.to_string(), "2:1.2-3-4+b1");
        let y = v("1.2");
        assert_eq!((y.epoch(), y.upstream(), y.revision()), (0, "1.2", ""));
        // A colon in the upstream part needs an epoch; the first colon ends the epoch.
        let z = v("1:2.0:3");
        assert_eq!((z.epoch(), z.upstream()), (1, "2.0:3"));
    }

    #[test]
    fn invalid() {
        for bad in ["", " ", "1.9:3", ":1.0", "a:1", "1:", "1:-1", "1.0-", "1 0"] {
            assert!(Version::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(compare_versions("1.9:3", "0"), Ordering::Less);
    }
}
