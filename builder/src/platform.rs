//! Platform manifests: k3s HelmChart resources (a GitOps controller, secrets,
//! storage, observability) compiled into the binary from `overlays/platform`
//! and laid into /var/lib/rancher/k3s/server/manifests, where k3s's deploy and
//! helm controllers install them on the first control-plane node. The spec's
//! `platform = [...]` chooses which; a minimal image has none.

use anyhow::{Context, Result};

use crate::tree::{Entry, Tree};

/// Every platform component: (name in the spec, the manifest).
pub const COMPONENTS: &[(&str, &str)] = &[
    (
        "argocd",
        include_str!("../../overlays/platform/argocd.yaml"),
    ),
    (
        "external-secrets",
        include_str!("../../overlays/platform/external-secrets.yaml"),
    ),
    (
        "kube-prometheus-stack",
        include_str!("../../overlays/platform/kube-prometheus-stack.yaml"),
    ),
    ("loki", include_str!("../../overlays/platform/loki.yaml")),
    (
        "longhorn",
        include_str!("../../overlays/platform/longhorn.yaml"),
    ),
    ("tempo", include_str!("../../overlays/platform/tempo.yaml")),
    ("vault", include_str!("../../overlays/platform/vault.yaml")),
];

/// The directory k3s servers apply manifests from.
pub const MANIFESTS_DIR: &str = "var/lib/rancher/k3s/server/manifests";

/// The names a spec may list, in order.
pub fn names() -> impl Iterator<Item = &'static str> {
    COMPONENTS.iter().map(|(name, _)| *name)
}

/// The manifest of a component.
pub fn manifest(name: &str) -> Option<&'static str> {
    COMPONENTS.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
}

/// Where a component's manifest lands in the root. The prefix keeps kiln's
/// files apart from the ones k3s writes there itself (coredns.yaml, ...).
pub fn path_in_root(name: &str) -> String {
    format!("{MANIFESTS_DIR}/kiln-platform-{name}.yaml")
}

/// Lays the chosen components' manifests into a root tree (0644, root-owned).
pub fn lay(tree: &mut Tree, chosen: &[String]) -> Result<()> {
    for name in chosen {
        let yaml = manifest(name).with_context(|| {
            format!(
                "unknown platform component {name:?} (known: {})",
                names().collect::<Vec<_>>().join(", ")
            )
        })?;
        let path = path_in_root(name);
        tree.insert(&path, Entry::file(yaml.as_bytes().to_vec(), 0o644))
            .with_context(|| format!("laying the platform manifest /{path}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_yaml_ng::Value;

    /// Fields of a k3s HelmChart's spec (helm.cattle.io/v1).
    const HELMCHART_SPEC_FIELDS: &[&str] = &[
        "chart",
        "repo",
        "version",
        "targetNamespace",
        "createNamespace",
        "valuesContent",
        "set",
        "helmVersion",
        "bootstrap",
        "jobImage",
        "timeout",
        "failurePolicy",
        "authSecret",
        "repoCA",
        "repoCAConfigMap",
        "dockerRegistrySecret",
        "plainHTTP",
        "insecureSkipTLSVerify",
        "chartContent",
        "backOffLimit",
        "podSecurityContext",
        "securityContext",
    ];

    /// digits.digits.digits with an optional pre-release (-rc.1) and build
    /// (+meta) part: one exact version, never a range or "latest".
    fn is_exact_semver(v: &str) -> bool {
        let (core, rest) = match v.find(['-', '+']) {
            Some(i) => (&v[..i], &v[i..]),
            None => (v, ""),
        };
        let parts: Vec<&str> = core.split('.').collect();
        let numeric = |p: &&str| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p.len() == 1 || !p.starts_with('0'))
        };
        let tail_ok = rest.is_empty()
            || (rest.len() > 1
                && rest[1..]
                    .split(['.', '-', '+'])
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric())));
        parts.len() == 3 && parts.iter().all(numeric) && tail_ok
    }

    fn str_at<'a>(doc: &'a Value, path: &[&str]) -> Option<&'a str> {
        let mut v = doc;
        for key in path {
            v = v.get(*key)?;
        }
        v.as_str()
    }

    /// Checks one HelmChart document; returns its problems.
    fn helmchart_problems(doc: &Value) -> Vec<String> {
        let mut bad = Vec::new();
        let mut need =
            |path: &[&str], ok: &dyn Fn(&str) -> bool, what: &str| match str_at(doc, path) {
                Some(v) if ok(v) => {}
                Some(v) => bad.push(format!("{} = {v:?}: {what}", path.join("."))),
                None => bad.push(format!("{}: missing or not a string", path.join("."))),
            };
        need(
            &["apiVersion"],
            &|v| v == "helm.cattle.io/v1",
            "not helm.cattle.io/v1",
        );
        need(&["kind"], &|v| v == "HelmChart", "not HelmChart");
        need(
            &["metadata", "name"],
            &|v| is_dns_label(v),
            "not a DNS label",
        );
        need(
            &["metadata", "namespace"],
            &|v| v == "kube-system",
            "not kube-system",
        );
        need(
            &["spec", "repo"],
            &|v| v.starts_with("https://") && v.len() > 8 && !v.contains(' '),
            "not an https URL",
        );
        need(&["spec", "chart"], &|v| !v.trim().is_empty(), "empty");
        need(
            &["spec", "version"],
            &is_exact_semver,
            "not an exact version (x.y.z)",
        );
        need(
            &["spec", "targetNamespace"],
            &|v| is_dns_label(v),
            "not a DNS label",
        );
        let Some(spec) = doc.get("spec").and_then(Value::as_mapping) else {
            bad.push("spec: missing or not a mapping".into());
            return bad;
        };
        for key in spec.keys() {
            match key.as_str() {
                Some(k) if HELMCHART_SPEC_FIELDS.contains(&k) => {}
                _ => bad.push(format!("spec.{key:?}: not a HelmChart field")),
            }
        }
        if let Some(v) = spec.get("createNamespace") {
            if !v.is_bool() {
                bad.push("spec.createNamespace: not a boolean".into());
            }
        }
        // Numbers in a version would be read as floats by some tools.
        if spec.get("version").is_some_and(|v| !v.is_string()) {
            bad.push("spec.version: not a string".into());
        }
        if let Some(values) = spec.get("valuesContent") {
            match values.as_str() {
                None => bad.push("spec.valuesContent: not a string".into()),
                Some(text) => match serde_yaml_ng::from_str::<Value>(text) {
                    Ok(v) if v.is_mapping() => {}
                    Ok(_) => bad.push("spec.valuesContent: not a YAML mapping".into()),
                    Err(e) => bad.push(format!("spec.valuesContent: not YAML: {e}")),
                },
            }
        }
        bad
    }

    fn is_dns_label(v: &str) -> bool {
        !v.is_empty()
            && v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !v.starts_with('-')
            && !v.ends_with('-')
    }

    /// The documents of a (possibly multi-document) YAML file.
    fn documents(yaml: &str) -> Result<Vec<Value>, serde_yaml_ng::Error> {
        use serde::Deserialize;
        serde_yaml_ng::Deserializer::from_str(yaml)
            .map(Value::deserialize)
            .filter(|d| !matches!(d, Ok(Value::Null)))
            .collect()
    }

    #[test]
    fn every_manifest_is_a_valid_pinned_helmchart() {
        let mut failures = Vec::new();
        let mut releases = Vec::new();
        for (name, yaml) in COMPONENTS {
            let docs = match documents(yaml) {
                Ok(d) => d,
                Err(e) => {
                    failures.push(format!("{name}.yaml: not YAML: {e}"));
                    continue;
                }
            };
            let charts: Vec<&Value> = docs
                .iter()
                .filter(|d| str_at(d, &["kind"]) == Some("HelmChart"))
                .collect();
            if charts.is_empty() {
                failures.push(format!("{name}.yaml: no HelmChart"));
            }
            for doc in &docs {
                for key in [&["apiVersion"][..], &["kind"], &["metadata", "name"]] {
                    if str_at(doc, key).is_none() {
                        failures.push(format!("{name}.yaml: a document has no {}", key.join(".")));
                    }
                }
            }
            for chart in charts {
                for p in helmchart_problems(chart) {
                    failures.push(format!("{name}.yaml: {p}"));
                }
                if let Some(n) = str_at(chart, &["metadata", "name"]) {
                    releases.push(n.to_string());
                }
            }
            assert!(
                yaml.starts_with('#'),
                "{name}.yaml should open with a comment saying what it is"
            );
        }
        let count = releases.len();
        releases.sort();
        releases.dedup();
        if releases.len() != count {
            failures.push("two HelmCharts share a metadata.name".into());
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn the_checker_refuses_what_it_should() {
        let good = r#"
apiVersion: helm.cattle.io/v1
kind: HelmChart
metadata: {name: x, namespace: kube-system}
spec:
  repo: https://charts.example.org
  chart: x
  version: 1.2.3
  targetNamespace: x
  createNamespace: true
  valuesContent: |-
    a: 1
"#;
        let doc = |s: &str| serde_yaml_ng::from_str::<Value>(s).unwrap();
        assert_eq!(helmchart_problems(&doc(good)), Vec::<String>::new());
        for (from, to) in [
            ("1.2.3", "^1.2.3"),
            ("1.2.3", "1.2.x"),
            ("1.2.3", "~1.2"),
            ("1.2.3", "latest"),
            ("1.2.3", "\">=1.2.3\""),
            ("1.2.3", "1.2"),
            ("1.2.3", "\"*\""),
            ("https://charts", "http://charts"),
            ("createNamespace: true", "createNamespce: true"),
            ("    a: 1", "    - a"),
            ("    a: 1", "    a: [1"),
            ("targetNamespace: x", "targetNamespace: X_y"),
            ("kind: HelmChart", "kind: HelmChartConfig"),
        ] {
            let p = helmchart_problems(&doc(&good.replace(from, to)));
            assert!(!p.is_empty(), "{to:?} should be refused");
        }
        assert!(is_exact_semver("1.8.1-rc1"));
        assert!(is_exact_semver("0.20.4"));
        assert!(!is_exact_semver("01.2.3"));
        assert!(!is_exact_semver("1.2.3-"));
    }

    #[test]
    fn all_seven_components_are_there() {
        let mut want = [
            "argocd",
            "vault",
            "external-secrets",
            "longhorn",
            "kube-prometheus-stack",
            "loki",
            "tempo",
        ];
        want.sort();
        let have: Vec<&str> = names().collect();
        assert_eq!(have, want, "the table is sorted and holds the seven");
    }

    #[test]
    fn every_file_in_overlays_platform_is_compiled_in() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../overlays/platform");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let listed: Vec<String> = names().map(|n| format!("{n}.yaml")).collect();
        assert_eq!(on_disk, listed);
        for (name, yaml) in COMPONENTS {
            let file = std::fs::read_to_string(format!("{dir}/{name}.yaml")).unwrap();
            assert_eq!(&file, yaml);
        }
    }

    #[test]
    fn chosen_manifests_land_in_the_k3s_manifests_directory() {
        let mut tree = Tree::new();
        lay(&mut tree, &["vault".into(), "longhorn".into()]).unwrap();
        let files: Vec<(&str, &Entry)> = tree.walk("var").filter(|(_, e)| !e.is_dir()).collect();
        let paths: Vec<&str> = files.iter().map(|(p, _)| *p).collect();
        assert_eq!(
            paths,
            [
                "var/lib/rancher/k3s/server/manifests/kiln-platform-longhorn.yaml",
                "var/lib/rancher/k3s/server/manifests/kiln-platform-vault.yaml",
            ]
        );
        for (_, e) in &files {
            assert_eq!((e.mode, e.uid, e.gid), (0o644, 0, 0));
        }
        assert_eq!(
            tree.read("var/lib/rancher/k3s/server/manifests/kiln-platform-vault.yaml")
                .unwrap()
                .as_ref(),
            include_bytes!("../../overlays/platform/vault.yaml")
        );
        let mut none = Tree::new();
        lay(&mut none, &[]).unwrap();
        assert!(none.is_empty());
        let e = lay(&mut none, &["nomad".into()]).unwrap_err().to_string();
        assert!(
            e.contains("\"nomad\"") && e.contains("argocd, external-secrets"),
            "{e}"
        );
    }
}
