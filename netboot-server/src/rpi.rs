//! Raspberry Pi network boot over TFTP: the files a Pi 4 or Pi 5 bootloader
//! asks for, under `<serial>/` (its default TFTP prefix) and without it.
//!
//! A Pi image has its boot partition's files in `<images>/<image>/boot/`:
//! firmware (start4.elf, fixup4.dat, ...), DTBs, overlays/, the kernel and the
//! initramfs. (`kiln build` does not make Pi images yet; until it does, that
//! directory is filled by hand, and its files are not in the manifest, so
//! unlike HTTP artifacts they are served unchecked.) Those are served as they
//! are, through [`RootDir`] (no path leaves the directory). Two files are made
//! per machine:
//!
//! - `config.txt`: the image's own (or a minimal one: 64-bit, kernel and
//!   initramfs), under a comment naming the machine;
//! - `cmdline.txt`: the image's `cmdline.txt` (console settings; its own
//!   `kiln.*` arguments dropped) followed by the `kiln.*` arguments that make its initramfs fetch the root by HTTP
//!   from this server, as the iPXE script does for PCs.
//!
//! Which machine asks: the serial prefix names it (the DHCP server records
//! each Pi's serial and MAC from option 97); without a prefix, the client's
//! address is looked up in the kernel's neighbour table (/proc/net/arp). Its
//! inventory entry (by MAC or serial) chooses the image; otherwise the default.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use kiln_builder::manifest::{LoadError, Manifest};

use crate::config::Machine;
use crate::state::State;
use crate::tftp::files::{sanitize_path, FileSource, RootDir, TftpError, TftpFile};

/// The `config.txt` of a Pi image that brings none.
pub const DEFAULT_CONFIG_TXT: &str =
    "arm_64bit=1\nkernel=vmlinuz\ninitramfs initrd.img followkernel\n";

/// Raspberry Pi boot files, per machine.
pub struct PiFiles {
    pub images: PathBuf,
    pub default_image: String,
    pub machines: Vec<Machine>,
    /// Under `allowlist`, Pis outside the inventory get no files.
    pub admission: crate::config::Admission,
    pub state: Arc<State>,
    pub public_url: String,
    pub kernel_args: BTreeMap<String, String>,
    /// The MAC of a client address (the neighbour table; tests replace it).
    pub neighbour: fn(IpAddr) -> Option<String>,
}

/// Splits a sanitized path into the serial prefix, if its first component is
/// one (8 hex digits), and the rest.
pub fn split_serial(path: &str) -> (Option<String>, &str) {
    match path.split_once('/') {
        Some((first, rest)) if first.len() == 8 && first.bytes().all(|b| b.is_ascii_hexdigit()) => {
            (Some(first.to_ascii_lowercase()), rest)
        }
        _ => (None, path),
    }
}

/// The MAC the neighbour table `/proc/net/arp` (its text) gives `ip`, if it
/// has a complete entry.
pub fn mac_in_arp_table(table: &str, ip: IpAddr) -> Option<String> {
    let ip = ip.to_string();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // IP address, HW type, Flags, HW address, Mask, Device; flag 0x2 = complete.
        let complete = f
            .get(2)
            .and_then(|x| u32::from_str_radix(x.trim_start_matches("0x"), 16).ok())
            .is_some_and(|flags| flags & 0x2 != 0);
        (f.first() == Some(&ip.as_str()) && complete)
            .then(|| f.get(3).map(|m| m.to_ascii_lowercase()))?
    })
}

/// The neighbour table of this host.
pub fn system_neighbour(ip: IpAddr) -> Option<String> {
    mac_in_arp_table(&std::fs::read_to_string("/proc/net/arp").ok()?, ip)
}

impl PiFiles {
    /// The Raspberry Pi files of `kiln serve`'s config: its images, inventory,
    /// admission policy and kernel arguments.
    pub fn from_config(
        cfg: &crate::config::ServeConfig,
        state: Arc<State>,
        public_url: &str,
        neighbour: fn(IpAddr) -> Option<String>,
    ) -> PiFiles {
        PiFiles {
            images: cfg.images.clone(),
            default_image: cfg.default_image.clone(),
            machines: cfg.machines.clone(),
            admission: cfg.admission,
            state,
            public_url: public_url.to_string(),
            kernel_args: cfg.kernel_args.clone(),
            neighbour,
        }
    }

    /// The machine (MAC if known) and image a request is for; `None` when the
    /// admission policy keeps it out.
    fn whose(&self, client: SocketAddr, serial: Option<&str>) -> Option<(Option<String>, String)> {
        let mac = match serial {
            Some(s) => self.state.mac_of_serial(s).ok().flatten(),
            None => None,
        }
        .or_else(|| (self.neighbour)(client.ip()));
        let entry =
            crate::http::inventory_entry(&self.state, &self.machines, mac.as_deref(), serial)
                .unwrap_or_else(|e| {
                    tracing::error!("tftp: looking the machine up: {e:#}");
                    None
                });
        if !self.admission.admits(entry) {
            return None;
        }
        let image = entry
            .and_then(|m| m.image.clone())
            .unwrap_or_else(|| self.default_image.clone());
        Some((mac, image))
    }

    fn manifest(&self, image: &str) -> Result<Manifest, TftpError> {
        Manifest::load(&self.images.join(image)).map_err(|e| {
            tracing::error!("tftp: image {image}: {e}");
            match e {
                LoadError::Missing(_) => TftpError::not_found(format!("no image {image}")),
                _ => TftpError::other(format!("image {image} has a bad manifest")),
            }
        })
    }
}

impl FileSource for PiFiles {
    fn open(&self, client: SocketAddr, path: &str) -> Result<TftpFile, TftpError> {
        let rel = sanitize_path(path)?;
        let (serial, file) = split_serial(&rel);
        let Some((mac, image)) = self.whose(client, serial.as_deref()) else {
            tracing::info!(%client, serial = serial.as_deref().unwrap_or("-"), "tftp: a Raspberry Pi outside the inventory (allowlist)");
            return Err(TftpError::access_violation("not in the inventory"));
        };
        let boot = self.images.join(&image).join("boot");
        if !boot.is_dir() {
            return Err(TftpError::not_found(format!(
                "image {image} has no Raspberry Pi boot files"
            )));
        }
        let root = RootDir::new(&boot).map_err(|_| TftpError::not_found("no boot files"))?;
        let who = format!(
            "serial {} mac {}",
            serial.as_deref().unwrap_or("-"),
            mac.as_deref().unwrap_or("-")
        );
        let own = |name: &str| match root.open(client, name) {
            Ok(TftpFile::Memory(b)) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
            Ok(TftpFile::File { file, .. }) => std::io::read_to_string(file)
                .map(Some)
                .map_err(|e| TftpError::other(format!("reading {name}: {e}"))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        };
        let rendered = match file {
            "config.txt" => {
                let body = own("config.txt")?.unwrap_or_else(|| DEFAULT_CONFIG_TXT.to_string());
                format!("# kiln: {who} boots {image}\n{body}")
            }
            "cmdline.txt" => {
                if let Some(mac) = &mac {
                    if let Err(e) = self.state.mark_netboot(mac) {
                        tracing::error!("tftp: {e:#}");
                    }
                }
                let console = own("cmdline.txt")?.unwrap_or_default();
                let m = self.manifest(&image)?;
                let args = crate::http::kiln_args(
                    &self.public_url,
                    &image,
                    &m,
                    self.kernel_args.get(&image),
                )
                .map_err(TftpError::not_found)?;
                // cmdline.txt is one line. The image's own kiln.* arguments
                // (an SD card's `kiln.root=PARTUUID=...`) give way to this
                // server's.
                let console = console
                    .split_whitespace()
                    .filter(|w| !w.starts_with("kiln."))
                    .collect::<Vec<_>>()
                    .join(" ");
                format!(
                    "{}{args}\n",
                    if console.is_empty() {
                        String::new()
                    } else {
                        console + " "
                    }
                )
            }
            _ => {
                tracing::debug!(%client, %who, %image, file, "tftp: Raspberry Pi file");
                return root.open(client, file);
            }
        };
        tracing::info!(%client, %who, %image, file, "tftp: Raspberry Pi {file} rendered");
        Ok(TftpFile::Memory(Bytes::from(rendered)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_prefixes() {
        assert_eq!(
            split_serial("e5ef6e9d/start4.elf"),
            (Some("e5ef6e9d".into()), "start4.elf")
        );
        assert_eq!(
            split_serial("E5EF6E9D/overlays/a.dtbo"),
            (Some("e5ef6e9d".into()), "overlays/a.dtbo")
        );
        assert_eq!(split_serial("start4.elf"), (None, "start4.elf"));
        assert_eq!(split_serial("overlays/a.dtbo"), (None, "overlays/a.dtbo"));
        assert_eq!(
            split_serial("e5ef6e9x/start4.elf"),
            (None, "e5ef6e9x/start4.elf")
        );
    }

    #[test]
    fn neighbour_table() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device\n\
                     10.0.0.5         0x1         0x2         DC:A6:32:01:02:03     *        eth0\n\
                     10.0.0.6         0x1         0x0         00:00:00:00:00:00     *        eth0\n";
        let ip = |s: &str| s.parse().unwrap();
        assert_eq!(
            mac_in_arp_table(table, ip("10.0.0.5")).as_deref(),
            Some("dc:a6:32:01:02:03")
        );
        assert_eq!(mac_in_arp_table(table, ip("10.0.0.6")), None);
        assert_eq!(mac_in_arp_table(table, ip("10.0.0.7")), None);
    }

    fn read(f: TftpFile) -> Vec<u8> {
        match f {
            TftpFile::Memory(b) => b.to_vec(),
            TftpFile::File { file, .. } => {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut &file, &mut v).unwrap();
                v
            }
        }
    }

    fn image(dir: &std::path::Path, name: &str, config: Option<&str>) {
        let boot = dir.join(name).join("boot");
        std::fs::create_dir_all(boot.join("overlays")).unwrap();
        for f in [
            "start4.elf",
            "fixup4.dat",
            "bcm2711-rpi-4-b.dtb",
            "vmlinuz",
            "initrd.img",
        ] {
            std::fs::write(boot.join(f), format!("{name} {f}")).unwrap();
        }
        std::fs::write(boot.join("overlays/vc4-kms-v3d.dtbo"), "overlay").unwrap();
        std::fs::write(
            boot.join("cmdline.txt"),
            "console=serial0,115200\n console=tty1 kiln.root=PARTUUID=0badcafe-02 rootwait\n",
        )
        .unwrap();
        if let Some(c) = config {
            std::fs::write(boot.join("config.txt"), c).unwrap();
        }
        let m = serde_json::json!({
            "name": name, "arch": "aarch64", "kiln_version": "0", "spec_sha256": "00", "source_date_epoch": 0,
            "kernel": {"package": "linux-image-arm64", "version": "6.12.0"}, "k3s": null,
            "artifacts": [{"name": "rootfs.squashfs", "sha256": "ab".repeat(32), "size": 1}],
            "packages": []
        });
        std::fs::write(dir.join(name).join("manifest.json"), m.to_string()).unwrap();
    }

    #[test]
    fn pis_get_their_images_files_and_rendered_config() {
        let d = tempfile::tempdir().unwrap();
        image(d.path(), "rpi4", None);
        image(
            d.path(),
            "rpi4-gpu",
            Some("arm_64bit=1\ndtoverlay=vc4-kms-v3d\n"),
        );
        let state = Arc::new(State::in_memory().unwrap());
        // What the DHCP server records from the Pi's option 97.
        state
            .record_identity("dc:a6:32:00:00:02", "rpi4", Some("00000002"), None, 1)
            .unwrap();
        let machine = |serial: &str, image: &str| Machine {
            serial: Some(serial.into()),
            image: Some(image.into()),
            ..Machine::default()
        };
        let pi = PiFiles {
            images: d.path().to_path_buf(),
            default_image: "rpi4".into(),
            machines: vec![machine("00000002", "rpi4-gpu")],
            admission: crate::config::Admission::Auto,
            state,
            public_url: "http://10.0.0.1:8080/".into(),
            kernel_args: [("rpi4-gpu".to_string(), "quiet".to_string())].into(),
            neighbour: |ip| (ip.to_string() == "10.0.0.9").then(|| "dc:a6:32:00:00:09".into()),
        };
        let client: SocketAddr = "10.0.0.9:49152".parse().unwrap();
        let get = |p: &str| pi.open(client, p).map(read);
        let text = |p: &str| String::from_utf8(get(p).unwrap()).unwrap();

        // An unknown Pi, with and without its prefix: the default image.
        assert_eq!(get("00000001/start4.elf").unwrap(), b"rpi4 start4.elf");
        assert_eq!(
            get("/bcm2711-rpi-4-b.dtb").unwrap(),
            b"rpi4 bcm2711-rpi-4-b.dtb"
        );
        assert_eq!(
            get("00000001/overlays/vc4-kms-v3d.dtbo").unwrap(),
            b"overlay"
        );
        assert_eq!(
            text("00000001/config.txt"),
            format!(
                "# kiln: serial 00000001 mac dc:a6:32:00:00:09 boots rpi4\n{DEFAULT_CONFIG_TXT}"
            )
        );
        assert_eq!(
            text("00000001/cmdline.txt"),
            format!(
                "console=serial0,115200 console=tty1 rootwait kiln.root=http://10.0.0.1:8080/images/rpi4/rootfs.squashfs \
                 kiln.root_sha256={} kiln.server=http://10.0.0.1:8080\n",
                "ab".repeat(32)
            )
        );
        // The inventory's Pi (by serial): its image, its config, its args.
        assert_eq!(get("00000002/start4.elf").unwrap(), b"rpi4-gpu start4.elf");
        let config = text("00000002/config.txt");
        assert!(
            config.starts_with("# kiln: serial 00000002 mac dc:a6:32:00:00:02 boots rpi4-gpu\n"),
            "{config}"
        );
        assert!(config.ends_with("dtoverlay=vc4-kms-v3d\n"), "{config}");
        let cmdline = text("00000002/cmdline.txt");
        assert!(
            cmdline.contains("/images/rpi4-gpu/rootfs.squashfs") && cmdline.ends_with(" quiet\n"),
            "{cmdline}"
        );

        // Missing files and escapes.
        assert!(get("00000001/start.elf").unwrap_err().is_not_found());
        for bad in [
            "00000001/../rpi4-gpu/boot/start4.elf",
            "../rpi4/manifest.json",
            "00000001/../../x",
        ] {
            let e = get(bad).unwrap_err();
            assert_eq!(
                e.code,
                crate::tftp::packet::ErrorCode::AccessViolation,
                "{bad}"
            );
        }
        // Under allowlist, only the inventory's Pi gets files.
        let strict = PiFiles {
            admission: crate::config::Admission::Allowlist,
            ..pi
        };
        let e = strict
            .open(client, "00000001/start4.elf")
            .map(read)
            .unwrap_err();
        assert_eq!(e.code, crate::tftp::packet::ErrorCode::AccessViolation);
        assert_eq!(
            read(strict.open(client, "00000002/start4.elf").unwrap()),
            b"rpi4-gpu start4.elf"
        );
        let pi = PiFiles {
            admission: crate::config::Admission::Auto,
            ..strict
        };
        // An image without boot files (a PC image): a clear not-found.
        std::fs::create_dir_all(d.path().join("pxe")).unwrap();
        let pc = PiFiles {
            default_image: "pxe".into(),
            ..pi
        };
        let e = pc
            .open(client, "00000001/start4.elf")
            .map(read)
            .unwrap_err();
        assert!(
            e.message
                .contains("image pxe has no Raspberry Pi boot files"),
            "{e}"
        );
    }
}
