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
        "usr/lib/kiln/settings.sh",
        include_str!("../../overlays/base/usr/lib/kiln/settings.sh"),
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

    /// Runs `script` in sh after sourcing lib.sh and data.sh (log() goes
    /// to stderr); returns (success, stdout).
    fn sh_with_lib(script: &str) -> (bool, String) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../overlays/base/usr/lib/kiln");
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                &format!(
                    ". {dir}/lib.sh; . {dir}/data.sh; . {dir}/settings.sh; \
                     log() {{ echo \"$*\" >&2; }}; {script}"
                ),
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    }

    /// The initramfs finds a card's root by PARTUUID as Linux spells it:
    /// the MBR's disk id and the partition number.
    #[test]
    fn partuuid_of_an_mbr_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("mbr.img");
        let mut f = std::fs::File::create(&img).unwrap();
        f.set_len(8 << 20).unwrap();
        let mut mbr = mbrman::MBR::new_from(&mut f, 512, 0x1234abcdu32.to_le_bytes()).unwrap();
        for (i, start) in [(1usize, 2048u32), (2, 6144), (3, 10240)] {
            mbr[i] = mbrman::MBRPartitionEntry {
                boot: mbrman::BOOT_INACTIVE,
                first_chs: mbrman::CHS::empty(),
                sys: if i == 1 { 0x0c } else { 0x83 },
                last_chs: mbrman::CHS::empty(),
                starting_lba: start,
                sectors: 4096,
            };
        }
        mbr.write_into(&mut f).unwrap();
        drop(f);
        let p = img.display();
        assert_eq!(
            sh_with_lib(&format!("kiln_partuuid {p} 2")),
            (true, "1234abcd-02".to_string())
        );
        assert_eq!(
            sh_with_lib(&format!("kiln_partuuid {p} 3")),
            (true, "1234abcd-03".to_string())
        );
        assert!(
            !sh_with_lib(&format!("kiln_partuuid {p} 4")).0,
            "slot 4 is empty"
        );
        let blank = tmp.path().join("blank.img");
        std::fs::write(&blank, vec![0u8; 4096]).unwrap();
        assert!(!sh_with_lib(&format!("kiln_partuuid {} 1", blank.display())).0);
        if which("sfdisk") {
            assert_eq!(
                sh_with_lib(&format!("kiln_disk_table {p}")),
                (
                    true,
                    "dos 0\n2048 4096 C\n6144 4096 83\n10240 4096 83\n0 0 0".to_string()
                )
            );
        }
    }

    /// GPT: the partition's unique GUID, lower case, as sfdisk wrote it.
    #[test]
    fn partuuid_of_a_gpt_disk() {
        if !which("sfdisk") {
            eprintln!(
                "SKIP partuuid_of_a_gpt_disk: sfdisk is not installed (apt-get install fdisk)"
            );
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("gpt.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let mut c = std::process::Command::new("sfdisk")
            .arg("--quiet")
            .arg(&img)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(
                b"label: gpt\nsize=1MiB, uuid=0A1B2C3D-4E5F-6A7B-8C9D-0E1F2A3B4C5D, name=one\n\
                  size=1MiB, uuid=F0E1D2C3-B4A5-9687-7869-5A4B3C2D1E0F, name=two\n",
            )
            .unwrap();
        assert!(c.wait().unwrap().success());
        let p = img.display();
        assert_eq!(
            sh_with_lib(&format!("kiln_partuuid {p} 1")),
            (true, "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d".to_string())
        );
        assert_eq!(
            sh_with_lib(&format!("kiln_partuuid {p} 2")),
            (true, "f0e1d2c3-b4a5-9687-7869-5a4b3c2d1e0f".to_string())
        );
        assert!(!sh_with_lib(&format!("kiln_partuuid {p} 3")).0);
        assert_eq!(
            sh_with_lib(&format!("kiln_disk_table {p}")),
            (
                true,
                "gpt 16350\n2048 2048 0FC63DAF-8483-4772-8E79-3D69D8477DE4\n\
                 4096 2048 0FC63DAF-8483-4772-8E79-3D69D8477DE4\n0 0 0\n0 0 0"
                    .to_string()
            )
        );
    }

    /// Settings written on another system keep no carriage returns; a file
    /// of comments only (the image's template) is no settings; kiln.imds
    /// decides whether the metadata service is asked.
    #[test]
    fn settings_files_and_the_metadata_switch() {
        let tmp = tempfile::tempdir().unwrap();
        let crlf = tmp.path().join("crlf.yaml");
        std::fs::write(
            &crlf,
            "# edited on Windows\r\nhostname: \"n1\"\r\nrole: \"agent\"\r\n",
        )
        .unwrap();
        let out = tmp.path().join("out.yaml");
        let (ok, host) = sh_with_lib(&format!(
            "kiln_copy_settings {} {o} && kiln_has_settings {o} && kiln_yaml_scalar hostname <{o}",
            crlf.display(),
            o = out.display()
        ));
        assert!(ok);
        assert_eq!(host, "n1");
        assert!(!std::fs::read(&out).unwrap().contains(&b'\r'));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let template = tmp.path().join("template.yaml");
        std::fs::write(&template, crate::sdcard::settings_template()).unwrap();
        assert!(!sh_with_lib(&format!("kiln_has_settings {}", template.display())).0);
        assert!(sh_with_lib("KILN_IMDS=1; kiln_imds_expected").0);
        assert!(!sh_with_lib("KILN_IMDS=0; kiln_imds_expected").0);
    }

    fn which(prog: &str) -> bool {
        std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(prog).is_file()))
            .unwrap_or(false)
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
