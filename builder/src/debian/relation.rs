//! Package relationship fields (Depends, Pre-Depends, Provides; deb-control(5)).
//!
//! `a (>= 1.2) | b:any [amd64] <!nocheck>, c`: a comma-separated list of groups,
//! each a `|`-separated list of alternatives. Architecture qualifiers (`:any`,
//! `:native`, `:amd64`) are kept but not interpreted (images are single-arch).
//! `[arch]` restrictions are evaluated against the target architecture and
//! `<profile>` restrictions against an empty set of build profiles, so
//! alternatives that do not apply are dropped while parsing.

use std::fmt;

use anyhow::{bail, Context, Result};

use super::version::Version;

/// A version comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// `<<`
    Lt,
    /// `<=` (also the obsolete `<`)
    Le,
    /// `=`
    Eq,
    /// `>=` (also the obsolete `>`)
    Ge,
    /// `>>`
    Gt,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "<<" => Op::Lt,
            "<=" | "<" => Op::Le,
            "=" => Op::Eq,
            ">=" | ">" => Op::Ge,
            ">>" => Op::Gt,
            _ => return None,
        })
    }

    /// Whether `candidate` satisfies `candidate OP wanted`.
    pub fn holds(self, candidate: &Version, wanted: &Version) -> bool {
        let ord = candidate.cmp(wanted);
        match self {
            Op::Lt => ord.is_lt(),
            Op::Le => ord.is_le(),
            Op::Eq => ord.is_eq(),
            Op::Ge => ord.is_ge(),
            Op::Gt => ord.is_gt(),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<<",
            Op::Le => "<=",
            Op::Eq => "=",
            Op::Ge => ">=",
            Op::Gt => ">>",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One relation: a package name with an optional version constraint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Relation {
    pub name: String,
    /// The architecture qualifier after `:`, e.g. `any`; not interpreted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch_qualifier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub constraint: Option<(Op, Version)>,
}

impl Relation {
    /// Whether a package (or provided name) at `version` satisfies this relation's
    /// version constraint. An unversioned provide (`None`) satisfies only
    /// unversioned relations, as in dpkg and apt.
    pub fn version_matches(&self, version: Option<&Version>) -> bool {
        match (&self.constraint, version) {
            (None, _) => true,
            (Some((op, wanted)), Some(v)) => op.holds(v, wanted),
            (Some(_), None) => false,
        }
    }

    /// The constraint as written in control files, e.g. `(>= 2)`, or "".
    pub fn constraint_text(&self) -> String {
        match &self.constraint {
            Some((op, v)) => format!("({op} {v})"),
            None => String::new(),
        }
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(q) = &self.arch_qualifier {
            write!(f, ":{q}")?;
        }
        if let Some((op, v)) = &self.constraint {
            write!(f, " ({op} {v})")?;
        }
        Ok(())
    }
}

/// A group of alternatives (`a | b`); satisfied when any one is.
pub type Alternatives = Vec<Relation>;

/// Formats a group of alternatives as `a (>= 1) | b`.
pub fn alternatives_text(group: &[Relation]) -> String {
    group
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Parses a Depends-style field for the Debian architecture `arch`, dropping
/// alternatives whose `[arch]` or `<profile>` restrictions exclude them.
pub fn parse_relations(field: &str, arch: &str) -> Result<Vec<Alternatives>> {
    let mut groups = Vec::new();
    for group_text in field.split(',') {
        if group_text.trim().is_empty() {
            continue; // tolerate trailing commas and folded empty lines
        }
        let mut group = Vec::new();
        for alt in group_text.split('|') {
            let (relation, applies) = parse_one(alt, arch)
                .with_context(|| format!("parsing relation {:?}", alt.trim()))?;
            if applies {
                group.push(relation);
            }
        }
        if !group.is_empty() {
            groups.push(group);
        }
    }
    Ok(groups)
}

/// Parses a Provides field: a plain list, alternatives are an error.
pub fn parse_provides(field: &str, arch: &str) -> Result<Vec<Relation>> {
    let groups = parse_relations(field, arch)?;
    let mut out = Vec::with_capacity(groups.len());
    for mut group in groups {
        if group.len() != 1 {
            bail!("alternatives are not allowed in Provides: {field:?}");
        }
        out.push(group.remove(0));
    }
    Ok(out)
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_')
}

/// Parses one alternative; returns whether it applies to `arch` without build profiles.
fn parse_one(text: &str, arch: &str) -> Result<(Relation, bool)> {
    let mut rest = text.trim_start();
    let name_len = rest.find(|c: char| !is_name_char(c)).unwrap_or(rest.len());
    if name_len == 0 {
        bail!("missing package name");
    }
    let name = rest[..name_len].to_string();
    rest = &rest[name_len..];

    let mut arch_qualifier = None;
    if let Some(after) = rest.strip_prefix(':') {
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or(after.len());
        if len == 0 {
            bail!("empty architecture qualifier after {name}:");
        }
        arch_qualifier = Some(after[..len].to_string());
        rest = &after[len..];
    }

    let mut constraint = None;
    let mut applies = true;
    let mut profile_groups = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        if let Some(after) = rest.strip_prefix('(') {
            let close = after.find(')').context("missing ')'")?;
            if constraint.is_some() {
                bail!("more than one version constraint");
            }
            constraint = Some(parse_constraint(&after[..close])?);
            rest = &after[close + 1..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let close = after.find(']').context("missing ']'")?;
            applies &= arch_list_matches(&after[..close], arch)?;
            rest = &after[close + 1..];
        } else if let Some(after) = rest.strip_prefix('<') {
            let close = after.find('>').context("missing '>'")?;
            // We evaluate with no active build profiles: a `<...>` group holds
            // only if all its terms are negated; several groups are alternatives.
            let holds = after[..close]
                .split_whitespace()
                .all(|term| term.starts_with('!'));
            profile_groups.push(holds);
            rest = &after[close + 1..];
        } else {
            bail!("unexpected text {rest:?}");
        }
    }
    if !profile_groups.is_empty() {
        applies &= profile_groups.iter().any(|&holds| holds);
    }
    Ok((
        Relation {
            name,
            arch_qualifier,
            constraint,
        },
        applies,
    ))
}

fn parse_constraint(text: &str) -> Result<(Op, Version)> {
    let text = text.trim();
    let op_len = text
        .find(|c: char| !matches!(c, '<' | '>' | '='))
        .unwrap_or(text.len());
    let op = Op::parse(&text[..op_len])
        .with_context(|| format!("unknown version operator in ({text})"))?;
    let version = Version::parse(text[op_len..].trim())
        .with_context(|| format!("bad version in ({text})"))?;
    Ok((op, version))
}

/// Evaluates `[amd64 linux-any !armel]` for `arch`.
fn arch_list_matches(list: &str, arch: &str) -> Result<bool> {
    let terms: Vec<&str> = list.split_whitespace().collect();
    if terms.is_empty() {
        bail!("empty architecture restriction []");
    }
    let negated = terms[0].starts_with('!');
    if terms.iter().any(|t| t.starts_with('!') != negated) {
        bail!("architecture restriction [{list}] mixes negated and plain entries");
    }
    let hit = terms
        .iter()
        .any(|t| arch_wildcard_matches(t.trim_start_matches('!'), arch));
    Ok(hit != negated)
}

/// `any`, `linux-any`, `any-amd64` and exact names; Debian architectures here
/// are all Linux, so the OS part of a wildcard must be `linux` or `any`.
fn arch_wildcard_matches(pattern: &str, arch: &str) -> bool {
    if pattern == "any" || pattern == arch {
        return true;
    }
    match pattern.split_once('-') {
        Some((os, cpu)) => (os == "any" || os == "linux") && (cpu == "any" || cpu == arch),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(groups: &[Alternatives]) -> Vec<Vec<String>> {
        groups
            .iter()
            .map(|g| g.iter().map(ToString::to_string).collect())
            .collect()
    }

    #[test]
    fn plain_alternatives_and_versions() {
        let g = parse_relations(
            "libc6 (>= 2.36), debconf (>= 0.5) | debconf-2.0, zlib1g(<<1:2~),perl:any,\n foo (= 1.0-1)",
            "amd64",
        )
        .unwrap();
        assert_eq!(
            names(&g),
            vec![
                vec!["libc6 (>= 2.36)"],
                vec!["debconf (>= 0.5)", "debconf-2.0"],
                vec!["zlib1g (<< 1:2~)"],
                vec!["perl:any"],
                vec!["foo (= 1.0-1)"],
            ]
        );
        assert_eq!(g[3][0].name, "perl");
        assert_eq!(g[3][0].arch_qualifier.as_deref(), Some("any"));
        let (op, v) = g[0][0].constraint.clone().unwrap();
        assert_eq!((op, v.as_str()), (Op::Ge, "2.36"));
    }

    #[test]
    fn all_operators() {
        for (text, op) in [
            ("<<", Op::Lt),
            ("<=", Op::Le),
            ("<", Op::Le),
            ("=", Op::Eq),
            (">=", Op::Ge),
            (">", Op::Ge),
            (">>", Op::Gt),
        ] {
            let g = parse_relations(&format!("x ({text} 1)"), "amd64").unwrap();
            assert_eq!(g[0][0].constraint.as_ref().unwrap().0, op, "{text}");
        }
        assert!(parse_relations("x (~= 1)", "amd64").is_err());
        assert!(parse_relations("x (>= )", "amd64").is_err());
        assert!(parse_relations("x (>= 1", "amd64").is_err());
    }

    #[test]
    fn version_matching() {
        let rel = |s: &str| parse_relations(s, "amd64").unwrap().remove(0).remove(0);
        let v = |s: &str| Version::parse(s).unwrap();
        assert!(rel("a (>= 1.0)").version_matches(Some(&v("1.0"))));
        assert!(!rel("a (>= 1.0)").version_matches(Some(&v("1.0~rc1"))));
        assert!(rel("a (<< 2)").version_matches(Some(&v("1.9"))));
        assert!(!rel("a (>> 2)").version_matches(Some(&v("2"))));
        assert!(rel("a (= 2-0)").version_matches(Some(&v("2"))));
        assert!(rel("a").version_matches(None));
        assert!(!rel("a (>= 1)").version_matches(None));
    }

    #[test]
    fn arch_restrictions() {
        let f = "a [amd64], b [!amd64], c [arm64 armhf], d [linux-any], e [any-arm64], f";
        let amd = names(&parse_relations(f, "amd64").unwrap());
        assert_eq!(amd, vec![vec!["a"], vec!["d"], vec!["f"]]);
        let arm = names(&parse_relations(f, "arm64").unwrap());
        assert_eq!(
            arm,
            vec![vec!["b"], vec!["c"], vec!["d"], vec!["e"], vec!["f"]]
        );
        // An alternative that does not apply is dropped from its group.
        let g = names(&parse_relations("a [arm64] | b", "amd64").unwrap());
        assert_eq!(g, vec![vec!["b"]]);
        assert!(parse_relations("a [amd64 !arm64]", "amd64").is_err());
    }

    #[test]
    fn profile_restrictions() {
        let f = "a <!nocheck>, b <stage1>, c <stage1 !cross> <!nocheck>, d (>= 1) [amd64] <!stage1 !cross>, e <cross> <nocheck>";
        let g = names(&parse_relations(f, "amd64").unwrap());
        assert_eq!(g, vec![vec!["a"], vec!["c"], vec!["d (>= 1)"]]);
    }

    #[test]
    fn provides() {
        let p = parse_provides("mail-transport-agent, libfoo-abi (= 2), awk", "amd64").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[1].constraint.as_ref().unwrap().1.as_str(), "2");
        assert!(parse_provides("a | b", "amd64").is_err());
    }

    #[test]
    fn errors_and_whitespace() {
        assert!(parse_relations("", "amd64").unwrap().is_empty());
        assert_eq!(parse_relations(" a ,, b ,", "amd64").unwrap().len(), 2);
        assert!(parse_relations("(>= 1)", "amd64").is_err());
        assert!(parse_relations("a junk", "amd64").is_err());
    }
}
