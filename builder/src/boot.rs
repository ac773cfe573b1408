//! kiln's own boot files, compiled into the binary so every image gets the
//! boot protocol of the kiln that built it (DESIGN.md, "The node at boot").
//! The sources live in `overlays/initramfs` and `overlays/base`.

use anyhow::{Context, Result};

use crate::tree::{Entry, Tree};

/// The initramfs /init template (tera).
pub const INITRAMFS_INIT: &str = include_str!("../../overlays/initramfs/init.tera");

/// Files of the base overlay: (path in the root, content, mode).
pub const BASE: &[(&str, &str, u32)] = &[
    (
        "etc/inittab",
        include_str!("../../overlays/base/etc/inittab"),
        0o644,
    ),
    (
        "usr/lib/kiln/init",
        include_str!("../../overlays/base/usr/lib/kiln/init"),
        0o755,
    ),
    (
        "usr/lib/kiln/boot",
        include_str!("../../overlays/base/usr/lib/kiln/boot"),
        0o755,
    ),
    (
        "usr/lib/kiln/dhcp",
        include_str!("../../overlays/base/usr/lib/kiln/dhcp"),
        0o755,
    ),
    (
        "usr/lib/kiln/k3s-supervise",
        include_str!("../../overlays/base/usr/lib/kiln/k3s-supervise"),
        0o755,
    ),
    (
        "usr/lib/kiln/data.sh",
        include_str!("../../overlays/base/usr/lib/kiln/data.sh"),
        0o644,
    ),
    (
        "usr/lib/kiln/k3s-ready",
        include_str!("../../overlays/base/usr/lib/kiln/k3s-ready"),
        0o755,
    ),
    (
        "usr/lib/kiln/lib.sh",
        include_str!("../../overlays/base/usr/lib/kiln/lib.sh"),
        0o644,
    ),
    (
        "usr/lib/kiln/udhcpc.script",
        include_str!("../../overlays/base/usr/lib/kiln/udhcpc.script"),
        0o755,
    ),
];

/// Files of the base overlay the initramfs needs too, at these paths.
pub const INITRAMFS_SHARED: &[(&str, &str)] = &[
    ("usr/lib/kiln/lib.sh", "lib/kiln/lib.sh"),
    ("usr/lib/kiln/udhcpc.script", "lib/kiln/udhcpc.script"),
];

/// Lays the base overlay into a root tree.
pub fn lay_base(tree: &mut Tree) -> Result<()> {
    for (path, content, mode) in BASE {
        tree.insert(path, Entry::file(content.as_bytes().to_vec(), *mode))
            .with_context(|| format!("laying kiln's base file /{path}"))?;
    }
    Ok(())
}

/// Lays the base files the initramfs shares with the root.
pub fn lay_initramfs_shared(tree: &mut Tree) -> Result<()> {
    for (from, to) in INITRAMFS_SHARED {
        let (_, content, mode) = BASE
            .iter()
            .find(|(p, _, _)| p == from)
            .expect("listed in BASE");
        tree.insert(to, Entry::file(content.as_bytes().to_vec(), *mode))
            .with_context(|| format!("laying /{to} in the initramfs"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// lib.sh's back-off doubles from the start value and stops at 60 s.
    #[test]
    fn the_back_off_doubles_up_to_a_minute() {
        let lib = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../overlays/base/usr/lib/kiln/lib.sh"
        );
        let script = format!(
            ". {lib}; sleep() {{ printf '%s ' \"$1\"; }}; delay=1; \
             for i in 1 2 3 4 5 6 7 8 9; do kiln_backoff; done"
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "1 2 4 8 16 32 60 60 60 "
        );
    }

    /// data.sh copies the image's baked k3s files onto the data partition:
    /// same-named files replaced, k3s' own files and other places untouched.
    #[test]
    fn baked_k3s_files_are_copied_onto_the_data_partition() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../overlays/base/usr/lib/kiln");
        let tmp = tempfile::tempdir().unwrap();
        let (image, data) = (tmp.path().join("image"), tmp.path().join("data"));
        let write = |p: std::path::PathBuf, s: &str| {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, s).unwrap();
        };
        write(image.join("k3s/server/manifests/argocd.yaml"), "new chart");
        write(image.join("k3s/server/manifests/sub/x.yaml"), "x");
        write(image.join("k3s/agent/images/k3s-airgap.tar.zst"), "images");
        write(image.join("k3s/server/db/state"), "image db");
        write(data.join("k3s/server/manifests/argocd.yaml"), "old chart");
        write(data.join("k3s/server/manifests/coredns.yaml"), "k3s' own");
        write(data.join("k3s/server/db/state"), "etcd");
        let script = format!(
            "log() {{ echo \"$*\" >&2; }}; . {dir}/data.sh; kiln_data_bake '{}' '{}'",
            image.display(),
            data.display()
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
        let read = |p: &str| std::fs::read_to_string(data.join(p)).unwrap();
        assert_eq!(read("k3s/server/manifests/argocd.yaml"), "new chart");
        assert_eq!(read("k3s/server/manifests/sub/x.yaml"), "x");
        assert_eq!(read("k3s/agent/images/k3s-airgap.tar.zst"), "images");
        assert_eq!(read("k3s/server/manifests/coredns.yaml"), "k3s' own");
        assert_eq!(read("k3s/server/db/state"), "etcd");
    }

    #[test]
    fn every_base_file_in_the_source_tree_is_compiled_in() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../overlays/base");
        let mut on_disk = Vec::new();
        let mut stack = vec![std::path::PathBuf::from(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    on_disk.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        on_disk.sort();
        let mut listed: Vec<_> = super::BASE.iter().map(|(p, _, _)| p.to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed);
    }
}
