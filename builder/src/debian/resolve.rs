//! Dependency closure over a `Universe`.
//!
//! Follows Depends and Pre-Depends (not Recommends or Suggests). For a group of
//! alternatives, a group already satisfied by a selected (or requested)
//! package or by an excluded name needs nothing more; otherwise the first
//! alternative that can be satisfied is taken: the real package of that name if
//! its version fits, else a package providing it (versioned provides count),
//! preferring a higher Priority, then the lower name. Packages are visited
//! breadth-first in request order, so the result depends only on the inputs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use anyhow::{bail, Result};

use super::index::Package;
use super::relation::{alternatives_text, Relation};
use super::version::Version;
use super::Universe;

/// Rank of a Priority field for choosing between providers (lower is preferred).
fn priority_rank(p: &Package) -> u8 {
    match p.priority.as_deref() {
        Some("required") => 0,
        Some("important") => 1,
        Some("standard") => 2,
        Some("optional") => 3,
        Some("extra") => 4,
        _ => 5,
    }
}

/// Why one alternative cannot be satisfied.
fn unsatisfiable_reason(u: &Universe, rel: &Relation) -> String {
    let name = &rel.name;
    let providers = u.providers(name);
    match u.get(name) {
        None if providers.is_empty() => format!("package {name} is not in any configured suite"),
        None => {
            let list: Vec<String> = providers
                .iter()
                .map(|(p, v)| match v {
                    Some(v) => format!("{p} provides {name} (= {v})"),
                    None => format!("{p} provides {name} without a version"),
                })
                .collect();
            format!(
                "no package provides {name} {}: {}",
                rel.constraint_text(),
                list.join(", ")
            )
        }
        Some(p) => format!(
            "no version of {name} satisfies {}: the configured suites have {} from {}",
            rel.constraint_text(),
            p.version,
            p.suite
        ),
    }
}

struct State<'u> {
    universe: &'u Universe,
    excluded: BTreeSet<&'u str>,
    /// name -> the package that pulled it in (None: requested).
    selected: BTreeMap<String, Option<String>>,
    queue: VecDeque<String>,
}

impl<'u> State<'u> {
    /// "needed by Y, needed by Z" for the package `name`.
    fn chain(&self, name: &str) -> String {
        let mut parts = vec![format!("needed by {name}")];
        let mut current = name.to_string();
        let mut seen = BTreeSet::new();
        while let Some(Some(parent)) = self.selected.get(&current) {
            if !seen.insert(parent.clone()) {
                break;
            }
            parts.push(format!("needed by {parent}"));
            current = parent.clone();
        }
        parts.join(", ")
    }

    fn select(&mut self, name: &str, needed_by: Option<&str>) {
        if !self.selected.contains_key(name) {
            self.selected
                .insert(name.to_string(), needed_by.map(str::to_string));
            self.queue.push_back(name.to_string());
        }
    }

    /// Whether a selected package satisfies `rel`, directly or by Provides.
    fn satisfied_by_selection(&self, rel: &Relation) -> bool {
        let u = self.universe;
        if self.selected.contains_key(&rel.name) {
            if let Some(p) = u.get(&rel.name) {
                if rel.version_matches(Some(&p.version)) {
                    return true;
                }
            }
        }
        u.providers(&rel.name).iter().any(|(provider, version)| {
            self.selected.contains_key(provider) && rel.version_matches(version.as_ref())
        })
    }

    /// The package to select for `rel`, if any.
    fn candidate(&self, rel: &Relation) -> Option<&'u str> {
        let u = self.universe;
        if let Some(p) = u.get(&rel.name) {
            if rel.version_matches(Some(&p.version)) {
                return Some(&p.name);
            }
        }
        u.providers(&rel.name)
            .iter()
            .filter(|(_, version)| rel.version_matches(version.as_ref()))
            .filter_map(|(provider, _)| u.get(provider))
            .min_by(|a, b| {
                priority_rank(a)
                    .cmp(&priority_rank(b))
                    .then_with(|| a.name.cmp(&b.name))
            })
            .map(|p| p.name.as_str())
    }
}

/// Resolves the closure of `wanted` (names, optionally pinned as `name=version`).
/// A dependency group naming any `exclude`d package counts as satisfied.
/// Returns the packages sorted by name.
pub fn resolve(universe: &Universe, wanted: &[String], exclude: &[String]) -> Result<Vec<Package>> {
    let mut st = State {
        universe,
        excluded: exclude.iter().map(String::as_str).collect(),
        selected: BTreeMap::new(),
        queue: VecDeque::new(),
    };

    for request in wanted {
        let request = request.trim();
        let (name, pin) = match request.split_once('=') {
            Some((n, v)) => (n.trim(), Some(Version::parse(v.trim())?)),
            None => (request, None),
        };
        if st.excluded.contains(name) {
            bail!("package {name} is both requested and excluded");
        }
        let chosen = match universe.get(name) {
            Some(p) => {
                if let Some(pin) = &pin {
                    if &p.version != pin {
                        bail!(
                            "requested {name}={pin}, but the configured suites have {name} {} (from {})",
                            p.version,
                            p.suite
                        );
                    }
                }
                p.name.as_str()
            }
            None => {
                let rel = Relation {
                    name: name.to_string(),
                    arch_qualifier: None,
                    constraint: pin.map(|v| (super::relation::Op::Eq, v)),
                };
                match st.candidate(&rel) {
                    Some(provider) => provider,
                    None => bail!("{} (requested)", unsatisfiable_reason(universe, &rel)),
                }
            }
        };
        st.select(chosen, None);
    }

    while let Some(name) = st.queue.pop_front() {
        let pkg = universe
            .get(&name)
            .expect("only packages of the universe are selected");
        for group in pkg.all_depends() {
            if group
                .iter()
                .any(|rel| st.excluded.contains(rel.name.as_str()))
            {
                continue;
            }
            if group.iter().any(|rel| st.satisfied_by_selection(rel)) {
                continue;
            }
            if let Some(choice) = group.iter().find_map(|rel| st.candidate(rel)) {
                st.select(choice, Some(&name));
                continue;
            }
            let chain = st.chain(&name);
            if let [rel] = group.as_slice() {
                if universe.get(&rel.name).is_none() && universe.providers(&rel.name).is_empty() {
                    bail!(
                        "package {} ({chain}) is not in any configured suite",
                        rel.name
                    );
                }
                if let Some(p) = universe.get(&rel.name) {
                    bail!(
                        "no version of {} satisfies {} {chain}: the configured suites have {} from {}",
                        rel.name,
                        rel.constraint_text(),
                        p.version,
                        p.suite
                    );
                }
                bail!("{} ({chain})", unsatisfiable_reason(universe, rel));
            }
            let reasons: Vec<String> = group
                .iter()
                .map(|rel| unsatisfiable_reason(universe, rel))
                .collect();
            bail!(
                "no alternative of \"{}\" ({chain}) can be installed: {}",
                alternatives_text(group),
                reasons.join("; ")
            );
        }
    }

    Ok(st
        .selected
        .keys()
        .map(|name| universe.get(name).expect("selected packages exist").clone())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::index::parse_packages;
    use super::*;

    /// A universe from a Packages-style text; Filename/SHA256/Size are filled in.
    fn universe(text: &str) -> Universe {
        let mut full = String::new();
        for para in text.trim().split("\n\n") {
            full.push_str(para.trim());
            if !para.contains("Architecture:") {
                full.push_str("\nArchitecture: amd64");
            }
            full.push_str(&format!(
                "\nFilename: pool/x.deb\nSize: 1\nSHA256: {}\n\n",
                "a".repeat(64)
            ));
        }
        let pkgs = parse_packages(&full, "http://mirror.example/debian", "test", "amd64").unwrap();
        Universe::from_packages("amd64", pkgs)
    }

    fn names(pkgs: &[Package]) -> Vec<String> {
        pkgs.iter()
            .map(|p| format!("{} {}", p.name, p.version))
            .collect()
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const BASE: &str = "
Package: app
Version: 1.0
Depends: libc6 (>= 2.36), mail-transport-agent | exim4, awk

Package: libc6
Version: 2.41-7
Depends: libgcc-s1

Package: libgcc-s1
Version: 14.2.0-19
Depends: libc6 (>= 2.35)

Package: exim4
Version: 4.98
Priority: optional
Provides: mail-transport-agent

Package: postfix
Version: 3.10
Priority: optional
Provides: mail-transport-agent

Package: mawk
Version: 1.3.4
Priority: required
Provides: awk

Package: gawk
Version: 5.2
Priority: optional
Provides: awk

Package: needs-new-libc
Version: 1
Depends: libc6 (>= 3)

Package: broken
Version: 1
Depends: app, missing-lib

Package: versioned-user
Version: 1
Depends: libfoo-abi (>= 2)

Package: libfoo2
Version: 2.0
Provides: libfoo-abi (= 2)

Package: libfoo1
Version: 1.0
Provides: libfoo-abi (= 1)

Package: kernel
Version: 6.12
Depends: initramfs-tools | linux-initramfs-tool, kmod

Package: initramfs-tools
Version: 0.145
Provides: linux-initramfs-tool
Depends: klibc-utils

Package: klibc-utils
Version: 2.0

Package: kmod
Version: 33
";

    #[test]
    fn closure_with_alternatives_provides_and_cycle() {
        let u = universe(BASE);
        let got = resolve(&u, &strings(&["app"]), &[]).unwrap();
        // libc6 <-> libgcc-s1 is a cycle; mail-transport-agent is provided by
        // both exim4 and postfix and picks the lower name of equal priority;
        // awk picks mawk (Priority: required).
        assert_eq!(
            names(&got),
            [
                "app 1.0",
                "exim4 4.98",
                "libc6 2.41-7",
                "libgcc-s1 14.2.0-19",
                "mawk 1.3.4"
            ]
        );
    }

    #[test]
    fn prefers_requested_alternatives_and_providers() {
        let u = universe(BASE);
        let got = resolve(&u, &strings(&["app", "postfix", "gawk"]), &[]).unwrap();
        let got = names(&got);
        assert!(got.contains(&"postfix 3.10".to_string()), "{got:?}");
        assert!(!got.iter().any(|n| n.starts_with("exim4")), "{got:?}");
        assert!(!got.iter().any(|n| n.starts_with("mawk")), "{got:?}");
        // The order of requests does not matter for requested packages.
        let again = resolve(&u, &strings(&["gawk", "postfix", "app"]), &[]).unwrap();
        assert_eq!(names(&again), got);
    }

    #[test]
    fn versioned_provides() {
        let u = universe(BASE);
        let got = resolve(&u, &strings(&["versioned-user"]), &[]).unwrap();
        assert_eq!(names(&got), ["libfoo2 2.0", "versioned-user 1"]);
    }

    #[test]
    fn missing_package_names_the_chain() {
        let u = universe(BASE);
        let err = resolve(&u, &strings(&["broken"]), &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "package missing-lib (needed by broken) is not in any configured suite"
        );
        let u = universe(
            "Package: top\nVersion: 1\nDepends: middle\n\nPackage: middle\nVersion: 1\nDepends: gone",
        );
        let err = resolve(&u, &strings(&["top"]), &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "package gone (needed by middle, needed by top) is not in any configured suite"
        );
        let err = resolve(&u, &strings(&["nothing"]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nothing is not in any configured suite"),
            "{err}"
        );
    }

    #[test]
    fn unsatisfied_version_constraint() {
        let u = universe(BASE);
        let err = resolve(&u, &strings(&["needs-new-libc"]), &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "no version of libc6 satisfies (>= 3) needed by needs-new-libc: the configured suites have 2.41-7 from test"
        );
    }

    #[test]
    fn failing_alternatives_list_every_reason() {
        let u = universe("Package: a\nVersion: 1\nDepends: b (>= 2) | c\n\nPackage: b\nVersion: 1");
        let err = resolve(&u, &strings(&["a"]), &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("no alternative of \"b (>= 2) | c\" (needed by a) can be installed"),
            "{err}"
        );
        assert!(err.contains("no version of b satisfies (>= 2)"), "{err}");
        assert!(
            err.contains("package c is not in any configured suite"),
            "{err}"
        );
    }

    #[test]
    fn exclude_counts_as_satisfied() {
        let u = universe(BASE);
        let all = names(&resolve(&u, &strings(&["kernel"]), &[]).unwrap());
        assert_eq!(
            all,
            [
                "initramfs-tools 0.145",
                "kernel 6.12",
                "klibc-utils 2.0",
                "kmod 33"
            ]
        );
        let some =
            names(&resolve(&u, &strings(&["kernel"]), &strings(&["initramfs-tools"])).unwrap());
        assert_eq!(some, ["kernel 6.12", "kmod 33"]);
        let err = resolve(&u, &strings(&["kmod"]), &strings(&["kmod"])).unwrap_err();
        assert!(err.to_string().contains("both requested and excluded"));
    }

    #[test]
    fn pins_and_virtual_requests() {
        let u = universe(BASE);
        assert_eq!(
            names(&resolve(&u, &strings(&["kmod=33"]), &[]).unwrap()),
            ["kmod 33"]
        );
        let err = resolve(&u, &strings(&["kmod=34"]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("requested kmod=34, but the configured suites have kmod 33"),
            "{err}"
        );
        assert_eq!(
            names(&resolve(&u, &strings(&["awk"]), &[]).unwrap()),
            ["mawk 1.3.4"]
        );
    }

    #[test]
    fn deterministic() {
        let u = universe(BASE);
        let a = resolve(&u, &strings(&["app", "kernel", "versioned-user"]), &[]).unwrap();
        for _ in 0..5 {
            let b = resolve(&u, &strings(&["app", "kernel", "versioned-user"]), &[]).unwrap();
            assert_eq!(a, b);
        }
        let mut sorted = names(&a);
        sorted.sort();
        assert_eq!(names(&a), sorted);
    }

    #[test]
    fn highest_version_wins_across_suites() {
        let low = "Package: x\nVersion: 1.0-1\nArchitecture: amd64\nFilename: pool/x1.deb\nSize: 1\nSHA256: "
            .to_string()
            + &"a".repeat(64)
            + "\n";
        let high = low
            .replace("1.0-1", "1.0-1+deb13u1")
            .replace("x1.deb", "x2.deb");
        let mut pkgs = parse_packages(&low, "http://a.example", "trixie", "amd64").unwrap();
        pkgs.extend(parse_packages(&high, "http://b.example", "trixie-security", "amd64").unwrap());
        pkgs.extend(parse_packages(&low, "http://c.example", "trixie-updates", "amd64").unwrap());
        let u = Universe::from_packages("amd64", pkgs);
        let x = u.get("x").unwrap();
        assert_eq!(x.version.as_str(), "1.0-1+deb13u1");
        assert_eq!(x.repo, "http://b.example");
        assert_eq!(x.suite, "trixie-security");
    }
}
