//! What the TFTP server serves: the [`FileSource`] trait and its sources, a
//! directory ([`RootDir`]), an in-memory map ([`VirtualFiles`]), a closure
//! ([`FnSource`], the per-client hook) and a [`Chain`] of them.
//!
//! # Path policy
//!
//! Every source sees the client's name through [`sanitize_path`], which gives
//! a relative path of plain components or refuses the request:
//!
//! - a leading `/` (PXE ROMs send `/pxelinux.0`) is taken relative to the
//!   root, as tftp-hpa's `-s` and dnsmasq's `--tftp-root` do;
//! - `\` is a separator like `/` (Windows-minded clients send `\boot\x`),
//!   so `..\` is as much a `..` component as `../`;
//! - any `..` component is refused with ERROR 2, even one that would stay
//!   inside the root (`a/../b`): no legitimate boot file name has one;
//! - `%` has no meaning in TFTP and is not decoded: `..%2f..%2fetc` is one
//!   literal (and absent) file name inside the root. (curl decodes its URL
//!   before sending, so what arrives from it is `../..`, refused above);
//! - NUL bytes are refused; empty names (`/`, `.`) are "file not found".
//!
//! [`RootDir`] then opens the path with `openat2(RESOLVE_BENEATH)` below a
//! descriptor of the root, so the kernel refuses any symlink that leads out of
//! it (absolute symlinks too, even to a place inside the root). Where openat2
//! is missing (old kernels, non-Linux), it falls back to canonicalizing the
//! path and checking that it is under the canonical root. Only regular files
//! are served.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use thiserror::Error;

use super::packet::ErrorCode;

/// Longest file name accepted from a client.
pub const MAX_PATH_LEN: usize = 1024;

/// A refusal to serve a file: the TFTP error code and the message the client
/// sees. Messages never contain server paths.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message} (TFTP error {})", code.as_u16())]
pub struct TftpError {
    pub code: ErrorCode,
    pub message: String,
}

impl TftpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        TftpError {
            code,
            message: message.into(),
        }
    }

    /// ERROR 1.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::FileNotFound, message)
    }

    /// ERROR 2.
    pub fn access_violation(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::AccessViolation, message)
    }

    /// ERROR 0 with a message.
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotDefined, message)
    }

    pub fn is_not_found(&self) -> bool {
        self.code == ErrorCode::FileNotFound
    }
}

/// An opened file: bytes in memory, or an open file read in chunks as the
/// transfer goes (large files are never loaded whole).
#[derive(Debug)]
pub enum TftpFile {
    Memory(Bytes),
    File { file: File, size: u64 },
}

impl TftpFile {
    /// An open file; its size is taken now (what tsize announces).
    pub fn from_file(file: File) -> io::Result<TftpFile> {
        let size = file.metadata()?.len();
        Ok(TftpFile::File { file, size })
    }

    pub fn size(&self) -> u64 {
        match self {
            TftpFile::Memory(b) => b.len() as u64,
            TftpFile::File { size, .. } => *size,
        }
    }
}

impl From<Bytes> for TftpFile {
    fn from(b: Bytes) -> Self {
        TftpFile::Memory(b)
    }
}

/// Where files come from. `client` is the requesting address, so that a
/// source may serve per-machine files (Raspberry Pi `<serial>/...`).
/// `path` is the name as the client sent it: sources sanitize it themselves
/// (the ones here use [`sanitize_path`]). `open` may block (the server calls
/// it on the blocking thread pool).
pub trait FileSource: Send + Sync + 'static {
    fn open(&self, client: SocketAddr, path: &str) -> Result<TftpFile, TftpError>;
}

impl<T: FileSource + ?Sized> FileSource for Arc<T> {
    fn open(&self, client: SocketAddr, path: &str) -> Result<TftpFile, TftpError> {
        (**self).open(client, path)
    }
}

impl<T: FileSource + ?Sized> FileSource for Box<T> {
    fn open(&self, client: SocketAddr, path: &str) -> Result<TftpFile, TftpError> {
        (**self).open(client, path)
    }
}

/// Turns a client's file name into a relative path of plain components
/// joined by `/`, or refuses it (see the module docs for the policy).
pub fn sanitize_path(raw: &str) -> Result<String, TftpError> {
    if raw.len() > MAX_PATH_LEN {
        return Err(TftpError::not_found("file name too long"));
    }
    if raw.contains('\0') {
        return Err(TftpError::access_violation("NUL byte in file name"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in raw.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => {
                return Err(TftpError::access_violation(
                    "'..' is not allowed in file names",
                ))
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(TftpError::not_found("no file name"));
    }
    Ok(parts.join("/"))
}

fn io_to_tftp(e: &io::Error) -> TftpError {
    match e.raw_os_error() {
        Some(code) if code == rustix::io::Errno::XDEV.raw_os_error() => {
            return TftpError::access_violation("path leaves the TFTP root")
        }
        Some(code) if code == rustix::io::Errno::LOOP.raw_os_error() => {
            return TftpError::access_violation("too many symbolic links")
        }
        Some(code) if code == rustix::io::Errno::NOTDIR.raw_os_error() => {
            return TftpError::not_found("file not found")
        }
        _ => {}
    }
    match e.kind() {
        io::ErrorKind::NotFound => TftpError::not_found("file not found"),
        io::ErrorKind::PermissionDenied => TftpError::access_violation("permission denied"),
        _ => TftpError::other("cannot open file"),
    }
}

/// Serves the files below a directory; see the module docs.
#[derive(Debug)]
pub struct RootDir {
    root: PathBuf,
    dir: File,
    no_openat2: AtomicBool,
}

impl RootDir {
    /// `root` must be a directory; it is resolved once, here.
    pub fn new(root: impl AsRef<Path>) -> io::Result<RootDir> {
        let root = root.as_ref();
        let canonical = root
            .canonicalize()
            .map_err(|e| io::Error::new(e.kind(), format!("TFTP root {}: {e}", root.display())))?;
        let dir = File::open(&canonical)?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TFTP root {} is not a directory", root.display()),
            ));
        }
        Ok(RootDir {
            root: canonical,
            dir,
            no_openat2: AtomicBool::new(false),
        })
    }

    /// The canonical root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    #[cfg(target_os = "linux")]
    fn open_openat2(&self, rel: &str) -> Option<io::Result<File>> {
        use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
        if self.no_openat2.load(Ordering::Relaxed) {
            return None;
        }
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        match openat2(&self.dir, rel, flags, Mode::empty(), resolve) {
            Ok(fd) => Some(Ok(File::from(fd))),
            Err(rustix::io::Errno::NOSYS) => {
                self.no_openat2.store(true, Ordering::Relaxed);
                None
            }
            Err(e) => Some(Err(e.into())),
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn open_openat2(&self, _rel: &str) -> Option<io::Result<File>> {
        None
    }

    /// Fallback: resolve every symlink, then check the result is inside.
    /// (Racy against someone swapping directories under the root meanwhile,
    /// which openat2 is not.)
    fn open_canonical(&self, rel: &str) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        let resolved = self.root.join(rel).canonicalize()?;
        if !resolved.starts_with(&self.root) {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::XDEV.raw_os_error(),
            ));
        }
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(resolved)
    }
}

impl FileSource for RootDir {
    fn open(&self, _client: SocketAddr, path: &str) -> Result<TftpFile, TftpError> {
        let rel = sanitize_path(path)?;
        let file = match self.open_openat2(&rel) {
            Some(r) => r,
            None => self.open_canonical(&rel),
        }
        .map_err(|e| io_to_tftp(&e))?;
        let meta = file.metadata().map_err(|e| io_to_tftp(&e))?;
        if !meta.is_file() {
            return Err(TftpError::not_found("not a regular file"));
        }
        Ok(TftpFile::File {
            file,
            size: meta.len(),
        })
    }
}

/// Files held in memory, by sanitized path. Changeable while serving (share
/// it as `Arc<VirtualFiles>`).
#[derive(Debug, Default)]
pub struct VirtualFiles {
    files: RwLock<HashMap<String, Bytes>>,
}

impl VirtualFiles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a file; returns the previous content. The path goes
    /// through [`sanitize_path`] like a client's, so `/a` and `a` are one file.
    pub fn insert(&self, path: &str, data: impl Into<Bytes>) -> Result<Option<Bytes>, TftpError> {
        let key = sanitize_path(path)?;
        Ok(self.write().insert(key, data.into()))
    }

    /// Builder form of [`insert`](Self::insert).
    pub fn with(self, path: &str, data: impl Into<Bytes>) -> Result<Self, TftpError> {
        self.insert(path, data)?;
        Ok(self)
    }

    pub fn remove(&self, path: &str) -> Option<Bytes> {
        let key = sanitize_path(path).ok()?;
        self.write().remove(&key)
    }

    pub fn get(&self, path: &str) -> Option<Bytes> {
        let key = sanitize_path(path).ok()?;
        self.read().get(&key).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Bytes>> {
        self.files.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Bytes>> {
        self.files.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl FileSource for VirtualFiles {
    fn open(&self, _client: SocketAddr, path: &str) -> Result<TftpFile, TftpError> {
        let key = sanitize_path(path)?;
        self.read()
            .get(&key)
            .cloned()
            .map(TftpFile::Memory)
            .ok_or_else(|| TftpError::not_found("file not found"))
    }
}

/// A source made of a closure of (client, sanitized path): the hook for
/// per-client files. The closure never sees a raw name.
///
/// ```
/// # use kiln_netboot_server::tftp::{FnSource, TftpError, TftpFile};
/// let per_client = FnSource(|client: std::net::SocketAddr, path: &str| {
///     if path == "whoami" {
///         Ok(TftpFile::Memory(client.ip().to_string().into()))
///     } else {
///         Err(TftpError::not_found("file not found"))
///     }
/// });
/// ```
pub struct FnSource<F>(pub F);

impl<F> FileSource for FnSource<F>
where
    F: Fn(SocketAddr, &str) -> Result<TftpFile, TftpError> + Send + Sync + 'static,
{
    fn open(&self, client: SocketAddr, path: &str) -> Result<TftpFile, TftpError> {
        let rel = sanitize_path(path)?;
        (self.0)(client, &rel)
    }
}

/// Tries sources in order: the first answer that is not "file not found"
/// wins (a refusal stops the chain), e.g. virtual files, then a directory.
#[derive(Default, Clone)]
pub struct Chain {
    sources: Vec<Arc<dyn FileSource>>,
}

impl Chain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a source, tried after the ones before it.
    pub fn then(mut self, source: impl FileSource) -> Self {
        self.sources.push(Arc::new(source));
        self
    }
}

impl FileSource for Chain {
    fn open(&self, client: SocketAddr, path: &str) -> Result<TftpFile, TftpError> {
        let mut last = TftpError::not_found("file not found");
        for s in &self.sources {
            match s.open(client, path) {
                Err(e) if e.is_not_found() => last = e,
                other => return other,
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn client() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    fn read_all(f: TftpFile) -> Vec<u8> {
        match f {
            TftpFile::Memory(b) => b.to_vec(),
            TftpFile::File { mut file, size } => {
                let mut v = Vec::new();
                file.read_to_end(&mut v).unwrap();
                assert_eq!(v.len() as u64, size);
                v
            }
        }
    }

    #[test]
    fn sanitize_accepts_and_normalises() {
        for (raw, want) in [
            ("pxelinux.0", "pxelinux.0"),
            ("/pxelinux.0", "pxelinux.0"),
            ("//a///b/./c", "a/b/c"),
            ("./a", "a"),
            ("\\boot\\pxeboot.n12", "boot/pxeboot.n12"),
            ("1234abcd/config.txt", "1234abcd/config.txt"),
            ("...", "..."),
            ("..a", "..a"),
            ("a..", "a.."),
            (".. ", ".. "),
            // Not decoded: a literal, harmless name inside the root.
            ("..%2f..%2fetc%2fpasswd", "..%2f..%2fetc%2fpasswd"),
            ("%2e%2e/x", "%2e%2e/x"),
            ("C:\\x", "C:/x"),
        ] {
            assert_eq!(sanitize_path(raw).as_deref(), Ok(want), "{raw:?}");
        }
    }

    #[test]
    fn sanitize_refuses() {
        for raw in [
            "..",
            "../etc/passwd",
            "/../etc/passwd",
            "a/../../b",
            "a/..",
            "a/../b",
            "..\\..\\windows",
            "a\\..\\..\\b",
            "/./../x",
            "a\0b",
            "\0",
        ] {
            let e = sanitize_path(raw).unwrap_err();
            assert_eq!(e.code, ErrorCode::AccessViolation, "{raw:?}");
        }
        for raw in ["", "/", ".", "//./", "\\"] {
            let e = sanitize_path(raw).unwrap_err();
            assert_eq!(e.code, ErrorCode::FileNotFound, "{raw:?}");
        }
        let long = "a/".repeat(600);
        assert!(sanitize_path(&long).is_err());
    }

    #[test]
    fn root_dir_serves_inside_and_refuses_outside() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/file"), b"inside").unwrap();
        std::fs::write(root.join("top"), b"top").unwrap();
        std::os::unix::fs::symlink("sub/file", root.join("rel-link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("abs-out")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("dir-out")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../../etc/passwd", root.join("rel-out"))
            .unwrap();
        let src = RootDir::new(root).unwrap();

        assert_eq!(read_all(src.open(client(), "sub/file").unwrap()), b"inside");
        assert_eq!(read_all(src.open(client(), "/top").unwrap()), b"top");
        assert_eq!(
            read_all(src.open(client(), "\\sub\\file").unwrap()),
            b"inside"
        );
        assert_eq!(read_all(src.open(client(), "rel-link").unwrap()), b"inside");

        for (path, code) in [
            ("abs-out", ErrorCode::AccessViolation),
            ("dir-out/secret", ErrorCode::AccessViolation),
            ("rel-out", ErrorCode::AccessViolation),
            ("../secret", ErrorCode::AccessViolation),
            ("/etc/passwd", ErrorCode::FileNotFound),
            ("missing", ErrorCode::FileNotFound),
            ("top/x", ErrorCode::FileNotFound),
            ("sub", ErrorCode::FileNotFound),
            ("/", ErrorCode::FileNotFound),
        ] {
            let e = src.open(client(), path).unwrap_err();
            assert_eq!(e.code, code, "{path}: {e}");
            assert!(!e.message.contains(&*root.to_string_lossy()), "{e}");
        }
    }

    #[test]
    fn fallback_refuses_symlinks_out_too() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), b"f").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), tmp.path().join("out")).unwrap();
        std::os::unix::fs::symlink("f", tmp.path().join("in")).unwrap();
        let src = RootDir::new(tmp.path()).unwrap();
        src.no_openat2.store(true, Ordering::Relaxed);
        assert_eq!(read_all(src.open(client(), "in").unwrap()), b"f");
        let e = src.open(client(), "out").unwrap_err();
        assert_eq!(e.code, ErrorCode::AccessViolation);
        let e = src.open(client(), "nothing").unwrap_err();
        assert_eq!(e.code, ErrorCode::FileNotFound);
    }

    #[test]
    fn root_must_be_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), b"").unwrap();
        assert!(RootDir::new(tmp.path().join("f")).is_err());
        assert!(RootDir::new(tmp.path().join("missing")).is_err());
    }

    #[test]
    fn virtual_files_and_chain() {
        let virt = Arc::new(
            VirtualFiles::new()
                .with("/ipxe.efi", Bytes::from_static(b"virtual"))
                .unwrap(),
        );
        assert!(virt.insert("../x", Bytes::new()).is_err());
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("ipxe.efi"), b"disk").unwrap();
        std::fs::write(tmp.path().join("other"), b"other").unwrap();
        let per_client = FnSource(|c: SocketAddr, p: &str| {
            if p == "whoami" {
                Ok(TftpFile::Memory(Bytes::from(c.to_string())))
            } else if p == "forbidden" {
                Err(TftpError::access_violation("no"))
            } else {
                Err(TftpError::not_found("file not found"))
            }
        });
        let chain = Chain::new()
            .then(per_client)
            .then(virt.clone())
            .then(RootDir::new(tmp.path()).unwrap());
        assert_eq!(
            read_all(chain.open(client(), "ipxe.efi").unwrap()),
            b"virtual"
        );
        assert_eq!(read_all(chain.open(client(), "other").unwrap()), b"other");
        assert_eq!(
            read_all(chain.open(client(), "/whoami").unwrap()),
            b"127.0.0.1:5000"
        );
        assert_eq!(
            chain.open(client(), "forbidden").unwrap_err().code,
            ErrorCode::AccessViolation
        );
        assert_eq!(
            chain.open(client(), "nothing").unwrap_err().code,
            ErrorCode::FileNotFound
        );
        assert_eq!(
            chain.open(client(), "../other").unwrap_err().code,
            ErrorCode::AccessViolation
        );
        // Changes while serving are seen.
        virt.remove("ipxe.efi");
        assert_eq!(read_all(chain.open(client(), "ipxe.efi").unwrap()), b"disk");
        assert_eq!(
            Chain::new().open(client(), "x").unwrap_err().code,
            ErrorCode::FileNotFound
        );
    }
}
