//! The disk image container formats (kiln_builder::diskfmt) against the real
//! tools: qemu-img (qemu-utils) reads the qcow2 and VHD files, GNU tar and
//! gzip the GCE tarball. Without a tool a test prints SKIP and passes.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_builder::diskfmt::{
    vhd_checksum, vhd_geometry, vhd_unique_id, write_gce_tarball, write_qcow2, write_vhd_fixed,
};
use rand::{Rng, SeedableRng};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 * KIB;
const EPOCH: u64 = 1_735_689_600;
const SEED: &str = "kiln-test-image";

/// The raw image sizes tried: neither a multiple of 64 KiB nor of 1 MiB; a
/// multiple of 64 KiB but not of 1 MiB; a whole number of MiB.
const SIZES: [u64; 3] = [5 * MIB + 3 * 512, 6 * MIB + 128 * KIB, 6 * MIB];

/// Whether `tool` runs; prints a SKIP line without it.
fn have(test: &str, tool: &str, package: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP {test}: {tool} is not installed (apt-get install {package})");
    }
    ok
}

fn have_qemu_img(test: &str) -> bool {
    have(test, "qemu-img", "qemu-utils")
}

/// Runs a command and returns its stdout, panicking with its output if it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(cmd: &mut Command) -> serde_json::Value {
    serde_json::from_str(&run(cmd)).unwrap()
}

/// Makes a sparse raw image of `size` bytes with data in scattered places:
/// the first 17 KiB (where a GPT lives), a run across a 64 KiB and a 1 MiB
/// boundary, one byte alone in a cluster, a run over several clusters, 256
/// KiB of zeros written out (not a hole), and the last sector (the backup GPT).
fn make_raw(path: &Path, size: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(size);
    let mut random = |n: usize| -> Vec<u8> { (0..n).map(|_| rng.gen_range(1..=255u8)).collect() };
    f.write_all_at(&random(17 * KIB as usize), 0).unwrap();
    f.write_all_at(&random(400), MIB - 100).unwrap();
    f.write_all_at(&[0xaa], MIB + 512 * KIB + 12345).unwrap();
    f.write_all_at(&random(700 * KIB as usize), 2 * MIB + 4096)
        .unwrap();
    f.write_all_at(&vec![0u8; 256 * KIB as usize], 3 * MIB)
        .unwrap();
    f.write_all_at(&random(512), size - 512).unwrap();
}

/// The 64 KiB clusters of `raw` holding a non-zero byte, and how many bytes
/// of the image they cover (the last one may be short).
fn nonzero_clusters(raw: &[u8]) -> (u64, u64) {
    let mut count = 0;
    let mut bytes = 0;
    for chunk in raw.chunks(CLUSTER as usize) {
        if chunk.iter().any(|&b| b != 0) {
            count += 1;
            bytes += chunk.len() as u64;
        }
    }
    (count, bytes)
}

fn sha256(path: &Path) -> String {
    kiln_builder::hash_file(path).unwrap().0
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

struct Image {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    raw: PathBuf,
}

fn image(size: u64) -> Image {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let raw = dir.join("disk.raw");
    make_raw(&raw, size);
    Image { _dir: d, dir, raw }
}

#[test]
fn qcow2_is_clean_identical_and_small() {
    if !have_qemu_img("qcow2_is_clean_identical_and_small") {
        return;
    }
    for size in SIZES {
        let img = image(size);
        let out = img.dir.join("disk.qcow2");
        write_qcow2(&img.raw, &out).unwrap();

        let check = run(Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&out));
        assert!(check.contains("No errors were found"), "{check}");
        let compare = run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&img.raw)
            .arg(&out));
        assert!(compare.contains("Images are identical"), "{compare}");

        let info = json(
            Command::new("qemu-img")
                .args(["info", "--output=json", "-f", "qcow2"])
                .arg(&out),
        );
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], size);
        assert_eq!(info["cluster-size"], CLUSTER);
        assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
        assert_eq!(info["format-specific"]["data"]["refcount-bits"], 16);
        assert_eq!(info["dirty-flag"], false);

        // Only the non-zero clusters are stored: the 256 KiB of written
        // zeros and the holes are not.
        let raw = std::fs::read(&img.raw).unwrap();
        let (count, bytes) = nonzero_clusters(&raw);
        let map = json(
            Command::new("qemu-img")
                .args(["map", "--output=json", "-f", "qcow2"])
                .arg(&out),
        );
        let mapped: u64 = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert_eq!(mapped, bytes, "{map}");
        // header, L1, refcount table, refcount block, one L2 table, data.
        let len = std::fs::metadata(&out).unwrap().len();
        assert_eq!(len, (5 + count) * CLUSTER);
        eprintln!("qcow2 of {size} bytes: {count} data clusters, {len} bytes");
    }
}

#[test]
fn vhd_is_fixed_whole_mib_with_a_valid_footer() {
    if !have_qemu_img("vhd_is_fixed_whole_mib_with_a_valid_footer") {
        return;
    }
    for size in SIZES {
        let img = image(size);
        let out = img.dir.join("disk.vhd");
        write_vhd_fixed(&img.raw, &out, SEED, EPOCH).unwrap();
        let disk = size.div_ceil(MIB) * MIB;

        let vhd = std::fs::read(&out).unwrap();
        let raw = std::fs::read(&img.raw).unwrap();
        assert_eq!(vhd.len() as u64, disk + 512);
        assert!(vhd[..size as usize] == raw[..], "the raw bytes come first");
        assert!(vhd[size as usize..disk as usize].iter().all(|&b| b == 0));

        let f: [u8; 512] = vhd[disk as usize..].try_into().unwrap();
        assert_eq!(&f[0..8], b"conectix");
        assert_eq!(be32(&f, 8), 2, "features");
        assert_eq!(be32(&f, 12), 0x0001_0000, "version");
        assert_eq!(be64(&f, 16), u64::MAX, "data offset of a fixed disk");
        assert_eq!(u64::from(be32(&f, 24)), EPOCH - 946_684_800, "timestamp");
        assert_eq!(&f[28..32], b"kiln");
        assert_eq!(&f[36..40], b"Wi2k");
        assert_eq!(be64(&f, 40), disk, "original size");
        assert_eq!(be64(&f, 48), disk, "current size");
        assert_eq!(be32(&f, 60), 2, "disk type fixed");
        assert_eq!(&f[68..84], &vhd_unique_id(SEED));
        assert_eq!(f[84], 0, "saved state");
        assert!(f[85..].iter().all(|&b| b == 0), "reserved");
        // The checksum, recomputed here from the bytes.
        let sum = f
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .map(|(_, &b)| u32::from(b))
            .sum::<u32>();
        assert_eq!(be32(&f, 64), !sum, "checksum");
        assert_eq!(vhd_checksum(&f), !sum);

        // The fields qemu-img writes in its own fixed VHD of that size
        // (force_size keeps the size exact; qemu-img then writes the
        // maximum CHS geometry as a marker instead of the spec's).
        let theirs = img.dir.join("qemu.vhd");
        run(Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                "subformat=fixed,force_size=on",
            ])
            .arg(&theirs)
            .arg(disk.to_string()));
        let q = std::fs::read(&theirs).unwrap();
        let q = &q[q.len() - 512..];
        for (field, at, n) in [
            ("cookie, features, version", 0, 16),
            ("data offset", 16, 8),
            ("host OS", 36, 4),
            ("sizes", 40, 16),
            ("disk type", 60, 4),
            ("saved state, reserved", 84, 428),
        ] {
            assert_eq!(&f[at..at + n], &q[at..at + n], "{field}");
        }
        // The CHS geometry: qemu-img without force_size rounds the disk up
        // to a size its geometry (the spec's algorithm) covers exactly; ours
        // gives the same geometry for that size.
        std::fs::remove_file(&theirs).unwrap();
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "vpc", "-o", "subformat=fixed"])
            .arg(&theirs)
            .arg(disk.to_string()));
        let q = std::fs::read(&theirs).unwrap();
        let q = &q[q.len() - 512..];
        let (c, h, s) = vhd_geometry(be64(q, 48));
        assert_eq!(
            [c.to_be_bytes()[0], c.to_be_bytes()[1], h, s],
            q[56..60],
            "CHS geometry of {} bytes",
            be64(q, 48)
        );
        let (c, h, s) = vhd_geometry(disk);
        assert_eq!(f[56..60], [c.to_be_bytes()[0], c.to_be_bytes()[1], h, s]);
        assert!(u64::from(c) * u64::from(h) * u64::from(s) * 512 <= disk);

        let info = json(
            Command::new("qemu-img")
                .args(["info", "--output=json", "-f", "vpc"])
                .arg(&out),
        );
        assert_eq!(info["format"], "vpc");
        assert_eq!(info["virtual-size"], disk);
        // qemu-img compare: identical; when the VHD is longer (padded to a
        // MiB) it warns about the sizes and checks the extra part is zero.
        let compare = run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "vpc"])
            .arg(&img.raw)
            .arg(&out));
        assert!(compare.contains("Images are identical"), "{compare}");
        if size % MIB == 0 {
            assert!(!compare.contains("mismatch"), "{compare}");
        }
        // Zero chunks are holes: the VHD takes no more disk than the raw.
        let on_disk = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
        assert!(on_disk(&out) <= on_disk(&img.raw) + 64 * KIB);
    }
}

/// More raw images for the tarball's sparse map: many runs (extension
/// blocks) and a hole at the end, all zeros, no zero chunk at all.
fn more_raws(dir: &Path) -> Vec<PathBuf> {
    let open = |name: &str, size: u64| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .unwrap();
        f.set_len(size).unwrap();
        f
    };
    let f = open("tail-hole.raw", 8 * MIB);
    for i in 0..60 {
        f.write_all_at(&[0x55; 3], i * 100 * KIB + 7).unwrap();
    }
    open("zeros.raw", 2 * MIB);
    let f = open("dense.raw", MIB + 512);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let data: Vec<u8> = (0..MIB + 512).map(|_| rng.gen_range(1..=255u8)).collect();
    f.write_all_at(&data, 0).unwrap();
    ["tail-hole.raw", "zeros.raw", "dense.raw"]
        .iter()
        .map(|n| dir.join(n))
        .collect()
}

#[test]
fn gce_tarball_holds_disk_raw_and_nothing_else() {
    let test = "gce_tarball_holds_disk_raw_and_nothing_else";
    if !have(test, "tar", "tar") || !have(test, "gzip", "gzip") {
        return;
    }
    let extra = tempfile::tempdir().unwrap();
    let mut raws: Vec<(Option<Image>, PathBuf)> = SIZES
        .iter()
        .map(|&size| {
            let img = image(size);
            let raw = img.raw.clone();
            (Some(img), raw)
        })
        .collect();
    raws.extend(more_raws(extra.path()).into_iter().map(|raw| (None, raw)));
    for (i, (_img, raw)) in raws.iter().enumerate() {
        let size = std::fs::metadata(raw).unwrap().len();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("disk.gce.tar.gz");
        write_gce_tarball(raw, &out, EPOCH).unwrap();
        let name = raw.file_name().unwrap().to_str().unwrap();
        let what = format!("{name} ({i}), {size} bytes");

        let listing = run(Command::new("tar").arg("-tvzf").arg(&out).env("TZ", "UTC"));
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: {listing}");
        let fields: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(fields[0], "-rw-r--r--", "{what}: {listing}");
        assert_eq!(fields[1], "root/root", "{what}: {listing}");
        assert_eq!(fields[2], size.to_string(), "{what}: {listing}");
        assert_eq!(fields[3..5], ["2025-01-01", "00:00"], "{what}: {listing}");
        assert_eq!(fields[5..], ["disk.raw"], "{what}: {listing}");
        let numeric = run(Command::new("tar")
            .args(["--numeric-owner", "-tvzf"])
            .arg(&out));
        assert!(numeric.contains(" 0/0 "), "{what}: {numeric}");

        let x = dir.path().join("x");
        std::fs::create_dir(&x).unwrap();
        let stderr = Command::new("tar")
            .arg("-xzf")
            .arg(&out)
            .arg("-C")
            .arg(&x)
            .output()
            .unwrap();
        assert!(stderr.status.success(), "{what}: {stderr:?}");
        assert!(stderr.stderr.is_empty(), "{what}: {stderr:?}");
        let names: Vec<_> = std::fs::read_dir(&x)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["disk.raw"], "{what}");
        let extracted = x.join("disk.raw");
        assert_eq!(sha256(&extracted), sha256(raw), "{what}");
        let meta = std::fs::metadata(&extracted).unwrap();
        assert_eq!(meta.mtime() as u64, EPOCH, "{what}");
        assert_eq!(meta.len(), size, "{what}");

        // Python's tarfile, another reader of GNU sparse members.
        if have(test, "python3", "python3") {
            let script = "import hashlib, sys, tarfile\n\
                          t = tarfile.open(sys.argv[1])\n\
                          m = t.getmembers()\n\
                          assert [x.name for x in m] == ['disk.raw'], m\n\
                          print(m[0].size, hashlib.sha256(t.extractfile(m[0]).read()).hexdigest())";
            let py = run(Command::new("python3").arg("-c").arg(script).arg(&out));
            assert_eq!(py.trim(), format!("{size} {}", sha256(raw)), "{what}");
        }

        run(Command::new("gzip").arg("-t").arg(&out));
        // gzip header: deflate, no flags (no name), mtime 0, OS 255.
        let gz = std::fs::read(&out).unwrap();
        assert_eq!(gz[..8], [0x1f, 0x8b, 8, 0, 0, 0, 0, 0], "{what}");
        assert_eq!(gz[9], 255, "{what}");
        // The tar header: old GNU magic, mode, owner, mtime, type.
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut tar).unwrap();
        let h = &tar[..512];
        assert_eq!(&h[..9], b"disk.raw\0");
        assert_eq!(&h[257..265], b"ustar  \0");
        assert_eq!(&h[100..107], b"0000644");
        assert_eq!(&h[108..115], b"0000000");
        assert_eq!(&h[116..123], b"0000000");
        let mtime = std::str::from_utf8(&h[136..147]).unwrap();
        assert_eq!(u64::from_str_radix(mtime, 8).unwrap(), EPOCH);
        let octal =
            |at: usize| u64::from_str_radix(std::str::from_utf8(&h[at..at + 11]).unwrap(), 8);
        let stored = octal(124).unwrap();
        // The headers, the member padded to a block, two zero blocks.
        let (raw_bytes, _) = (std::fs::read(raw).unwrap(), ());
        let (_, data) = nonzero_clusters(&raw_bytes);
        let extension_blocks = if name == "dense.raw" {
            assert_eq!(h[156], b'0', "{what}: a plain member");
            assert_eq!(stored, size);
            0
        } else {
            assert_eq!(h[156], b'S', "{what}: a GNU sparse member");
            assert_eq!(octal(483).unwrap(), size, "{what}: real size");
            assert_eq!(stored, data, "{what}: only the non-zero chunks are stored");
            if h[482] == 1 {
                let mut n = 1;
                while tar[512 * n + 504] == 1 {
                    n += 1;
                }
                n
            } else {
                0
            }
        };
        if name == "tail-hole.raw" {
            assert!(extension_blocks >= 2, "{what}: {extension_blocks}");
        }
        assert_eq!(
            tar.len() as u64,
            512 * (1 + extension_blocks as u64) + stored.div_ceil(512) * 512 + 1024,
            "{what}"
        );
        eprintln!(
            "{what}: tar {} bytes ({extension_blocks} sparse extension blocks), gzip {} bytes",
            tar.len(),
            gz.len()
        );
    }
}

#[test]
fn every_format_is_reproducible() {
    let size = SIZES[0];
    let a = image(size);
    let b = tempfile::tempdir().unwrap();
    let raw_b = b.path().join("disk.raw");
    std::fs::copy(&a.raw, &raw_b).unwrap();
    let write_all = |raw: &Path, dir: &Path, seed: &str| {
        write_qcow2(raw, &dir.join("disk.qcow2")).unwrap();
        write_vhd_fixed(raw, &dir.join("disk.vhd"), seed, EPOCH).unwrap();
        write_gce_tarball(raw, &dir.join("disk.gce.tar.gz"), EPOCH).unwrap();
    };
    write_all(&a.raw, &a.dir, SEED);
    write_all(&raw_b, b.path(), SEED);
    for name in ["disk.qcow2", "disk.vhd", "disk.gce.tar.gz"] {
        let (x, y) = (a.dir.join(name), b.path().join(name));
        assert_eq!(sha256(&x), sha256(&y), "{name} differs between two runs");
    }
    // Writing again over the outputs replaces them with the same bytes and
    // leaves no temporary file behind.
    let before = sha256(&a.dir.join("disk.vhd"));
    write_all(&a.raw, &a.dir, SEED);
    assert_eq!(sha256(&a.dir.join("disk.vhd")), before);
    let mut names: Vec<_> = std::fs::read_dir(&a.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["disk.gce.tar.gz", "disk.qcow2", "disk.raw", "disk.vhd"]
    );
    // Another seed changes only the VHD's unique id and checksum.
    let other = b.path().join("other.vhd");
    write_vhd_fixed(&raw_b, &other, "another-image", EPOCH).unwrap();
    let (x, y) = (
        std::fs::read(a.dir.join("disk.vhd")).unwrap(),
        std::fs::read(&other).unwrap(),
    );
    let differ: Vec<usize> = (0..x.len()).filter(|&i| x[i] != y[i]).collect();
    let footer = x.len() - 512;
    assert!(differ
        .iter()
        .all(|&i| (footer + 64..footer + 84).contains(&i)));
}

/// Sizes and timings for a 2 GiB mostly-empty raw image (32 MiB of data in
/// a few places), sparse on disk and with its zeros written out: `cargo test -p kiln-builder --release --test
/// diskfmt -- --ignored --nocapture`.
#[test]
#[ignore]
fn two_gib_mostly_empty_timings() {
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let raw = d.path().join("disk.raw");
    let size = 2u64 << 30;
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&raw)
            .unwrap();
        f.set_len(size).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut data = vec![0u8; 8 * MIB as usize];
        rng.fill(&mut data[..]);
        // A GPT, an 8 MiB "boot partition", 3 x 8 MiB of "root file system"
        // spread out, the backup GPT.
        f.write_all_at(&data[..17 * KIB as usize], 0).unwrap();
        for at in [MIB, 300 * MIB, 310 * MIB, 1200 * MIB] {
            f.write_all_at(&data, at).unwrap();
        }
        f.write_all_at(&data[..17 * KIB as usize], size - 17 * KIB)
            .unwrap();
    }
    // The same image with its zeros written out (no holes): every byte is
    // read and checked.
    let dense = d.path().join("dense.raw");
    {
        let mut from = std::fs::File::open(&raw).unwrap();
        let mut to = std::fs::File::create(&dense).unwrap();
        std::io::copy(&mut from, &mut to).unwrap();
        to.sync_all().unwrap();
    }
    let on_disk = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    for raw in [&raw, &dense] {
        eprintln!("{}: {size} bytes, {} on disk", raw.display(), on_disk(raw));
        for name in ["disk.qcow2", "disk.vhd", "disk.gce.tar.gz"] {
            let out = d.path().join(name);
            let t = std::time::Instant::now();
            match name {
                "disk.qcow2" => write_qcow2(raw, &out),
                "disk.vhd" => write_vhd_fixed(raw, &out, SEED, EPOCH),
                _ => write_gce_tarball(raw, &out, EPOCH),
            }
            .unwrap();
            let took = t.elapsed();
            let meta = std::fs::metadata(&out).unwrap();
            eprintln!(
                "  {name}: {took:.2?}, {} bytes, {} on disk",
                meta.len(),
                on_disk(&out)
            );
        }
    }
}
