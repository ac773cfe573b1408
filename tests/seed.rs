//! `kiln seed` through the real binary: a NoCloud seed image (FAT12,
//! labelled CIDATA) with a node config, checked with fsck.vfat, blkid, file,
//! mtools and the node's own shell parser. Quick: no network, no QEMU.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::*;

const NODE_YAML: &str = "\
# a node config saved from kiln serve
role: agent
server: \"http://10.9.8.7:8080\"
data_disk: /dev/vdb
k3s:
  server: \"https://10.9.8.1:6443\"
  token: \"s3cret-token\"
  node-label: [\"zone=a\"]
";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a tool; panics with its output unless it succeeds; returns stdout.
fn run(cmd: &mut Command) -> String {
    let o = cmd.env("MTOOLS_SKIP_CHECK", "1").output().unwrap();
    assert!(o.status.success(), "{cmd:?}: {o:?}");
    String::from_utf8(o.stdout).unwrap()
}

/// What the node's shell parser (lib.sh) reads from the file `f`.
fn node_reads(f: &Path, func: &str, key: &str) -> String {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(". \"$0\"; {func} {key} < \"$1\""))
        .arg(repo().join("overlays/base/usr/lib/kiln/lib.sh"))
        .arg(f)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout).unwrap().trim_end().to_string()
}

/// The files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn seed_image_is_a_cidata_volume_with_the_node_config() {
    let test = "seed_image_is_a_cidata_volume_with_the_node_config";
    let d = tempfile::tempdir().unwrap();
    let config = d.path().join("node.yaml");
    std::fs::write(&config, NODE_YAML).unwrap();
    let img = d.path().join("seed.img");
    let (ok, out, err) = kiln(
        &["seed", s(&img), "--config", s(&config), "--hostname", "n1"],
        &[],
    );
    assert!(ok, "{out}\n{err}");
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len(), 1 << 20);
    assert_eq!(std::fs::metadata(&img).unwrap().mode() & 0o777, 0o600);
    assert_eq!(listing(d.path()), ["node.yaml", "seed.img"]);

    // The expected files: user-data is kiln.yaml's format with the flag
    // laid over the file; the instance id follows from it.
    let user_data = "\
# kiln node settings, written by kiln seed
hostname: \"n1\"
role: \"agent\"
server: \"http://10.9.8.7:8080\"
data_disk: \"/dev/vdb\"
k3s:
  server: \"https://10.9.8.1:6443\"
  token: \"s3cret-token\"
  node-label: [\"zone=a\"]
";
    let id = format!(
        "kiln-{}",
        &kiln_builder::sha256_hex(user_data.as_bytes())[..16]
    );
    let meta_data = format!("instance-id: \"{id}\"\nlocal-hostname: \"n1\"\n");

    // What it says: the path, the label, the instance id, the settings (not
    // the token), and the image's sha256.
    assert!(out.contains(&format!("wrote {}", s(&img))), "{out}");
    assert!(out.contains("labelled CIDATA"), "{out}");
    assert!(out.contains(&format!("instance-id: {id}")), "{out}");
    assert!(
        out.contains(
            "hostname n1, role agent, server http://10.9.8.7:8080, data_disk /dev/vdb, \
             k3s server token node-label"
        ),
        "{out}"
    );
    assert!(out.contains(&kiln_builder::sha256_hex(&bytes)), "{out}");
    assert!(
        !out.contains("s3cret") && !err.contains("s3cret"),
        "{out}{err}"
    );

    if have("fsck.vfat") {
        let o = Command::new("fsck.vfat")
            .arg("-n")
            .arg(&img)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "fsck.vfat: {o:?}");
        assert!(!report.contains("Dirty bit"), "{report}");
        // fsck counts the volume label entry as a file (as for mkfs.vfat's).
        assert!(report.contains("3 files"), "{report}");
    } else {
        skip(test, "no fsck.vfat (apt-get install dosfstools)");
    }
    if have("blkid") {
        let label = run(Command::new("blkid")
            .args(["-o", "value", "-s", "LABEL"])
            .arg(&img));
        assert_eq!(label.trim(), "CIDATA");
        let kind = run(Command::new("blkid")
            .args(["-o", "value", "-s", "TYPE"])
            .arg(&img));
        assert_eq!(kind.trim(), "vfat");
        // No partition table: the volume starts at byte 0.
        let pt = Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "PTTYPE"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&pt.stdout).trim().is_empty(),
            "{pt:?}"
        );
    } else {
        skip(test, "no blkid (apt-get install util-linux)");
    }
    if have("file") {
        let f = run(Command::new("file").arg("-b").arg(&img));
        assert!(f.contains("FAT (12 bit)"), "{f}");
        assert!(f.contains("CIDATA"), "{f}");
    } else {
        skip(test, "no file (apt-get install file)");
    }
    if have("mtype") {
        let mtype = |name: &str| {
            run(Command::new("mtype")
                .arg("-i")
                .arg(&img)
                .arg(format!("::/{name}")))
        };
        assert_eq!(mtype("user-data"), user_data);
        assert_eq!(mtype("meta-data"), meta_data);
        let dir = run(Command::new("mdir").arg("-i").arg(&img).arg("::/"));
        assert!(dir.contains("Volume in drive : is CIDATA"), "{dir}");
        assert!(dir.contains("2 files"), "{dir}");
    } else {
        skip(test, "no mtools (apt-get install mtools)");
    }

    // The node's parser reads user-data (and meta-data) as written.
    let ud = d.path().join("user-data");
    std::fs::write(&ud, user_data).unwrap();
    assert_eq!(node_reads(&ud, "kiln_yaml_scalar", "hostname"), "n1");
    assert_eq!(node_reads(&ud, "kiln_yaml_scalar", "role"), "agent");
    assert_eq!(
        node_reads(&ud, "kiln_yaml_scalar", "server"),
        "http://10.9.8.7:8080"
    );
    assert_eq!(node_reads(&ud, "kiln_yaml_scalar", "data_disk"), "/dev/vdb");
    assert_eq!(
        node_reads(&ud, "kiln_yaml_block", "k3s"),
        "server: \"https://10.9.8.1:6443\"\ntoken: \"s3cret-token\"\nnode-label: [\"zone=a\"]"
    );
    let md = d.path().join("meta-data");
    std::fs::write(&md, &meta_data).unwrap();
    assert_eq!(node_reads(&md, "kiln_yaml_scalar", "instance-id"), id);
    assert_eq!(node_reads(&md, "kiln_yaml_scalar", "local-hostname"), "n1");
}

#[test]
fn seed_images_are_reproducible() {
    let d = tempfile::tempdir().unwrap();
    let make = |name: &str, args: &[&str], env: &[(&str, String)]| {
        let img = d.path().join(name);
        let mut all = vec!["seed", s(&img)];
        all.extend_from_slice(args);
        let (ok, out, err) = kiln(&all, env);
        assert!(ok, "{out}\n{err}");
        (std::fs::read(&img).unwrap(), out)
    };
    let flags = ["--hostname", "n1", "--role", "server"];
    let (a, out_a) = make("a.img", &flags, &[]);
    let (b, out_b) = make("b.img", &flags, &[]);
    assert!(a == b, "two runs gave different images");
    assert_eq!(
        out_a.replace("a.img", "x.img"),
        out_b.replace("b.img", "x.img")
    );
    // Same again over an existing image, and with the default epoch given.
    let (a2, _) = make(
        "a.img",
        &flags,
        &[("SOURCE_DATE_EPOCH", "1735689600".into())],
    );
    assert!(a2 == a, "SOURCE_DATE_EPOCH=default changed the image");
    let (later, _) = make(
        "later.img",
        &flags,
        &[("SOURCE_DATE_EPOCH", "1767225600".into())],
    );
    assert!(later != a, "SOURCE_DATE_EPOCH is not the timestamps");

    // Another config is another instance; a given id is used as it is.
    let (_, out_c) = make("c.img", &["--hostname", "n2"], &[]);
    let id = |out: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix("instance-id: "))
            .unwrap()
            .to_string()
    };
    assert!(id(&out_a).starts_with("kiln-"), "{out_a}");
    assert_ne!(id(&out_a), id(&out_c));
    let (d_img, out_d) = make(
        "d.img",
        &["--hostname", "n1", "--instance-id", "i-0123abcd"],
        &[],
    );
    assert_eq!(id(&out_d), "i-0123abcd");
    if have("mtype") {
        let m = run(Command::new("mtype")
            .arg("-i")
            .arg(d.path().join("d.img"))
            .arg("::/meta-data"));
        assert_eq!(m, "instance-id: \"i-0123abcd\"\nlocal-hostname: \"n1\"\n");
    }
    assert_eq!(d_img.len(), 1 << 20);
}

#[test]
fn seed_refuses_bad_input_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("seed.img");
    let bad_key = d.path().join("node.yaml");
    std::fs::write(&bad_key, "hostname: n1\nrol: agent\n").unwrap();
    let empty = d.path().join("empty.yaml");
    std::fs::write(&empty, "# to be filled in\n").unwrap();
    let missing = d.path().join("missing.yaml");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--hostname", "n1", "--role", "worker"],
            &["--role", "worker"],
        ),
        (
            &["--config", s(&bad_key)],
            &["node.yaml", "unknown key \"rol\""],
        ),
        (&[], &["--config", "--hostname"]),
        (&["--instance-id", "i-1"], &["--config", "--hostname"]),
        (&["--config", s(&empty)], &["empty.yaml", "no settings"]),
        (&["--hostname", "N1"], &["--hostname", "upper-case"]),
        (&["--server", "10.0.0.1:8080"], &["--server", "http://"]),
        (
            &["--hostname", "n1", "--instance-id", "a b"],
            &["--instance-id"],
        ),
        (&["--config", s(&missing)], &["missing.yaml"]),
    ];
    for (args, says) in cases {
        let mut all = vec!["seed", s(&img)];
        all.extend_from_slice(args);
        let (ok, out, err) = kiln(&all, &[]);
        assert!(!ok, "{args:?} was accepted:\n{out}");
        for word in *says {
            assert!(err.contains(word), "{args:?}: no {word:?} in:\n{err}");
        }
        assert_eq!(
            listing(d.path()),
            ["empty.yaml", "node.yaml"],
            "{args:?} left a file"
        );
    }
    // A directory as OUT is refused, and nothing is left in it.
    let (ok, _, err) = kiln(&["seed", s(d.path()), "--hostname", "n1"], &[]);
    assert!(!ok && err.contains("is a directory"), "{err}");
    assert_eq!(listing(d.path()), ["empty.yaml", "node.yaml"]);
}
