//! The build pipeline: a readable sequence of named stages (DESIGN.md, "Data
//! flow of a build"). Each stage is a function; `build` runs them in order and
//! times them.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::info;

use crate::debian::{self, Package};
use crate::fetch::Fetcher;
use crate::k3s::{self, K3sBinary};
use crate::manifest::{AirgapInfo, Artifact, K3sInfo, Kernel, Manifest, PackageInfo};
use crate::modules::{self, ModuleIndex};
use crate::output::OutputDir;
use crate::spec::{Output, Spec, SquashfsCompression};
use crate::tree::{Entry, Kind, Tree};
use crate::{boot, cpio, deb, disk, diskfmt, overlay, sdcard, squashfs};

/// The fixed SOURCE_DATE_EPOCH used when neither the environment nor the spec
/// gives one (2025-01-01T00:00:00Z). It is recorded in the manifest.
pub const DEFAULT_SOURCE_DATE_EPOCH: u64 = 1_735_689_600;

/// Paths dropped from every root: documentation a node never reads.
/// Copyright files stay (usr/share/doc/*/copyright).
const DROPPED: &[&str] = &[
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "boot",
];

/// Options of one build.
pub struct BuildOptions {
    /// Parent of the image directory (`out/` by default): the image lands in `<out>/<name>/`.
    pub out: PathBuf,
    pub fetcher: Fetcher,
}

/// What a build made.
#[derive(Debug)]
pub struct BuildReport {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub stages: Vec<(&'static str, Duration)>,
    /// Uncompressed size of the root tree's file contents.
    pub root_bytes: u64,
    pub root_entries: usize,
}

/// Everything fetched and verified for a build.
struct Sources {
    packages: Vec<(Package, PathBuf)>,
    k3s: Option<K3sBinary>,
}

/// The root tree plus what the later stages need to know about it.
struct Root {
    tree: Tree,
    kernel_version: String,
    vmlinuz: Vec<u8>,
    modules: ModuleIndex,
}

/// Runs a build of `spec`.
pub fn build(spec: &Spec, opts: &BuildOptions) -> Result<BuildReport> {
    let mut stages = Vec::new();
    let mut timed = |name: &'static str, t: Instant| {
        let d = t.elapsed();
        info!(stage = name, seconds = d.as_secs_f64(), "stage done");
        stages.push((name, d));
    };
    let epoch = source_date_epoch(spec)?;

    let t = Instant::now();
    let sources = fetch_sources(spec, &opts.fetcher)?;
    timed("sources", t);

    let t = Instant::now();
    let root = assemble_root(spec, &sources)?;
    timed("root", t);

    let t = Instant::now();
    let initramfs = assemble_initramfs(spec, &root)?;
    timed("initramfs", t);

    let t = Instant::now();
    let out = OutputDir::create(&opts.out, &spec.name)?;
    let mut artifacts = Vec::new();
    // Every output starts from the same kernel, initramfs and root squashfs:
    // they are written once, and left out again when "pxe" is not asked for.
    let pxe = emit_pxe(
        spec,
        &root,
        &initramfs,
        epoch,
        out.path(),
        opts.fetcher.cache().root(),
    )?;
    if spec.outputs.contains(&Output::Sdcard) {
        artifacts.push(emit_sdcard(spec, &root, epoch, out.path())?);
    }
    if spec.outputs.iter().any(|o| o.needs_disk()) {
        artifacts.extend(emit_disk(spec, &root, epoch, out.path())?);
    }
    if spec.outputs.contains(&Output::Pxe) {
        artifacts.extend(pxe);
    } else {
        for a in &pxe {
            let p = out.path().join(&a.name);
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    artifacts.sort_by(|a, b| a.name.cmp(&b.name));
    timed("emit", t);

    let manifest = Manifest {
        name: spec.name.clone(),
        arch: spec.arch.to_string(),
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        spec_sha256: spec.sha256.clone(),
        source_date_epoch: epoch,
        kernel: Kernel {
            package: spec.debian.kernel.clone(),
            version: root.kernel_version.clone(),
        },
        k3s: sources.k3s.as_ref().map(|k| K3sInfo {
            version: k.version.clone(),
            sha256: k.sha256.clone(),
            source: k.source.clone(),
            airgap_images: k
                .airgap
                .iter()
                .map(|a| AirgapInfo {
                    name: a.name.clone(),
                    sha256: a.sha256.clone(),
                    source: a.source.clone(),
                })
                .collect(),
        }),
        artifacts,
        packages: sources
            .packages
            .iter()
            .map(|(p, _)| PackageInfo {
                name: p.name.clone(),
                version: p.version.to_string(),
                architecture: p.architecture.clone(),
                sha256: p.sha256.clone(),
                size: p.size,
            })
            .collect(),
        platform: spec.platform.clone(),
    };
    manifest.save(out.path())?;
    let dir = out
        .commit()
        .with_context(|| format!("publishing the image {}", spec.name))?;
    Ok(BuildReport {
        dir,
        manifest,
        stages,
        root_bytes: root.tree.content_size(),
        root_entries: root.tree.len(),
    })
}

/// SOURCE_DATE_EPOCH from the environment, else the spec, else the default.
fn source_date_epoch(spec: &Spec) -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
        _ => Ok(spec.source_date_epoch.unwrap_or(DEFAULT_SOURCE_DATE_EPOCH)),
    }
}

/// Stage "sources": Debian packages (signature, indexes, closure, .debs) and k3s.
fn fetch_sources(spec: &Spec, fetcher: &Fetcher) -> Result<Sources> {
    let d = &spec.debian;
    let mut repos = debian::sources_for_suites(&d.suites, &d.components, &d.keyring)
        .context("choosing the Debian mirrors")?;
    repos.extend(d.repositories.iter().cloned());
    let indexes = debian::Indexes::locate(fetcher, &repos, spec.arch.debian())
        .context("verifying the Debian suites")?;
    let mut wanted = d.packages.clone();
    wanted.push(d.kernel.clone());
    if !wanted.iter().any(|p| p == "busybox-static") {
        // The initramfs and the root's init are busybox scripts.
        wanted.push("busybox-static".into());
    }
    let closure = indexes.resolve_cached(fetcher, &wanted, &d.exclude)?;
    let packages = debian::download(fetcher, &closure).context("downloading packages")?;
    let k3s = match &spec.k3s {
        Some(k) => Some(k3s::fetch(fetcher, k, spec.arch)?),
        None => None,
    };
    Ok(Sources { packages, k3s })
}

fn template_vars(spec: &Spec, kernel_version: &str, k3s: Option<&K3sBinary>) -> tera::Context {
    let mut vars = tera::Context::new();
    for (k, v) in &spec.variables {
        vars.insert(k.as_str(), v);
    }
    vars.insert("name", &spec.name);
    vars.insert("arch", spec.arch.as_str());
    vars.insert("debian_arch", spec.arch.debian());
    vars.insert("kernel_version", kernel_version);
    vars.insert(
        "k3s_version",
        &k3s.map(|k| k.version.clone()).unwrap_or_default(),
    );
    vars
}

/// Stage "root": unpack the packages over merged-/usr links, prepare the kernel
/// modules, lay the base and user overlays and k3s.
fn assemble_root(spec: &Spec, sources: &Sources) -> Result<Root> {
    let mut tree = Tree::new();
    deb::merged_usr_links(&mut tree, spec.arch.debian())?;
    let bar = crate::progress::bar(sources.packages.len() as u64, "unpacking");
    for (pkg, path) in &sources.packages {
        bar.set_message(pkg.name.clone());
        deb::unpack_deb(path, &pkg.name, &mut tree)
            .with_context(|| format!("unpacking {} {}", pkg.name, pkg.version))?;
        bar.inc(1);
    }
    bar.finish_and_clear();

    let (kernel_version, vmlinuz_path) = find_kernel(&tree, &spec.debian.kernel)?;
    let vmlinuz = tree
        .read(&vmlinuz_path)
        .with_context(|| {
            format!(
                "the kernel package {} has no /{vmlinuz_path}",
                spec.debian.kernel
            )
        })?
        .to_vec();
    // The kernel is an artifact of its own, not a file of the root.
    tree.remove(&vmlinuz_path)?;
    for kver in modules::kernel_versions(&tree) {
        if kver != kernel_version {
            bail!(
                "the root holds modules of two kernels ({kver} and {kernel_version}); list only one kernel package"
            );
        }
    }
    let modules = modules::prepare(&mut tree, &kernel_version)
        .with_context(|| format!("preparing the modules of kernel {kernel_version}"))?;

    for path in DROPPED {
        tree.remove(path)?;
    }
    let docs: Vec<String> = tree
        .walk("usr/share/doc")
        .filter(|(p, e)| !e.is_dir() && !p.ends_with("/copyright"))
        .map(|(p, _)| p.to_string())
        .collect();
    for p in docs {
        tree.remove(&p)?;
    }

    for dir in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var/lib/rancher",
        "var/lib/kiln",
        "etc/rancher/k3s",
    ] {
        tree.mkdir_p(dir)?;
    }
    tree.insert("tmp", Entry::dir(0o1777))?;
    if tree.get("usr/bin/sh").is_none() {
        // dash's postinst would make /bin/sh; the root has busybox instead.
        tree.insert("usr/bin/sh", Entry::symlink("busybox"))?;
    }
    boot::lay_base(&mut tree)?;
    if let Some(k) = &sources.k3s {
        let bytes = std::fs::read(&k.path)
            .with_context(|| format!("reading the k3s binary {}", k.path.display()))?;
        // What goes into the image is what was verified: the file may have
        // changed since k3s::fetch checked it.
        let got = crate::sha256_hex(&bytes);
        if got != k.sha256 {
            bail!(
                "k3s binary {} changed after it was verified (sha256 {got}, expected {})",
                k.path.display(),
                k.sha256
            );
        }
        tree.insert("usr/local/bin/k3s", Entry::file(bytes, 0o755))?;
        k3s::lay_airgap(&mut tree, &k.airgap)?;
    }
    crate::platform::lay(&mut tree, &spec.platform)?;
    let vars = template_vars(spec, &kernel_version, sources.k3s.as_ref());
    for dir in &spec.overlays {
        overlay::lay(dir, &mut tree, &vars)
            .with_context(|| format!("laying overlay {}", dir.display()))?;
    }
    Ok(Root {
        tree,
        kernel_version,
        vmlinuz,
        modules,
    })
}

/// The kernel version and the kernel's path in the root: Debian's kernel
/// packages up to 6.12 (trixie) install /boot/vmlinuz-<version>, newer ones
/// (trixie-backports) /usr/lib/modules/<version>/vmlinuz.
fn find_kernel(tree: &Tree, package: &str) -> Result<(String, String)> {
    let is_file = |e: &Entry| matches!(e.kind, Kind::File(_));
    let mut found: Vec<(String, String)> = tree
        .walk("boot")
        .filter(|(_, e)| is_file(e))
        .filter_map(|(p, _)| {
            p.strip_prefix("boot/vmlinuz-")
                .map(|v| (v.to_string(), p.to_string()))
        })
        .collect();
    found.extend(
        tree.walk("usr/lib/modules")
            .filter(|(_, e)| is_file(e))
            .filter_map(|(p, _)| {
                let v = p
                    .strip_prefix("usr/lib/modules/")?
                    .strip_suffix("/vmlinuz")?;
                (!v.contains('/')).then(|| (v.to_string(), p.to_string()))
            }),
    );
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no /boot/vmlinuz-* or /usr/lib/modules/*/vmlinuz in the root: is {package} a kernel package?"
        ),
        many => bail!(
            "several kernels in the root ({}); list only one kernel package",
            many.iter()
                .map(|(v, _)| v.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Stage "initramfs": busybox, /init, the boot library and the modules the
/// spec lists (with their dependencies).
fn assemble_initramfs(spec: &Spec, root: &Root) -> Result<Tree> {
    let mut t = Tree::new();
    for d in ["bin", "dev", "proc", "sys", "run", "tmp", "newroot"] {
        t.mkdir_p(d)?;
    }
    t.insert("dev/console", Entry::char_device(5, 1, 0o600))?;
    t.insert("dev/null", Entry::char_device(1, 3, 0o666))?;
    let busybox = root
        .tree
        .read("usr/bin/busybox")
        .context("the root has no /usr/bin/busybox (busybox-static)")?;
    t.insert("bin/busybox", Entry::file(busybox.clone(), 0o755))?;
    t.insert("bin/sh", Entry::symlink("busybox"))?;

    let mut names: Vec<&str> = spec.initramfs.modules.iter().map(String::as_str).collect();
    for dir in &spec.initramfs.module_dirs {
        names.extend(root.modules.names_under(dir));
    }
    let paths = root
        .modules
        .closure(&names)
        .context("choosing the initramfs modules")?;
    modules::copy_subset(
        &root.tree,
        &root.kernel_version,
        &root.modules,
        &paths,
        &mut t,
    )
    .context("copying modules into the initramfs")?;

    let mut vars = template_vars(spec, &root.kernel_version, None);
    vars.insert("modules", &spec.initramfs.modules);
    let init = overlay::render(
        Path::new("overlays/initramfs/init.tera"),
        boot::INITRAMFS_INIT.as_bytes(),
        &vars,
    )?;
    t.insert("init", Entry::file(init.into_bytes(), 0o755))?;
    boot::lay_initramfs_shared(&mut t)?;
    Ok(t)
}

/// Output "pxe": vmlinuz, initrd.img, rootfs.squashfs.
fn emit_pxe(
    spec: &Spec,
    root: &Root,
    initramfs: &Tree,
    epoch: u64,
    dir: &Path,
    cache_root: &Path,
) -> Result<Vec<Artifact>> {
    let mtime =
        u32::try_from(epoch).context("SOURCE_DATE_EPOCH does not fit squashfs' 32-bit times")?;
    let comp = match spec.squashfs_compression {
        SquashfsCompression::Zstd => squashfs::Compression::Zstd,
        SquashfsCompression::Xz => squashfs::Compression::Xz,
        SquashfsCompression::Gzip => squashfs::Compression::Gzip,
    };
    let block_cache = cache_root
        .join("squashfs")
        .join(format!("{}.blocks", spec.name));
    let (sq, ird) = rayon::join(
        || -> Result<()> {
            let spin = crate::progress::spinner("compressing rootfs.squashfs");
            let path = dir.join("rootfs.squashfs");
            let mut f = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            squashfs::write_squashfs_cached(&root.tree, mtime, &mut f, comp, &block_cache)
                .context("writing rootfs.squashfs")?;
            f.sync_all().context("syncing rootfs.squashfs")?;
            spin.finish_and_clear();
            Ok(())
        },
        || -> Result<()> {
            let path = dir.join("initrd.img");
            let f = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            let mut w = BufWriter::new(f);
            cpio::write_initramfs(initramfs, mtime, &mut w).context("writing initrd.img")?;
            w.flush().context("writing initrd.img")?;
            Ok(())
        },
    );
    sq?;
    ird?;
    std::fs::write(dir.join("vmlinuz"), &root.vmlinuz).context("writing vmlinuz")?;
    ["vmlinuz", "initrd.img", "rootfs.squashfs"]
        .iter()
        .map(|n| artifact(dir, n))
        .collect()
}

/// Output "sdcard": sdcard.img (see `sdcard`) from the root, vmlinuz,
/// initrd.img and rootfs.squashfs already in `dir`.
fn emit_sdcard(spec: &Spec, root: &Root, epoch: u64, dir: &Path) -> Result<Artifact> {
    let spin = crate::progress::spinner("writing sdcard.img");
    let disk_id = sdcard::disk_id(&spec.name);
    let initrd = std::fs::read(dir.join("initrd.img")).context("reading initrd.img")?;
    let boot = sdcard::boot_files(
        &root.tree,
        &root.kernel_version,
        root.vmlinuz.as_slice().into(),
        initrd.into(),
        &sdcard::cmdline_txt(disk_id, &[]),
    )?;
    sdcard::write(
        &dir.join("sdcard.img"),
        &sdcard::Card {
            disk_id,
            volume_id: sdcard::volume_id(&spec.name),
            epoch,
            boot: &boot,
            rootfs: &dir.join("rootfs.squashfs"),
        },
    )
    .context("writing sdcard.img")?;
    spin.finish_and_clear();
    artifact(dir, "sdcard.img")
}

/// Output "disk": disk.raw (see `disk`) from the root, vmlinuz, initrd.img
/// and rootfs.squashfs already in `dir`.
fn emit_disk(spec: &Spec, root: &Root, epoch: u64, dir: &Path) -> Result<Vec<Artifact>> {
    let spin = crate::progress::spinner("writing disk.raw");
    let initrd = std::fs::read(dir.join("initrd.img")).context("reading initrd.img")?;
    let esp = disk::esp_files(
        &root.tree,
        spec.arch,
        &spec.name,
        epoch,
        root.vmlinuz.as_slice().into(),
        initrd.into(),
    )?;
    disk::write(
        &dir.join("disk.raw"),
        &disk::Disk {
            image: &spec.name,
            arch: spec.arch,
            epoch,
            esp: &esp,
            rootfs: &dir.join("rootfs.squashfs"),
        },
    )
    .context("writing disk.raw")?;
    spin.finish_and_clear();
    let raw = dir.join("disk.raw");
    let mut made = Vec::new();
    for o in &spec.outputs {
        let name = match o {
            Output::Qcow2 => "disk.qcow2",
            Output::Vhd => "disk.vhd",
            Output::Gce => "disk.gce.tar.gz",
            _ => continue,
        };
        let spin = crate::progress::spinner(&format!("writing {name}"));
        let to = dir.join(name);
        match o {
            Output::Qcow2 => diskfmt::write_qcow2(&raw, &to)?,
            Output::Vhd => diskfmt::write_vhd_fixed(&raw, &to, &spec.name, epoch)?,
            _ => diskfmt::write_gce_tarball(&raw, &to, epoch)?,
        }
        spin.finish_and_clear();
        made.push(artifact(dir, name)?);
    }
    if spec.outputs.contains(&Output::Disk) {
        made.push(artifact(dir, "disk.raw")?);
    } else {
        std::fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
    }
    Ok(made)
}

fn artifact(dir: &Path, name: &str) -> Result<Artifact> {
    let path = dir.join(name);
    let (sha256, size) = crate::hash_file(&path)?;
    Ok(Artifact {
        name: name.to_string(),
        sha256,
        size,
    })
}

/// The closing summary of a build.
pub fn summary(r: &BuildReport) -> String {
    use std::fmt::Write as _;
    let m = &r.manifest;
    let mut s = String::new();
    let _ = writeln!(s, "built {} ({}) in {}", m.name, m.arch, r.dir.display());
    let _ = writeln!(s, "  kernel  {}", m.kernel.version);
    if let Some(k) = &m.k3s {
        let _ = writeln!(s, "  k3s     {}", k.version);
    }
    let _ = writeln!(
        s,
        "  root    {} packages, {} entries, {:.1} MiB uncompressed",
        m.packages.len(),
        r.root_entries,
        r.root_bytes as f64 / 1048576.0
    );
    for a in &m.artifacts {
        let _ = writeln!(
            s,
            "  {:<16} {:>8.1} MiB  sha256 {}",
            a.name,
            a.size as f64 / 1048576.0,
            a.sha256
        );
    }
    let total: Duration = r.stages.iter().map(|(_, d)| *d).sum();
    let stages: Vec<String> = r
        .stages
        .iter()
        .map(|(n, d)| format!("{n} {:.1}s", d.as_secs_f64()))
        .collect();
    let _ = writeln!(
        s,
        "  time    {:.1}s ({})",
        total.as_secs_f64(),
        stages.join(", ")
    );
    s
}
