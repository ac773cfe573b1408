//! `kiln seed OUT`: a NoCloud seed image holding a node's config, for the
//! cloud disk images. cloud-init's NoCloud convention: a drive whose file
//! system (here FAT12) is labelled `CIDATA` and holds `user-data` and
//! `meta-data` at its root.
//!
//! - `user-data` is the node config in the format `kiln flash` writes as
//!   kiln.yaml ([`Settings::to_yaml`]; only its header comment names
//!   `kiln seed`), read on the node by the same shell parser.
//! - `meta-data` is cloud-init's: `instance-id` and, with a host name,
//!   `local-hostname`. The instance id defaults to `kiln-` and the first 16
//!   hex digits of the sha256 of user-data, so a changed config is a new
//!   instance.
//!
//! The image is a whole-file FAT12 volume (no partition table), as
//! `cloud-localds` or `mkfs.vfat -n CIDATA` make: 1 MiB (larger only for a
//! config that does not fit), `CIDATA` in the boot sector and as the root
//! directory's volume label entry. It is reproducible: the volume id derives
//! from the two files, every timestamp is SOURCE_DATE_EPOCH (or kiln's
//! default), and the files are written in sorted order. It is written through
//! a temporary file in the target's directory and a rename, mode 0600 (the
//! config may hold a cluster token).

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::fat;
use crate::flash::{Flags, Settings};

/// The file system label cloud-init looks for (NoCloud).
pub const LABEL: &str = "CIDATA";
/// The node config.
pub const USER_DATA: &str = "user-data";
/// cloud-init's instance metadata.
pub const META_DATA: &str = "meta-data";
/// The first line of the user-data `kiln seed` writes.
pub const HEADER: &str = "# kiln node settings, written by kiln seed";

const MIB: u64 = 1 << 20;
/// The smallest seed image, and the largest (FAT12 with 16 KiB clusters).
const MIN_SIZE: u64 = MIB;
const MAX_SIZE: u64 = 32 * MIB;
const SECTOR: u64 = 512;
const ROOT_ENTRIES: u16 = 512;

/// The two files of a seed, and the instance id meta-data names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    pub user_data: String,
    pub meta_data: String,
    pub instance_id: String,
}

impl Seed {
    /// The seed of a node's settings; `instance_id` (checked) or, without
    /// one, [`default_instance_id`] of the user-data.
    pub fn new(settings: &Settings, instance_id: Option<&str>) -> Result<Seed> {
        let yaml = settings.to_yaml();
        let user_data = match yaml.strip_prefix(crate::flash::HEADER) {
            Some(rest) => format!("{HEADER}{rest}"),
            None => yaml,
        };
        let instance_id = match instance_id {
            Some(id) => {
                check_instance_id(id)?;
                id.to_string()
            }
            None => default_instance_id(&user_data),
        };
        let meta_data = meta_data(&instance_id, settings.hostname.as_deref());
        Ok(Seed {
            user_data,
            meta_data,
            instance_id,
        })
    }

    /// The files in the order they are written (sorted by name).
    fn files(&self) -> [(&'static str, &[u8]); 2] {
        [
            (META_DATA, self.meta_data.as_bytes()),
            (USER_DATA, self.user_data.as_bytes()),
        ]
    }
}

/// `kiln-` and the first 16 hex digits of the sha256 of `user_data`.
pub fn default_instance_id(user_data: &str) -> String {
    format!("kiln-{}", &crate::sha256_hex(user_data.as_bytes())[..16])
}

/// An instance id given on the command line: 1 to 128 of A-Z, a-z, 0-9,
/// '.', '_' and '-', starting with a letter or digit (what cloud providers'
/// ids look like; nothing to quote or escape).
fn check_instance_id(id: &str) -> Result<()> {
    let plain = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if id.is_empty() || id.len() > 128 || !plain || !id.as_bytes()[0].is_ascii_alphanumeric() {
        bail!(
            "--instance-id {id:?} is not an instance id: 1 to 128 letters, digits, '.', '_' and \
             '-', starting with a letter or digit, e.g. i-0123abcd"
        );
    }
    Ok(())
}

/// cloud-init's meta-data: the instance id and, when set, the host name,
/// as double-quoted YAML strings.
pub fn meta_data(instance_id: &str, hostname: Option<&str>) -> String {
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let mut out = format!("instance-id: {}\n", q(instance_id));
    if let Some(h) = hostname {
        out.push_str(&format!("local-hostname: {}\n", q(h)));
    }
    out
}

/// The FAT volume id of a seed: the first four bytes of a sha256 of its files.
pub fn volume_id(seed: &Seed) -> u32 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"kiln seed\0");
    for (name, bytes) in seed.files() {
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let d = h.finalize();
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// The seed image's bytes: a FAT12 volume labelled CIDATA holding the two
/// files, every timestamp `epoch`.
pub fn image(seed: &Seed, epoch: u64) -> Result<Vec<u8>> {
    let when = fat::dos_time(epoch);
    let options = || fat::options_at(epoch);
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    let total: usize = seed.files().iter().map(|(_, b)| b.len()).sum();

    // 1 MiB of 512-byte clusters holds any reasonable config; a larger one
    // doubles the volume and its clusters (about 2000 of them: FAT12).
    let mut size = MIN_SIZE;
    loop {
        let cluster = u32::try_from(size / MIB * SECTOR).context("cluster size")?;
        let mut disk = Cursor::new(vec![0u8; size as usize]);
        fatfs::format_volume(
            &mut disk,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat12)
                .bytes_per_sector(SECTOR as u16)
                .bytes_per_cluster(cluster)
                .fats(2)
                .max_root_dir_entries(ROOT_ENTRIES)
                .media(0xf8)
                .sectors_per_track(32)
                .heads(64)
                .volume_id(volume_id(seed))
                .volume_label(label),
        )
        .context("formatting the seed's FAT12 volume")?;
        stamp_label_entry(&mut disk, &when).context("dating the volume label")?;

        disk.seek(SeekFrom::Start(0))?;
        let fs =
            fatfs::FileSystem::new(&mut disk, options()).context("opening the new FAT12 volume")?;
        if fs.fat_type() != fatfs::FatType::Fat12 {
            bail!("the {size}-byte seed volume did not come out FAT12");
        }
        let need: u64 = seed
            .files()
            .iter()
            .map(|(_, b)| (b.len() as u64).div_ceil(u64::from(cluster)))
            .sum();
        let free = u64::from(
            fs.stats()
                .context("counting free clusters")?
                .free_clusters(),
        );
        if need > free {
            drop(fs);
            if size >= MAX_SIZE {
                bail!(
                    "the node config is too large for a seed image ({total} bytes; at most \
                     about {} MiB)",
                    MAX_SIZE / MIB - 1
                );
            }
            size *= 2;
            continue;
        }
        {
            let root = fs.root_dir();
            for (name, bytes) in seed.files() {
                let mut f = root
                    .create_file(name)
                    .with_context(|| format!("creating {name}"))?;
                f.truncate()?;
                f.write_all(bytes)
                    .with_context(|| format!("writing {name} ({} bytes)", bytes.len()))?;
                f.flush()?;
            }
        }
        fs.unmount().context("closing the FAT12 volume")?;
        let bytes = disk.into_inner();
        check(&bytes, seed).context("reading the seed image back")?;
        return Ok(bytes);
    }
}

/// The root directory of a FAT12/16 volume: its byte offset, from the boot
/// sector.
fn root_dir_offset(bs: &[u8]) -> Result<u64> {
    let u16_at = |o: usize| u64::from(u16::from_le_bytes([bs[o], bs[o + 1]]));
    let bytes_per_sector = u16_at(11);
    let reserved = u16_at(14);
    let fats = u64::from(bs[16]);
    let sectors_per_fat = u16_at(22);
    if bytes_per_sector == 0 || sectors_per_fat == 0 {
        bail!("not a FAT12/16 boot sector");
    }
    Ok((reserved + fats * sectors_per_fat) * bytes_per_sector)
}

/// fatfs writes the root directory's volume label entry with zero times:
/// give it the fixed time too. It is the first entry of the root directory.
fn stamp_label_entry(disk: &mut Cursor<Vec<u8>>, when: &fatfs::DateTime) -> Result<()> {
    let root = usize::try_from(root_dir_offset(disk.get_ref())?)?;
    let entry = disk
        .get_mut()
        .get_mut(root..root + 32)
        .context("the root directory is past the end of the volume")?;
    if entry[11] & 0x08 == 0 || entry[..11] != *format!("{LABEL:<11}").as_bytes() {
        bail!("the root directory does not start with the volume label");
    }
    let (date, time) = fat::packed(when);
    entry[13] = 0; // creation time, 10 ms units
    entry[14..16].copy_from_slice(&time.to_le_bytes());
    entry[16..18].copy_from_slice(&date.to_le_bytes());
    entry[18..20].copy_from_slice(&date.to_le_bytes());
    entry[22..24].copy_from_slice(&time.to_le_bytes());
    entry[24..26].copy_from_slice(&date.to_le_bytes());
    Ok(())
}

/// Reads a seed image as a FAT volume: FAT12, labelled CIDATA (boot sector
/// and root directory), with the seed's two files.
fn check(bytes: &[u8], seed: &Seed) -> Result<()> {
    let fs = fatfs::FileSystem::new(Cursor::new(bytes.to_vec()), fatfs::FsOptions::new())
        .context("not a FAT volume")?;
    if fs.fat_type() != fatfs::FatType::Fat12 {
        bail!("not FAT12");
    }
    if fs.volume_label() != LABEL || fs.read_volume_label_from_root_dir()?.as_deref() != Some(LABEL)
    {
        bail!("not labelled {LABEL}");
    }
    let root = fs.root_dir();
    for (name, want) in seed.files() {
        let mut got = Vec::new();
        root.open_file(name)
            .and_then(|mut f| f.read_to_end(&mut got))
            .with_context(|| format!("reading {name}"))?;
        if got != want {
            bail!("{name} differs from what was written");
        }
    }
    Ok(())
}

/// Writes the seed image to `path` through a temporary file (mode 0600) in
/// its directory and a rename. An existing `path` must be a regular file.
pub fn write_seed_image(path: &Path, seed: &Seed, epoch: u64) -> Result<()> {
    let name = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            bail!("{name} is a directory: name the image file to write, e.g. {name}/seed.img")
        }
        Ok(m) if !m.is_file() && !m.file_type().is_symlink() => bail!(
            "{name} is not a regular file: kiln seed writes an image file (attach it to the VM, \
             or copy it to a disk with dd)"
        ),
        _ => {}
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if path.starts_with("/dev") || std::fs::canonicalize(dir).is_ok_and(|d| d.starts_with("/dev")) {
        bail!("{name} is in /dev: kiln seed writes an image file, not a device");
    }
    let bytes = image(seed, epoch)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let f: &File = tmp.as_file();
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", tmp.path().display()))?;
    tmp.write_all(&bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {name}"))?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {name}"))?;
    Ok(())
}

/// SOURCE_DATE_EPOCH from the environment, else kiln's default.
pub fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
        _ => Ok(crate::build::DEFAULT_SOURCE_DATE_EPOCH),
    }
}

/// What `kiln seed` is asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// The image file to write.
    pub out: PathBuf,
    /// A node config file whose keys the flags override.
    pub config: Option<PathBuf>,
    pub flags: Flags,
    /// meta-data's instance id; default from the user-data.
    pub instance_id: Option<String>,
}

/// What `kiln seed` wrote.
#[derive(Clone, Debug)]
pub struct Report {
    pub out: PathBuf,
    pub size: u64,
    pub sha256: String,
    pub instance_id: String,
    pub settings: Settings,
}

impl Report {
    pub fn render(&self) -> String {
        format!(
            "wrote {} ({} KiB FAT12 volume labelled {LABEL}, mode 0600)\n  \
             instance-id: {}\n  user-data:   {}\n  sha256:      {}\n",
            self.out.display(),
            self.size / 1024,
            self.instance_id,
            self.settings.summary(),
            self.sha256,
        )
    }
}

/// `kiln seed`: the settings from `--config` and the flags, checked, then the
/// image. Nothing is written when anything is wrong.
pub fn seed(o: &Options) -> Result<Report> {
    if o.config.is_none() && o.flags.is_empty() {
        bail!(
            "kiln seed needs the node's settings: --config FILE and/or --hostname, --role, \
             --server"
        );
    }
    let mut settings = match &o.config {
        Some(p) => Settings::load(p)?,
        None => Settings::default(),
    };
    settings.apply(&o.flags)?;
    if settings == Settings::default() {
        let file = o
            .config
            .as_deref()
            .unwrap_or(Path::new("--config"))
            .display();
        bail!("{file} holds no settings (only comments?) and no --hostname, --role or --server was given: the seed would be empty");
    }
    let seed = Seed::new(&settings, o.instance_id.as_deref())?;
    let epoch = source_date_epoch()?;
    write_seed_image(&o.out, &seed, epoch)?;
    let (sha256, size) = crate::hash_file(&o.out)?;
    Ok(Report {
        out: o.out.clone(),
        size,
        sha256,
        instance_id: seed.instance_id,
        settings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: u64 = 1_735_689_600; // 2025-01-01T00:00:00Z

    fn settings(text: &str) -> Settings {
        Settings::from_yaml(text, "node.yaml").unwrap()
    }

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn meta_data_names_the_instance_and_the_host() {
        assert_eq!(
            meta_data("i-0abc", Some("n1")),
            "instance-id: \"i-0abc\"\nlocal-hostname: \"n1\"\n"
        );
        assert_eq!(meta_data("i-0abc", None), "instance-id: \"i-0abc\"\n");
        // Host names that YAML would read as numbers stay strings.
        let m: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&meta_data("x", Some("1234"))).unwrap();
        assert_eq!(m["local-hostname"].as_str(), Some("1234"));
    }

    #[test]
    fn user_data_is_the_flash_format_with_its_own_header() {
        let s = settings(
            "hostname: n1\nrole: agent\nserver: http://10.0.0.1:8080\nk3s:\n  token: \"abc\"\n",
        );
        let seed = Seed::new(&s, None).unwrap();
        let flash = s.to_yaml();
        assert_eq!(seed.user_data.lines().next(), Some(HEADER));
        assert_eq!(
            seed.user_data.lines().skip(1).collect::<Vec<_>>(),
            flash.lines().skip(1).collect::<Vec<_>>()
        );
        assert_eq!(Settings::from_yaml(&seed.user_data, "back").unwrap(), s);
        assert!(seed.meta_data.contains("local-hostname: \"n1\"\n"));
    }

    #[test]
    fn the_default_instance_id_follows_the_user_data() {
        let a = Seed::new(&settings("hostname: n1\n"), None).unwrap();
        let sha = crate::sha256_hex(a.user_data.as_bytes());
        assert_eq!(a.instance_id, format!("kiln-{}", &sha[..16]));
        assert_eq!(a.instance_id.len(), 5 + 16);
        assert!(a
            .meta_data
            .starts_with(&format!("instance-id: \"{}\"\n", a.instance_id)));
        // The same config: the same instance; any change: a new one.
        assert_eq!(Seed::new(&settings("hostname: n1\n"), None).unwrap(), a);
        let b = Seed::new(&settings("hostname: n1\nrole: agent\n"), None).unwrap();
        assert_ne!(b.instance_id, a.instance_id);
        let c = Seed::new(&settings("hostname: n1\nk3s:\n  token: t2\n"), None).unwrap();
        assert_ne!(c.instance_id, a.instance_id);
    }

    #[test]
    fn a_given_instance_id_is_used_and_checked() {
        let s = settings("hostname: n1\n");
        let seed = Seed::new(&s, Some("i-0123abcd")).unwrap();
        assert_eq!(seed.instance_id, "i-0123abcd");
        assert!(seed.meta_data.starts_with("instance-id: \"i-0123abcd\"\n"));
        for ok in ["a", "iid-local01", "vm_7.b", &"x".repeat(128)] {
            Seed::new(&s, Some(ok)).unwrap();
        }
        for bad in [
            "",
            "-a",
            ".a",
            "a b",
            "a:b",
            "a\"b",
            "a\nb",
            "é",
            &"x".repeat(129),
        ] {
            let e = err(Seed::new(&s, Some(bad)));
            assert!(e.starts_with("--instance-id"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_image_is_a_fat12_volume_labelled_cidata() {
        let seed = Seed::new(&settings("hostname: n1\nrole: agent\n"), None).unwrap();
        let bytes = image(&seed, EPOCH).unwrap();
        assert_eq!(bytes.len() as u64, MIB);
        // A volume from its first sector: no partition table.
        assert_eq!(&bytes[..3], &[0xeb, 0x3c, 0x90]);
        assert_eq!(&bytes[510..512], &[0x55, 0xaa]);
        assert_eq!(&bytes[43..54], b"CIDATA     ");
        assert_eq!(&bytes[54..62], b"FAT12   ");
        assert_eq!(&bytes[39..43], &volume_id(&seed).to_le_bytes());

        let fs =
            fatfs::FileSystem::new(Cursor::new(bytes.clone()), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat12);
        assert_eq!(fs.volume_label(), "CIDATA");
        assert_eq!(
            fs.read_volume_label_from_root_dir().unwrap().as_deref(),
            Some("CIDATA")
        );
        let names: Vec<String> = fs
            .root_dir()
            .iter()
            .map(|e| e.unwrap())
            .map(|e| {
                let m = e.modified();
                assert_eq!((m.date.year, m.date.month, m.date.day), (2025, 1, 1));
                assert_eq!(e.created().date.year, 2025);
                e.file_name()
            })
            .collect();
        assert_eq!(names, [META_DATA, USER_DATA]);
        let mut s = String::new();
        fs.root_dir()
            .open_file(USER_DATA)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, seed.user_data);

        // The label entry is dated too.
        let root = root_dir_offset(&bytes).unwrap() as usize;
        let (date, _) = fat::packed(&fat::dos_time(EPOCH));
        assert_eq!(&bytes[root..root + 11], b"CIDATA     ");
        assert_eq!(&bytes[root + 24..root + 26], &date.to_le_bytes());
    }

    #[test]
    fn the_image_is_reproducible_and_follows_its_inputs() {
        let seed = Seed::new(&settings("hostname: n1\n"), None).unwrap();
        let a = image(&seed, EPOCH).unwrap();
        assert!(image(&seed, EPOCH).unwrap() == a, "two images differ");
        assert!(image(&seed, EPOCH + 86_400).unwrap() != a);
        let other = Seed::new(&settings("hostname: n2\n"), None).unwrap();
        assert_ne!(volume_id(&other), volume_id(&seed));
        assert!(image(&other, EPOCH).unwrap() != a);
    }

    #[test]
    fn a_large_config_gets_a_larger_volume() {
        let mut s = settings("hostname: n1\n");
        s.k3s.push((
            "node-label".into(),
            serde_json::Value::from(vec!["x".repeat(100); 15_000]),
        ));
        let seed = Seed::new(&s, None).unwrap();
        let bytes = image(&seed, EPOCH).unwrap();
        assert_eq!(bytes.len() as u64, 2 * MIB);
        let fs =
            fatfs::FileSystem::new(Cursor::new(bytes.clone()), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat12);

        s.k3s[0].1 = serde_json::Value::from(vec!["x".repeat(1000); 40_000]);
        let e = err(image(&Seed::new(&s, None).unwrap(), EPOCH));
        assert!(e.contains("too large for a seed image"), "{e}");
    }

    #[test]
    fn the_image_file_is_private_and_replaced_whole() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("sub/seed.img");
        let seed = Seed::new(&settings("hostname: n1\n"), None).unwrap();
        write_seed_image(&out, &seed, EPOCH).unwrap();
        assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&out).unwrap(), image(&seed, EPOCH).unwrap());
        std::fs::write(&out, vec![1u8; 3 * MIB as usize]).unwrap();
        write_seed_image(&out, &seed, EPOCH).unwrap();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), MIB);
        assert_eq!(std::fs::read_dir(d.path().join("sub")).unwrap().count(), 1);

        let e = err(write_seed_image(d.path(), &seed, EPOCH));
        assert!(e.contains("is a directory"), "{e}");
        let e = err(write_seed_image(Path::new("/dev/null"), &seed, EPOCH));
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn seed_needs_settings_and_writes_nothing_when_refused() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("seed.img");
        let opts = |config: Option<PathBuf>, flags: Flags| Options {
            out: out.clone(),
            config,
            flags,
            instance_id: None,
        };
        let e = err(seed(&opts(None, Flags::default())));
        assert!(e.contains("--hostname"), "{e}");
        let e = err(seed(&opts(
            None,
            Flags {
                role: Some("worker".into()),
                ..Flags::default()
            },
        )));
        assert!(e.starts_with("--role"), "{e}");
        let empty = d.path().join("empty.yaml");
        std::fs::write(&empty, "# nothing yet\n").unwrap();
        let e = err(seed(&opts(Some(empty.clone()), Flags::default())));
        assert!(e.contains("empty.yaml holds no settings"), "{e}");
        let mut o = opts(
            None,
            Flags {
                hostname: Some("n1".into()),
                ..Flags::default()
            },
        );
        o.instance_id = Some("a b".into());
        assert!(err(seed(&o)).starts_with("--instance-id"));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
