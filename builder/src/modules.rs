//! Kernel modules: decompress them, read their `.modinfo`, and write the
//! dependency and alias files that the package's postinst (`depmod`) would
//! have written.
//!
//! Debian kernels ship `lib/modules/<kver>/kernel/**/*.ko.xz` (other builds
//! use `.ko.zst`, `.ko.gz` or plain `.ko`) and no `modules.dep`. [`prepare`]
//! turns every module into a plain `.ko` — decompressed in parallel, as a
//! generic kernel has thousands — and writes, next to them:
//!
//! - `modules.dep`: `kernel/a/x.ko: kernel/b/y.ko kernel/c/z.ko` — each
//!   module's full transitive dependencies, ordered as depmod orders them: a
//!   dependency that needs other listed ones comes before them, so the module
//!   to load last comes first and the list is loaded from its end;
//! - `modules.alias`: `alias <pattern> <module name>`;
//! - `modules.softdep`: `softdep <module name> pre: ... post: ...`, only when
//!   a module declares a soft dependency.
//!
//! `modules.builtin`, `modules.builtin.modinfo` and `modules.order` shipped in
//! the package are kept as they are. [`prepare_with`] can instead leave the
//! module files compressed ([`ModuleFiles::KeepCompressed`]): decompressing a
//! generic kernel's modules quadruples their size, and the root image pays
//! for that in build time (figures on [`ModuleFiles`]).
//!
//! **The text files are the contract.** The image loads modules with busybox
//! `modprobe`, which reads `modules.dep`, `modules.alias` and
//! `modules.softdep` as text. kmod's `modprobe` reads only the binary indexes
//! (`modules.dep.bin`, `modules.alias.bin`, ...), which are not written here;
//! stale ones found in the tree are removed so that kmod cannot read an index
//! that disagrees with the modules. Also not written: `modules.symbols`,
//! `modules.devname` and `modules.weakdep`, which busybox does not read.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;

use crate::tree::{Content, Entry, Kind, Tree};

/// Compressed module suffixes this module can decompress.
const COMPRESSED: [&str; 3] = [".ko.xz", ".ko.zst", ".ko.gz"];

/// Generated index files that [`prepare`] replaces or removes.
const STALE_INDEXES: [&str; 10] = [
    "modules.dep.bin",
    "modules.alias.bin",
    "modules.softdep",
    "modules.symbols",
    "modules.symbols.bin",
    "modules.builtin.bin",
    "modules.builtin.alias.bin",
    "modules.devname",
    "modules.weakdep",
    "modules.alias",
];

/// Files shipped by the kernel package that are kept and copied along.
const SHIPPED: [&str; 2] = ["modules.builtin", "modules.builtin.modinfo"];

/// One loadable module, as read from its `.modinfo` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Module name: the file stem with `-` replaced by `_` (`nf_tables`).
    pub name: String,
    /// Path relative to `lib/modules/<kver>`, plain `.ko` (`kernel/fs/overlayfs/overlay.ko`).
    pub path: String,
    /// Names of the modules it needs (`depends=`), as the kernel recorded them.
    pub depends: Vec<String>,
    /// `alias=` patterns, in the order they appear.
    pub aliases: Vec<String>,
    /// `softdep=` values (`pre: a b post: c`), in the order they appear.
    pub softdeps: Vec<String>,
}

impl Module {
    /// Reads a module from its path (relative to `lib/modules/<kver>`) and its
    /// `.modinfo` bytes (NUL-separated `key=value` strings).
    pub fn from_modinfo(path: &str, modinfo: &[u8]) -> Module {
        let mut m = Module {
            name: module_name(path),
            path: path.to_string(),
            depends: Vec::new(),
            aliases: Vec::new(),
            softdeps: Vec::new(),
        };
        for (key, value) in parse_modinfo(modinfo) {
            match key {
                "depends" => m.depends.extend(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|d| !d.is_empty())
                        .map(normalize_name),
                ),
                "alias" => m.aliases.push(value.to_string()),
                "softdep" => m.softdeps.push(value.to_string()),
                _ => {}
            }
        }
        m
    }
}

/// Splits a `.modinfo` section into its `key=value` pairs. Strings without
/// `=` and padding NULs are skipped; bytes that are not UTF-8 are replaced.
pub fn parse_modinfo(bytes: &[u8]) -> Vec<(&str, &str)> {
    bytes
        .split(|b| *b == 0)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .filter_map(|s| s.split_once('='))
        .collect()
}

/// The module name for a file name or path: stem without `.ko[.xz|...]`,
/// `-` replaced by `_`, as the kernel and modprobe name modules.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = COMPRESSED
        .iter()
        .chain(&[".ko"])
        .find_map(|s| file.strip_suffix(s))
        .unwrap_or(file);
    normalize_name(stem)
}

fn normalize_name(name: &str) -> String {
    name.replace('-', "_")
}

fn is_module_file(path: &str) -> bool {
    path.ends_with(".ko") || COMPRESSED.iter().any(|s| path.ends_with(s))
}

/// The tree directory holding `lib/modules`, through the merged-/usr link if
/// there is one (`usr/lib/modules`).
fn modules_root(tree: &Tree) -> String {
    tree.resolve("lib/modules", 0)
        .unwrap_or_else(|_| "lib/modules".to_string())
}

/// Kernel versions found in the tree: the directories of `lib/modules` (or
/// `usr/lib/modules`) that hold at least one module, sorted.
pub fn kernel_versions(tree: &Tree) -> Vec<String> {
    let root = modules_root(tree);
    let mut versions = BTreeSet::new();
    for (path, entry) in tree.walk(&root) {
        if matches!(entry.kind, Kind::File(_)) && is_module_file(path) {
            let rest = &path[root.len() + 1..];
            if let Some((kver, _)) = rest.split_once('/') {
                versions.insert(kver.to_string());
            }
        }
    }
    versions.into_iter().collect()
}

/// All modules of one kernel and their relations, for writing the index files
/// and for choosing subsets (the initramfs).
#[derive(Clone, Debug)]
pub struct ModuleIndex {
    kver: String,
    modules: BTreeMap<String, Module>,
    by_path: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
    /// Position of each module in one valid load order (dependencies before
    /// the modules that need them).
    rank: BTreeMap<String, usize>,
}

impl ModuleIndex {
    /// Builds an index from modules and the names of the built-in ones.
    /// Fails on two modules with the same name, on a dependency that is
    /// neither a module nor built in, and on dependency cycles.
    pub fn new(
        kver: &str,
        modules: impl IntoIterator<Item = Module>,
        builtin: impl IntoIterator<Item = String>,
    ) -> Result<ModuleIndex> {
        let builtin: BTreeSet<String> = builtin.into_iter().map(|n| normalize_name(&n)).collect();
        let mut map: BTreeMap<String, Module> = BTreeMap::new();
        for mut m in modules {
            // Built-in modules are loaded already: nothing to list for them.
            m.depends.retain(|d| !builtin.contains(d));
            m.depends.sort();
            m.depends.dedup();
            if let Some(old) = map.get(&m.name) {
                bail!(
                    "two modules are named {}: {} and {}",
                    m.name,
                    old.path,
                    m.path
                );
            }
            map.insert(m.name.clone(), m);
        }
        for m in map.values() {
            for d in &m.depends {
                if !map.contains_key(d) {
                    bail!(
                        "module {} ({}) depends on {d}, which is neither a module in \
                         lib/modules/{kver} nor listed in modules.builtin",
                        m.name,
                        m.path
                    );
                }
            }
        }
        // Kahn's algorithm, taking the smallest ready name first so the order
        // is deterministic.
        let mut missing: BTreeMap<&str, usize> = map
            .values()
            .map(|m| (m.name.as_str(), m.depends.len()))
            .collect();
        let mut users: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for m in map.values() {
            for d in &m.depends {
                users.entry(d.as_str()).or_default().push(&m.name);
            }
        }
        let mut ready: BTreeSet<&str> = missing
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(k, _)| *k)
            .collect();
        let mut rank = BTreeMap::new();
        while let Some(name) = ready.pop_first() {
            rank.insert(name.to_string(), rank.len());
            for user in users.get(name).into_iter().flatten() {
                let n = missing.get_mut(user).expect("user is a module");
                *n -= 1;
                if *n == 0 {
                    ready.insert(user);
                }
            }
        }
        if rank.len() != map.len() {
            let cycle: Vec<&str> = map
                .keys()
                .filter(|k| !rank.contains_key(*k))
                .map(String::as_str)
                .collect();
            bail!(
                "kernel {kver}: modules depend on each other in a cycle: {}",
                cycle.join(", ")
            );
        }
        let by_path = map
            .values()
            .map(|m| (m.path.clone(), m.name.clone()))
            .collect();
        Ok(ModuleIndex {
            kver: kver.to_string(),
            modules: map,
            by_path,
            builtin,
            rank,
        })
    }

    pub fn kver(&self) -> &str {
        &self.kver
    }

    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// A module by name (`-` and `_` are the same).
    pub fn module(&self, name: &str) -> Option<&Module> {
        self.modules.get(&normalize_name(name))
    }

    /// A module by path relative to `lib/modules/<kver>`.
    pub fn module_at(&self, path: &str) -> Option<&Module> {
        self.by_path.get(path).and_then(|n| self.modules.get(n))
    }

    /// Every module, by name.
    pub fn modules(&self) -> impl Iterator<Item = &Module> {
        self.modules.values()
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize_name(name))
    }

    /// Names of the modules whose path is under `dir` (relative to
    /// `lib/modules/<kver>`, e.g. `kernel/drivers/net/ethernet`), sorted by
    /// name. Feed them to [`ModuleIndex::closure`].
    pub fn names_under(&self, dir: &str) -> Vec<&str> {
        let dir = dir.trim_matches('/');
        let prefix = format!("{dir}/");
        self.modules
            .values()
            .filter(|m| dir.is_empty() || m.path.starts_with(&prefix))
            .map(|m| m.name.as_str())
            .collect()
    }

    /// The paths (relative to `lib/modules/<kver>`) of the named modules and
    /// all their dependencies, in an order they can be loaded in: every
    /// module after the ones it needs. Built-in modules are skipped; an
    /// unknown name is an error.
    pub fn closure(&self, names: &[&str]) -> Result<Vec<String>> {
        let mut seen = BTreeSet::new();
        let mut stack = Vec::new();
        for name in names {
            let name = normalize_name(name);
            if self.modules.contains_key(&name) {
                stack.push(name);
            } else if !self.builtin.contains(&name) {
                bail!(
                    "kernel {}: no module named {name} (neither in lib/modules/{} nor in \
                     modules.builtin)",
                    self.kver,
                    self.kver
                );
            }
        }
        while let Some(name) = stack.pop() {
            if seen.insert(name.clone()) {
                stack.extend(self.modules[&name].depends.iter().cloned());
            }
        }
        let mut order: Vec<&String> = seen.iter().collect();
        order.sort_by_key(|n| self.rank[*n]);
        Ok(order
            .into_iter()
            .map(|n| self.modules[n].path.clone())
            .collect())
    }

    /// All dependencies of one module, for its `modules.dep` line: the one to
    /// load last first, the ones everything else needs last (depmod's order;
    /// modprobe loads the list from its end).
    fn dep_line(&self, m: &Module) -> String {
        let mut deps = self
            .closure(&[m.name.as_str()])
            .expect("modules of the index are known");
        deps.retain(|p| p != &m.path);
        deps.reverse();
        let mut line = format!("{}:", m.path);
        for d in deps {
            line.push(' ');
            line.push_str(&d);
        }
        line.push('\n');
        line
    }

    /// The modules sorted by path, as people read the index files.
    fn by_path(&self) -> impl Iterator<Item = &Module> {
        self.by_path.values().map(|n| &self.modules[n])
    }

    /// `modules.dep` text.
    pub fn modules_dep(&self) -> String {
        self.by_path().map(|m| self.dep_line(m)).collect()
    }

    /// `modules.alias` text (`alias <pattern> <module>`).
    pub fn modules_alias(&self) -> String {
        let mut out = String::new();
        for m in self.by_path() {
            for a in &m.aliases {
                out.push_str(&format!("alias {a} {}\n", m.name));
            }
        }
        out
    }

    /// `modules.softdep` text (`softdep <module> pre: ... post: ...`); empty
    /// when no module declares one.
    pub fn modules_softdep(&self) -> String {
        let mut out = String::new();
        for m in self.by_path() {
            for s in &m.softdeps {
                out.push_str(&format!("softdep {} {s}\n", m.name));
            }
        }
        out
    }
}

/// The path of a module once decompressed: `x.ko.xz` -> `x.ko`.
fn plain_path(path: &str) -> String {
    COMPRESSED
        .iter()
        .find_map(|s| path.strip_suffix(s))
        .map_or_else(|| path.to_string(), |stem| format!("{stem}.ko"))
}

/// Decompresses one module file.
fn decompress(path: &str, data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() * 3);
    if path.ends_with(".ko.xz") {
        liblzma::read::XzDecoder::new(data).read_to_end(&mut out)?;
    } else if path.ends_with(".ko.zst") {
        zstd::stream::read::Decoder::new(data)?.read_to_end(&mut out)?;
    } else if path.ends_with(".ko.gz") {
        flate2::read::GzDecoder::new(data).read_to_end(&mut out)?;
    } else {
        out.extend_from_slice(data);
    }
    Ok(out)
}

/// Reads the `.modinfo` section of a module's ELF image.
fn modinfo_of(elf: &[u8]) -> Result<Vec<u8>> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(elf).context("not an ELF object")?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| anyhow!("no .modinfo section"))?;
    Ok(section.data().context("reading .modinfo")?.to_vec())
}

/// Lines of a shipped list file (modules.builtin, modules.order) in the tree.
fn read_lines(tree: &Tree, path: &str) -> Vec<String> {
    tree.read(path)
        .map(|c| {
            String::from_utf8_lossy(c)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// What [`prepare_with`] does with compressed module files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModuleFiles {
    /// Replace each by a plain `.ko`: any modprobe can load it, but a generic
    /// kernel's modules grow about fourfold (Debian 6.12 amd64: 106 MB of
    /// `.ko.xz` become 415 MB), which the root image pays in build time.
    #[default]
    Decompress,
    /// Leave them as shipped; `modules.dep` names the compressed files, as
    /// depmod does. Loading them needs a modprobe that decompresses (busybox
    /// built with FEATURE_SEAMLESS_XZ/ZSTD/GZ, or kmod) or a kernel with
    /// CONFIG_MODULE_DECOMPRESS used through kmod.
    KeepCompressed,
}

/// Prepares the modules of kernel `kver` in `tree`: every compressed module
/// becomes a plain `.ko` at the same path minus the compression suffix, with
/// the same metadata; `modules.dep`, `modules.alias` and (when needed)
/// `modules.softdep` are written; stale binary indexes are removed. Running it
/// again on a prepared tree gives the same tree.
pub fn prepare(tree: &mut Tree, kver: &str) -> Result<ModuleIndex> {
    prepare_with(tree, kver, ModuleFiles::Decompress)
}

/// [`prepare`], choosing whether module files are decompressed in the tree.
/// Either way every module is decompressed in memory to read its `.modinfo`.
pub fn prepare_with(tree: &mut Tree, kver: &str, files: ModuleFiles) -> Result<ModuleIndex> {
    let base = format!("{}/{kver}", modules_root(tree));
    if !tree.get(&base).is_some_and(Entry::is_dir) {
        bail!("kernel {kver}: /{base} is not a directory in the tree");
    }
    let found: Vec<(String, Entry)> = tree
        .walk(&base)
        .filter(|(p, e)| matches!(e.kind, Kind::File(_)) && is_module_file(p))
        .map(|(p, e)| (p.to_string(), e.clone()))
        .collect();

    struct Prepared {
        old: String,
        new: String,
        entry: Entry,
        module: Module,
    }
    let prepared: Vec<Prepared> = found
        .par_iter()
        .map(|(path, entry)| {
            let Kind::File(data) = &entry.kind else {
                unreachable!("filtered on files")
            };
            let rel = &path[base.len() + 1..];
            let plain_rel = plain_path(rel);
            let plain: Content = if rel.ends_with(".ko") {
                data.clone()
            } else {
                decompress(rel, data)
                    .with_context(|| format!("kernel {kver}: decompressing {rel}"))?
                    .into()
            };
            let modinfo =
                modinfo_of(&plain).with_context(|| format!("kernel {kver}: reading {rel}"))?;
            Ok(match files {
                ModuleFiles::Decompress => Prepared {
                    old: path.clone(),
                    new: format!("{base}/{plain_rel}"),
                    entry: Entry {
                        kind: Kind::File(plain),
                        ..entry.clone()
                    },
                    module: Module::from_modinfo(&plain_rel, &modinfo),
                },
                ModuleFiles::KeepCompressed => Prepared {
                    old: path.clone(),
                    new: path.clone(),
                    entry: entry.clone(),
                    module: Module::from_modinfo(rel, &modinfo),
                },
            })
        })
        .collect::<Result<_>>()?;
    drop(found);

    let mut targets: BTreeMap<&str, &str> = BTreeMap::new();
    for p in &prepared {
        if let Some(other) = targets.insert(&p.new, &p.old) {
            bail!(
                "kernel {kver}: both /{other} and /{} would become /{}",
                p.old,
                p.new
            );
        }
    }
    let mut modules = Vec::with_capacity(prepared.len());
    for p in prepared {
        if p.old != p.new {
            tree.remove(&p.old)?;
        }
        tree.insert(&p.new, p.entry)?;
        modules.push(p.module);
    }

    let builtin = read_lines(tree, &format!("{base}/modules.builtin"))
        .iter()
        .map(|l| module_name(l))
        .collect::<Vec<_>>();
    let index = ModuleIndex::new(kver, modules, builtin)?;

    for name in STALE_INDEXES {
        tree.remove(&format!("{base}/{name}"))?;
    }
    write_indexes(tree, &format!("lib/modules/{kver}"), &index)?;
    Ok(index)
}

fn write_indexes(tree: &mut Tree, dir: &str, index: &ModuleIndex) -> Result<()> {
    let text = |s: String| Entry::file(s.into_bytes(), 0o644);
    tree.insert(&format!("{dir}/modules.dep"), text(index.modules_dep()))?;
    tree.insert(&format!("{dir}/modules.alias"), text(index.modules_alias()))?;
    let softdep = index.modules_softdep();
    if !softdep.is_empty() {
        tree.insert(&format!("{dir}/modules.softdep"), text(softdep))?;
    }
    Ok(())
}

/// Copies the modules at `paths` (relative to `lib/modules/<kver>`, as
/// [`ModuleIndex::closure`] gives them) from a prepared tree into `to`,
/// together with whatever they depend on (a module without its dependencies
/// could not be loaded), and writes `modules.dep`, `modules.alias` and
/// `modules.softdep` for exactly that subset. `modules.builtin` and
/// `modules.builtin.modinfo` are copied whole, `modules.order` restricted to
/// the subset. Files land under `lib/modules/<kver>` of `to`, through its
/// links if it has a merged /usr. Modules kept compressed in `from` (see
/// [`ModuleFiles`]) are decompressed into `to`: the initramfs is compressed
/// as a whole, and its modprobe then needs no decompressor.
pub fn copy_subset(
    from: &Tree,
    kver: &str,
    index: &ModuleIndex,
    paths: &[String],
    to: &mut Tree,
) -> Result<()> {
    if index.kver() != kver {
        bail!(
            "the module index is for kernel {}, not {kver}",
            index.kver()
        );
    }
    let names = paths
        .iter()
        .map(|p| {
            index
                .module_at(p)
                .map(|m| m.name.as_str())
                .ok_or_else(|| anyhow!("kernel {kver}: {p} is not a module of the index"))
        })
        .collect::<Result<Vec<_>>>()?;
    let all = index.closure(&names)?;
    let from_base = format!("{}/{kver}", modules_root(from));
    let to_base = format!("lib/modules/{kver}");
    let mut subset = Vec::with_capacity(all.len());
    for path in &all {
        let src = format!("{from_base}/{path}");
        let (entry, content) = match from.get(&src) {
            Some(
                e @ Entry {
                    kind: Kind::File(c),
                    ..
                },
            ) => (e, c),
            _ => bail!("kernel {kver}: /{src} is not in the tree (was prepare() run?)"),
        };
        let plain = plain_path(path);
        let content: Content = if &plain == path {
            content.clone()
        } else {
            decompress(path, content)
                .with_context(|| format!("kernel {kver}: decompressing {path}"))?
                .into()
        };
        to.insert(
            &format!("{to_base}/{plain}"),
            Entry {
                kind: Kind::File(content),
                ..entry.clone()
            },
        )?;
        let module = index.module_at(path).expect("closure paths");
        subset.push(Module {
            path: plain,
            ..module.clone()
        });
    }
    let subset = ModuleIndex::new(kver, subset, index.builtin.iter().cloned())?;
    for name in SHIPPED {
        if let Some(entry) = from.get(&format!("{from_base}/{name}")) {
            to.insert(&format!("{to_base}/{name}"), entry.clone())?;
        }
    }
    let order_path = format!("{from_base}/modules.order");
    if let Some(entry) = from.get(&order_path) {
        let kept: String = read_lines(from, &order_path)
            .into_iter()
            .filter(|l| subset.module(&module_name(l)).is_some())
            .map(|l| l + "\n")
            .collect();
        to.insert(
            &format!("{to_base}/modules.order"),
            Entry {
                kind: Kind::File(kept.into_bytes().into()),
                ..entry.clone()
            },
        )?;
    }
    write_indexes(to, &to_base, &subset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 little-endian relocatable object with one `.modinfo`
    /// section: enough for the `object` crate, and all `prepare` reads.
    pub(crate) fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let modinfo_off = 64u64;
        let shstr_off = modinfo_off + modinfo.len() as u64;
        let sh_off = (shstr_off + shstrtab.len() as u64).div_ceil(8) * 8;
        let mut v = Vec::new();
        v.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&1u16.to_le_bytes()); // ET_REL
        v.extend_from_slice(&62u16.to_le_bytes()); // x86-64
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes()); // entry
        v.extend_from_slice(&0u64.to_le_bytes()); // phoff
        v.extend_from_slice(&sh_off.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes()); // flags
        for x in [64u16, 0, 0, 64, 3, 2] {
            // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
            v.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(v.len(), 64);
        v.extend_from_slice(modinfo);
        v.extend_from_slice(shstrtab);
        v.resize(sh_off as usize, 0);
        let section = |v: &mut Vec<u8>, name: u32, ty: u32, off: u64, size: u64| {
            v.extend_from_slice(&name.to_le_bytes());
            v.extend_from_slice(&ty.to_le_bytes());
            v.extend_from_slice(&0u64.to_le_bytes()); // flags
            v.extend_from_slice(&0u64.to_le_bytes()); // addr
            v.extend_from_slice(&off.to_le_bytes());
            v.extend_from_slice(&size.to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes()); // link
            v.extend_from_slice(&0u32.to_le_bytes()); // info
            v.extend_from_slice(&1u64.to_le_bytes()); // addralign
            v.extend_from_slice(&0u64.to_le_bytes()); // entsize
        };
        section(&mut v, 0, 0, 0, 0);
        section(&mut v, 1, 1, modinfo_off, modinfo.len() as u64);
        section(&mut v, 10, 3, shstr_off, shstrtab.len() as u64);
        v
    }

    fn modinfo(pairs: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in pairs {
            v.extend_from_slice(p.as_bytes());
            v.push(0);
        }
        v.extend_from_slice(&[0, 0, 0]); // section padding
        v
    }

    fn m(name: &str, depends: &[&str]) -> Module {
        Module {
            name: name.into(),
            path: format!("kernel/x/{name}.ko"),
            depends: depends.iter().map(|d| d.to_string()).collect(),
            aliases: vec![],
            softdeps: vec![],
        }
    }

    #[test]
    fn modinfo_is_parsed() {
        let bytes = modinfo(&[
            "license=GPL",
            "alias=pci:v00008086d*sv*sd*bc*sc*i*",
            "alias=fs-overlay",
            "depends=crc32c_generic,libcrc32c-x",
            "softdep=pre: crc32c",
            "name=overlay",
            "vermagic=6.12.0 SMP mod_unload",
        ]);
        let pairs = parse_modinfo(&bytes);
        assert_eq!(pairs[0], ("license", "GPL"));
        let m = Module::from_modinfo("kernel/fs/overlayfs/overlay.ko", &bytes);
        assert_eq!(m.name, "overlay");
        assert_eq!(m.depends, ["crc32c_generic", "libcrc32c_x"]);
        assert_eq!(m.aliases.len(), 2);
        assert_eq!(m.softdeps, ["pre: crc32c"]);
        assert!(Module::from_modinfo("a.ko", b"depends=\0")
            .depends
            .is_empty());
        assert_eq!(module_name("kernel/net/nf-tables.ko.xz"), "nf_tables");
    }

    #[test]
    fn dependencies_are_listed_as_depmod_does() {
        // a -> b, c; b -> d; c -> d, b; e alone; builtin f is skipped.
        let idx = ModuleIndex::new(
            "k",
            vec![
                m("a", &["b", "c"]),
                m("b", &["d"]),
                m("c", &["d", "b", "f"]),
                m("d", &[]),
                m("e", &[]),
            ],
            vec!["f".to_string()],
        )
        .unwrap();
        let dep = idx.modules_dep();
        assert_eq!(
            dep,
            "kernel/x/a.ko: kernel/x/c.ko kernel/x/b.ko kernel/x/d.ko\n\
             kernel/x/b.ko: kernel/x/d.ko\n\
             kernel/x/c.ko: kernel/x/b.ko kernel/x/d.ko\n\
             kernel/x/d.ko:\n\
             kernel/x/e.ko:\n"
        );
        // Loading each line from its end (busybox and kmod both do) never
        // loads a module before its dependencies.
        for line in dep.lines() {
            let (_, deps) = line.split_once(':').unwrap();
            let mut loaded: BTreeSet<String> = BTreeSet::new();
            for d in deps.split_whitespace().rev() {
                let module = idx.module_at(d).unwrap();
                assert!(module.depends.iter().all(|x| loaded.contains(x)), "{line}");
                loaded.insert(module.name.clone());
            }
        }
        assert_eq!(
            idx.closure(&["a", "f"]).unwrap(),
            [
                "kernel/x/d.ko",
                "kernel/x/b.ko",
                "kernel/x/c.ko",
                "kernel/x/a.ko"
            ]
        );
        let err = idx.closure(&["nope"]).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        assert_eq!(idx.names_under("kernel/x/"), ["a", "b", "c", "d", "e"]);
        assert!(idx.names_under("kernel/xy").is_empty());
    }

    #[test]
    fn cycles_and_unknown_dependencies_are_errors() {
        let err = ModuleIndex::new("k", vec![m("a", &["b"]), m("b", &["a"]), m("c", &[])], [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cycle") && err.contains("a, b"), "{err}");
        let err = ModuleIndex::new("k", vec![m("a", &["zz"])], [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("zz"), "{err}");
    }

    fn kernel_tree() -> Tree {
        let mut t = Tree::new();
        crate::deb::merged_usr_links(&mut t, "amd64").unwrap();
        let k = "lib/modules/6.12.0-1-amd64";
        let put = |t: &mut Tree, path: &str, data: Vec<u8>| {
            t.insert(&format!("{k}/{path}"), Entry::file(data, 0o644))
                .unwrap();
        };
        let overlay = fake_module(&modinfo(&["alias=fs-overlay", "depends=", "name=overlay"]));
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
        std::io::Write::write_all(&mut xz, &overlay).unwrap();
        put(
            &mut t,
            "kernel/fs/overlayfs/overlay.ko.xz",
            xz.finish().unwrap(),
        );
        let libcrc = fake_module(&modinfo(&["depends=", "softdep=pre: crc32c"]));
        put(
            &mut t,
            "kernel/lib/libcrc32c.ko.zst",
            zstd::encode_all(&libcrc[..], 3).unwrap(),
        );
        let nf = fake_module(&modinfo(&[
            "alias=nft-set",
            "alias=nfnetlink-subsys-10",
            "depends=libcrc32c,nfnetlink",
        ]));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &nf).unwrap();
        put(
            &mut t,
            "kernel/net/netfilter/nf_tables.ko.gz",
            gz.finish().unwrap(),
        );
        put(
            &mut t,
            "kernel/net/netfilter/nfnetlink.ko",
            fake_module(&modinfo(&["depends="])),
        );
        put(
            &mut t,
            "modules.builtin",
            b"kernel/fs/ext4/ext4.ko\n".to_vec(),
        );
        put(
            &mut t,
            "modules.order",
            b"kernel/lib/libcrc32c.ko\nkernel/net/netfilter/nfnetlink.ko\n\
              kernel/net/netfilter/nf_tables.ko\nkernel/fs/overlayfs/overlay.ko\n"
                .to_vec(),
        );
        put(&mut t, "modules.dep.bin", b"stale".to_vec());
        t
    }

    #[test]
    fn prepare_decompresses_and_writes_indexes() {
        let mut t = kernel_tree();
        assert_eq!(kernel_versions(&t), ["6.12.0-1-amd64"]);
        let idx = prepare(&mut t, "6.12.0-1-amd64").unwrap();
        assert_eq!(idx.len(), 4);
        let base = "usr/lib/modules/6.12.0-1-amd64";
        let paths: Vec<&str> = t.walk(base).map(|(p, _)| p).collect();
        assert!(!paths
            .iter()
            .any(|p| p.ends_with(".xz") || p.ends_with(".gz")));
        assert!(!paths.iter().any(|p| p.ends_with(".bin")), "{paths:?}");
        let overlay = t
            .read(&format!("{base}/kernel/fs/overlayfs/overlay.ko"))
            .unwrap();
        assert!(overlay.starts_with(b"\x7fELF"));
        let text = |name: &str| {
            String::from_utf8(t.read(&format!("{base}/{name}")).unwrap().to_vec()).unwrap()
        };
        assert_eq!(
            text("modules.dep"),
            "kernel/fs/overlayfs/overlay.ko:\n\
             kernel/lib/libcrc32c.ko:\n\
             kernel/net/netfilter/nf_tables.ko: kernel/net/netfilter/nfnetlink.ko \
             kernel/lib/libcrc32c.ko\n\
             kernel/net/netfilter/nfnetlink.ko:\n"
        );
        assert_eq!(
            text("modules.alias"),
            "alias fs-overlay overlay\nalias nft-set nf_tables\n\
             alias nfnetlink-subsys-10 nf_tables\n"
        );
        assert_eq!(text("modules.softdep"), "softdep libcrc32c pre: crc32c\n");
        assert_eq!(text("modules.builtin"), "kernel/fs/ext4/ext4.ko\n");
        assert!(idx.closure(&["ext4"]).unwrap().is_empty());

        // A second run on the prepared tree changes nothing.
        let before: Vec<_> = t.iter().map(|(p, e)| (p.to_string(), e.clone())).collect();
        prepare(&mut t, "6.12.0-1-amd64").unwrap();
        let after: Vec<_> = t.iter().map(|(p, e)| (p.to_string(), e.clone())).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn a_subset_is_copied_with_its_dependencies() {
        let mut t = kernel_tree();
        let kver = "6.12.0-1-amd64";
        let idx = prepare(&mut t, kver).unwrap();
        let names = idx.names_under("kernel/net/netfilter");
        assert_eq!(names, ["nf_tables", "nfnetlink"]);
        // Ask for nf_tables only: libcrc32c and nfnetlink come along.
        let mut initramfs = Tree::new();
        copy_subset(
            &t,
            kver,
            &idx,
            &["kernel/net/netfilter/nf_tables.ko".to_string()],
            &mut initramfs,
        )
        .unwrap();
        let base = format!("lib/modules/{kver}");
        let files: Vec<&str> = initramfs
            .walk(&base)
            .filter(|(_, e)| !e.is_dir())
            .map(|(p, _)| &p[base.len() + 1..])
            .collect();
        assert_eq!(
            files,
            [
                "kernel/lib/libcrc32c.ko",
                "kernel/net/netfilter/nf_tables.ko",
                "kernel/net/netfilter/nfnetlink.ko",
                "modules.alias",
                "modules.builtin",
                "modules.dep",
                "modules.order",
                "modules.softdep",
            ]
        );
        let dep = initramfs.read(&format!("{base}/modules.dep")).unwrap();
        assert!(!String::from_utf8_lossy(dep).contains("overlay"));
        let order = initramfs.read(&format!("{base}/modules.order")).unwrap();
        assert_eq!(
            order.as_ref(),
            b"kernel/lib/libcrc32c.ko\nkernel/net/netfilter/nfnetlink.ko\n\
              kernel/net/netfilter/nf_tables.ko\n"
        );
        assert!(copy_subset(&t, kver, &idx, &["kernel/nope.ko".into()], &mut initramfs).is_err());
    }

    #[test]
    fn compressed_modules_can_stay_compressed() {
        let mut t = kernel_tree();
        let kver = "6.12.0-1-amd64";
        let idx = prepare_with(&mut t, kver, ModuleFiles::KeepCompressed).unwrap();
        let base = format!("usr/lib/modules/{kver}");
        assert!(t
            .get(&format!("{base}/kernel/fs/overlayfs/overlay.ko.xz"))
            .is_some());
        assert!(t
            .get(&format!("{base}/kernel/fs/overlayfs/overlay.ko"))
            .is_none());
        let dep = String::from_utf8(t.read(&format!("{base}/modules.dep")).unwrap().to_vec());
        assert_eq!(
            dep.unwrap(),
            "kernel/fs/overlayfs/overlay.ko.xz:\n\
             kernel/lib/libcrc32c.ko.zst:\n\
             kernel/net/netfilter/nf_tables.ko.gz: kernel/net/netfilter/nfnetlink.ko \
             kernel/lib/libcrc32c.ko.zst\n\
             kernel/net/netfilter/nfnetlink.ko:\n"
        );
        // The initramfs gets plain modules and an index naming them.
        let paths = idx.closure(&["nf_tables"]).unwrap();
        assert!(paths.contains(&"kernel/lib/libcrc32c.ko.zst".to_string()));
        let mut initramfs = Tree::new();
        copy_subset(&t, kver, &idx, &paths, &mut initramfs).unwrap();
        let ibase = format!("lib/modules/{kver}");
        let crc = initramfs
            .read(&format!("{ibase}/kernel/lib/libcrc32c.ko"))
            .unwrap();
        assert!(crc.starts_with(b"\x7fELF"));
        let dep = initramfs.read(&format!("{ibase}/modules.dep")).unwrap();
        assert_eq!(
            String::from_utf8_lossy(dep),
            "kernel/lib/libcrc32c.ko:\n\
             kernel/net/netfilter/nf_tables.ko: kernel/net/netfilter/nfnetlink.ko \
             kernel/lib/libcrc32c.ko\n\
             kernel/net/netfilter/nfnetlink.ko:\n"
        );
    }

    /// Against a real kernel package: `KILN_TEST_KERNEL_DEB=/path/linux-image-....deb
    /// cargo test -p kiln-builder --lib real_kernel -- --ignored --nocapture`.
    /// Unpacks it, prepares the modules both ways ([`ModuleFiles`]), and when
    /// `depmod` (kmod) is installed, compares modules.dep, modules.alias and
    /// modules.softdep with what depmod writes for the same files.
    /// KILN_TEST_SQUASHFS=1 also times the root squashfs of both trees.
    #[test]
    #[ignore = "needs KILN_TEST_KERNEL_DEB"]
    fn real_kernel() {
        let Some(deb) = std::env::var_os("KILN_TEST_KERNEL_DEB") else {
            eprintln!("SKIPPED: set KILN_TEST_KERNEL_DEB to a linux-image .deb");
            return;
        };
        let t0 = std::time::Instant::now();
        let mut shipped = Tree::new();
        crate::deb::merged_usr_links(&mut shipped, "amd64").unwrap();
        let installed =
            crate::deb::unpack_deb(std::path::Path::new(&deb), "linux-image", &mut shipped)
                .unwrap();
        let kvers = kernel_versions(&shipped);
        println!(
            "unpacked {} paths, {:.1} MB, in {:.1}s; kernels {kvers:?}",
            installed.len(),
            shipped.content_size() as f64 / 1e6,
            t0.elapsed().as_secs_f64()
        );
        let kver = &kvers[0];
        let have_depmod = std::process::Command::new("depmod")
            .arg("-V")
            .output()
            .is_ok();
        for files in [ModuleFiles::KeepCompressed, ModuleFiles::Decompress] {
            let mut t = shipped.clone();
            let t1 = std::time::Instant::now();
            let idx = prepare_with(&mut t, kver, files).unwrap();
            println!(
                "{files:?}: prepared {} modules in {:.1}s; tree now {:.1} MB",
                idx.len(),
                t1.elapsed().as_secs_f64(),
                t.content_size() as f64 / 1e6
            );
            if std::env::var_os("KILN_TEST_SQUASHFS").is_some() {
                let s = std::time::Instant::now();
                let mut out = Vec::new();
                crate::squashfs::write_squashfs(&t, 0, &mut out, Default::default()).unwrap();
                println!(
                    "{files:?}: squashfs (default zstd) {:.1} MB -> {:.1} MB in {:.1}s",
                    t.content_size() as f64 / 1e6,
                    out.len() as f64 / 1e6,
                    s.elapsed().as_secs_f64()
                );
            }
            let wanted = ["overlay", "virtio_net", "virtio_blk", "squashfs", "ext4"];
            let closure = idx.closure(&wanted).unwrap();
            let mut initramfs = Tree::new();
            copy_subset(&t, kver, &idx, &closure, &mut initramfs).unwrap();
            println!(
                "{files:?}: closure of {wanted:?}: {} modules, {:.1} MB in the initramfs tree",
                closure.len(),
                initramfs.content_size() as f64 / 1e6
            );
            if have_depmod {
                compare_with_depmod(&t, kver);
            } else {
                eprintln!("depmod not found: not comparing with kmod");
            }
        }
    }

    fn compare_with_depmod(t: &Tree, kver: &str) {
        let base = format!("usr/lib/modules/{kver}");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("lib/modules").join(kver);
        for (path, entry) in t.walk(&base) {
            let Kind::File(c) = &entry.kind else { continue };
            let rel = &path[base.len() + 1..];
            if is_module_file(rel) || SHIPPED.contains(&rel) || rel == "modules.order" {
                let p = out.join(rel);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, c).unwrap();
            }
        }
        let st = std::process::Command::new("depmod")
            .arg("-b")
            .arg(dir.path())
            .arg(kver)
            .status()
            .unwrap();
        assert!(st.success());
        let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
        let ours = |name: &str| {
            t.read(&format!("{base}/{name}"))
                .map(|c| String::from_utf8(c.to_vec()).unwrap())
                .unwrap_or_default()
        };
        let deps = |text: &str| -> BTreeMap<String, BTreeSet<String>> {
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(m, d)| {
                    (
                        m.to_string(),
                        d.split_whitespace().map(String::from).collect(),
                    )
                })
                .collect()
        };
        let (theirs_dep, ours_dep) = (deps(&read("modules.dep")), deps(&ours("modules.dep")));
        assert_eq!(theirs_dep.len(), ours_dep.len());
        for (m, d) in &theirs_dep {
            assert_eq!(Some(d), ours_dep.get(m), "dependencies of {m}");
        }
        let ours_text = ours("modules.dep");
        let ours_lines: BTreeSet<&str> = ours_text.lines().collect();
        let identical = read("modules.dep")
            .lines()
            .filter(|l| ours_lines.contains(l))
            .count();
        let lines = |text: &str| -> BTreeSet<String> {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .map(String::from)
                .collect()
        };
        assert_eq!(lines(&read("modules.alias")), lines(&ours("modules.alias")));
        assert_eq!(
            lines(&read("modules.softdep")),
            lines(&ours("modules.softdep"))
        );
        println!(
            "  depmod agrees: same dependency sets for all {} modules ({identical} lines \
             byte-identical), same {} aliases and {} softdeps",
            theirs_dep.len(),
            lines(&ours("modules.alias")).len(),
            lines(&ours("modules.softdep")).len()
        );
    }
}
