//! Downloads into the content-addressed cache, verified by sha256 (and size).
//!
//! URLs may be `http://`, `https://` or `file://` (handy for local mirrors).
//! A file whose sha256 is already cached is never downloaded again; offline
//! mode (`--offline`, `KILN_OFFLINE=1`) turns every cache miss into an error.

use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::cache::{sha256_hex, Cache};

/// Largest signed document (InRelease) we accept.
pub const SIGNED_DOCUMENT_LIMIT: u64 = 64 * 1024 * 1024;
/// Downloads at least this large get their own progress bar.
const PROGRESS_THRESHOLD: u64 = 4 * 1024 * 1024;
/// Downloads running at once in `fetch_many`.
const PARALLEL_DOWNLOADS: usize = 4;
/// Attempts per file when the network (not the content) fails.
const ATTEMPTS: u32 = 3;

/// One file to fetch: where from, what it must hash to, and a human name for errors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchItem {
    pub url: String,
    pub sha256: String,
    pub size: Option<u64>,
    /// What this is, for messages: "package busybox-static 1:1.37.0-6".
    pub what: String,
    /// Other URLs for the same content, tried in order only when the previous
    /// one does not exist (HTTP 404/410, missing file): e.g. the plain path of
    /// an index whose by-hash copy a mirror lacks. A content mismatch is never
    /// retried elsewhere.
    pub alternates: Vec<String>,
}

/// Downloads files into a `Cache`. Clones share the HTTP connection pool
/// and the progress display.
#[derive(Clone)]
pub struct Fetcher {
    cache: Cache,
    offline: bool,
    agent: ureq::Agent,
    progress: MultiProgress,
}

/// How a download attempt failed: worth retrying (network), worth trying an
/// alternate URL (not found), or neither (content mismatch, other HTTP errors).
enum Failure {
    Transient(anyhow::Error),
    NotFound(anyhow::Error),
    Fatal(anyhow::Error),
}

impl From<Failure> for anyhow::Error {
    fn from(f: Failure) -> anyhow::Error {
        match f {
            Failure::Transient(e) | Failure::NotFound(e) | Failure::Fatal(e) => e,
        }
    }
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("cache", &self.cache.root())
            .field("offline", &self.offline)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A fetcher writing to `cache`. `offline` is taken as given (the CLI reads
    /// `--offline` or `KILN_OFFLINE`). Online, the
    /// cache directory is created now, so an unusable one fails early.
    pub fn new(cache: Cache, offline: bool) -> Result<Fetcher> {
        if !offline {
            fs::create_dir_all(cache.root()).with_context(|| {
                format!("creating the cache directory {}", cache.root().display())
            })?;
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_recv_body(Some(Duration::from_secs(3600)))
            .user_agent(format!("kiln/{}", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Fetcher {
            cache,
            offline,
            agent: config.into(),
            progress: MultiProgress::new(),
        })
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The progress display, for callers that add their own bars.
    pub fn progress(&self) -> &MultiProgress {
        &self.progress
    }

    /// Returns the cached path of the file with this sha256, downloading it from
    /// `url` on a cache miss (verifying sha256 and, if given, size).
    pub fn fetch_verified(
        &self,
        url: &str,
        sha256: &str,
        size: Option<u64>,
        what: &str,
    ) -> Result<PathBuf> {
        let item = FetchItem {
            url: url.to_string(),
            sha256: sha256.to_string(),
            size,
            what: what.to_string(),
            alternates: Vec::new(),
        };
        if let Some(path) = self.cached(&item)? {
            return Ok(path);
        }
        if self.offline {
            return Err(self.missing_offline(&item));
        }
        self.download_with_retries(&item, None, &AtomicBool::new(false))
    }

    /// Fetches a document whose hash is not known in advance: an InRelease
    /// (the caller then verifies its signature) or k3s's sha256sum file
    /// (which nothing signs; the k3s binary is checked against it, and against
    /// the spec's pinned sha256 when there is one). Online it is downloaded
    /// (at most 64 MiB), stored in the cache and recorded as the last content
    /// of `url`; offline that last content is returned.
    pub fn fetch_signed_document(&self, url: &str, what: &str) -> Result<Vec<u8>> {
        if self.offline {
            let (sha, path) = self.cache.lookup_url(url).ok_or_else(|| {
                anyhow!(
                    "{what} ({url}) is missing from the cache {} and downloads are disabled \
                     (--offline); run once without --offline to fill the cache",
                    self.cache.root().display()
                )
            })?;
            debug!(%url, %sha, "using cached {what}");
            return fs::read(&path)
                .with_context(|| format!("reading cached {what} from {}", path.display()));
        }
        let mut attempt = 1;
        let bytes = loop {
            match self.download_to_memory(url, SIGNED_DOCUMENT_LIMIT) {
                Ok(bytes) => break bytes,
                Err(Failure::Transient(e)) if attempt < ATTEMPTS => {
                    warn!("downloading {what} from {url} failed ({e:#}), retrying");
                    attempt += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => {
                    return Err(anyhow::Error::from(e))
                        .with_context(|| format!("downloading {what} from {url}"))
                }
            }
        };
        let (sha, _) = self
            .cache
            .put_bytes(&bytes)
            .with_context(|| format!("storing {what} in the cache"))?;
        self.cache
            .record_url(url, &sha)
            .with_context(|| format!("recording {what} in the cache"))?;
        info!(%url, bytes = bytes.len(), "fetched {what}");
        Ok(bytes)
    }

    /// Fetches several files, four at a time, with one progress bar for all.
    /// Returns the cached paths in the order of `items`. The first failure
    /// stops the remaining downloads and is returned.
    pub fn fetch_many(&self, items: &[FetchItem]) -> Result<Vec<PathBuf>> {
        let mut paths: Vec<Option<PathBuf>> = Vec::with_capacity(items.len());
        let mut missing = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let hit = self.cached(item)?;
            if hit.is_none() {
                missing.push(i);
            }
            paths.push(hit);
        }
        if missing.is_empty() {
            return Ok(paths.into_iter().map(|p| p.expect("all cached")).collect());
        }
        if self.offline {
            let first = &items[missing[0]];
            let err = self.missing_offline(first);
            if missing.len() == 1 {
                return Err(err);
            }
            return Err(err.context(format!(
                "{} of {} files are missing from the cache",
                missing.len(),
                items.len()
            )));
        }

        let total_bytes: u64 = missing.iter().filter_map(|&i| items[i].size).sum();
        let bar = self.progress.add(ProgressBar::new(total_bytes));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("valid progress template")
            .progress_chars("=> "),
        );
        let done = AtomicUsize::new(0);
        let count = missing.len();
        bar.set_message(format!("downloading 0/{count} files"));
        info!(files = count, bytes = total_bytes, "downloading");

        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(PARALLEL_DOWNLOADS.min(count))
            .thread_name(|i| format!("kiln-fetch-{i}"))
            .build()
            .context("starting download threads")?;
        // The first failure is kept and cancels the rest (in-flight downloads
        // stop at their next read; queued ones do not start).
        let cancel = AtomicBool::new(false);
        let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        let results: Vec<Option<(usize, PathBuf)>> = pool.install(|| {
            missing
                .par_iter()
                .map(|&i| {
                    if cancel.load(Ordering::SeqCst) {
                        return None;
                    }
                    match self.download_with_retries(&items[i], Some(&bar), &cancel) {
                        Ok(path) => {
                            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                            bar.set_message(format!("downloading {n}/{count} files"));
                            Some((i, path))
                        }
                        Err(e) => {
                            if !cancel.swap(true, Ordering::SeqCst) {
                                *first_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            }
                            None
                        }
                    }
                })
                .collect()
        });
        bar.finish_and_clear();
        if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        for (i, path) in results.into_iter().flatten() {
            paths[i] = Some(path);
        }
        Ok(paths
            .into_iter()
            .map(|p| p.expect("every item fetched"))
            .collect())
    }

    /// The cached path for an item, if present with the expected size.
    fn cached(&self, item: &FetchItem) -> Result<Option<PathBuf>> {
        self.cache
            .blob_path(&item.sha256)
            .with_context(|| format!("bad sha256 for {} ({})", item.what, item.url))?;
        let Some(path) = self.cache.get(&item.sha256) else {
            return Ok(None);
        };
        if let Some(size) = item.size {
            let actual = fs::metadata(&path).map(|m| m.len()).unwrap_or(u64::MAX);
            if actual != size {
                warn!(path = %path.display(), "cached {} has the wrong size, fetching again", item.what);
                return Ok(None);
            }
        }
        debug!(url = %item.url, "cache hit for {}", item.what);
        Ok(Some(path))
    }

    fn missing_offline(&self, item: &FetchItem) -> anyhow::Error {
        anyhow!(
            "{} ({}, sha256 {}) is missing from the cache {} and downloads are disabled \
             (--offline); run once without --offline to fill the cache",
            item.what,
            item.url,
            item.sha256,
            self.cache.root().display()
        )
    }

    /// Downloads an item from its URL, or from an alternate when a URL does not exist.
    fn download_with_retries(
        &self,
        item: &FetchItem,
        overall: Option<&ProgressBar>,
        cancel: &AtomicBool,
    ) -> Result<PathBuf> {
        let urls: Vec<&str> = std::iter::once(item.url.as_str())
            .chain(item.alternates.iter().map(String::as_str))
            .collect();
        for (i, url) in urls.iter().enumerate() {
            let is_last = i + 1 == urls.len();
            match self.download_url_with_retries(url, item, overall, cancel) {
                Ok(path) => return Ok(path),
                Err(Failure::NotFound(e)) if !is_last => {
                    warn!(
                        "{} is not at {url} ({e:#}), trying {}",
                        item.what,
                        urls[i + 1]
                    );
                }
                Err(e) => {
                    return Err(anyhow::Error::from(e))
                        .with_context(|| format!("downloading {} from {url}", item.what))
                }
            }
        }
        unreachable!("the last URL returns")
    }

    fn download_url_with_retries(
        &self,
        url: &str,
        item: &FetchItem,
        overall: Option<&ProgressBar>,
        cancel: &AtomicBool,
    ) -> std::result::Result<PathBuf, Failure> {
        let mut attempt = 1;
        loop {
            match self.download(url, item, overall, cancel) {
                Err(Failure::Transient(e))
                    if attempt < ATTEMPTS && !cancel.load(Ordering::Relaxed) =>
                {
                    warn!(
                        "downloading {} from {url} failed ({e:#}), retrying",
                        item.what
                    );
                    attempt += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
                result => return result,
            }
        }
    }

    /// One attempt: stream into a temporary file while hashing, check, commit.
    fn download(
        &self,
        url: &str,
        item: &FetchItem,
        overall: Option<&ProgressBar>,
        cancel: &AtomicBool,
    ) -> std::result::Result<PathBuf, Failure> {
        let expected_sha = item.sha256.to_ascii_lowercase();
        let (mut reader, length) = self.open(url)?;
        if let (Some(expected), Some(length)) = (item.size, length) {
            if expected != length {
                return Err(Failure::Fatal(anyhow!(
                    "size mismatch: expected {expected} bytes, the server announces {length}"
                )));
            }
        }
        let mut tmp = self.cache.temp_file().map_err(Failure::Fatal)?;

        let bar_len = item.size.or(length).unwrap_or(0);
        let own_bar = (overall.is_none() && bar_len >= PROGRESS_THRESHOLD).then(|| {
            let bar = self.progress.add(ProgressBar::new(bar_len));
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("valid progress template")
                .progress_chars("=> "),
            );
            bar.set_message(item.what.clone());
            bar
        });

        // Read one byte more than expected so an overlong file is noticed
        // without downloading all of it.
        let limit = item.size.map_or(u64::MAX, |s| s.saturating_add(1));
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let result: std::result::Result<(), Failure> = loop {
            if cancel.load(Ordering::Relaxed) {
                break Err(Failure::Fatal(anyhow!(
                    "cancelled because another download failed"
                )));
            }
            let want = buf
                .len()
                .min((limit - total).min(buf.len() as u64) as usize);
            if want == 0 {
                break Ok(());
            }
            let n = match reader.read(&mut buf[..want]) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    break Err(Failure::Transient(
                        anyhow!(e).context("reading the response"),
                    ))
                }
            };
            hasher.update(&buf[..n]);
            if let Err(e) = tmp.write_all(&buf[..n]) {
                break Err(Failure::Fatal(anyhow!(e).context("writing to the cache")));
            }
            total += n as u64;
            if let Some(bar) = overall.or(own_bar.as_ref()) {
                bar.inc(n as u64);
            }
        };
        if let Some(bar) = own_bar {
            bar.finish_and_clear();
        }
        result?;

        if let Some(expected) = item.size {
            if total != expected {
                return Err(Failure::Fatal(anyhow!(
                    "size mismatch: expected {expected} bytes, got {}",
                    if total > expected {
                        "more".to_string()
                    } else {
                        total.to_string()
                    }
                )));
            }
        }
        let actual = hex::encode(hasher.finalize());
        if actual != expected_sha {
            return Err(Failure::Fatal(anyhow!(
                "sha256 mismatch: expected {expected_sha}, got {actual}"
            )));
        }
        let path = self.cache.commit(tmp, &actual).map_err(Failure::Fatal)?;
        debug!(%url, bytes = total, "downloaded {}", item.what);
        Ok(path)
    }

    /// Downloads a whole body into memory, refusing more than `limit` bytes.
    fn download_to_memory(&self, url: &str, limit: u64) -> std::result::Result<Vec<u8>, Failure> {
        let (reader, length) = self.open(url)?;
        if length.is_some_and(|l| l > limit) {
            return Err(Failure::Fatal(anyhow!(
                "the document is larger than {limit} bytes"
            )));
        }
        let mut bytes = Vec::new();
        reader
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Failure::Transient(anyhow!(e).context("reading the response")))?;
        if bytes.len() as u64 > limit {
            return Err(Failure::Fatal(anyhow!(
                "the document is larger than {limit} bytes"
            )));
        }
        debug!(%url, sha256 = %sha256_hex(&bytes), "downloaded");
        Ok(bytes)
    }

    /// Opens a URL for reading; returns the body and its length when known.
    fn open(&self, url: &str) -> std::result::Result<(Box<dyn Read + Send>, Option<u64>), Failure> {
        if let Some(rest) = url.strip_prefix("file://") {
            let path = file_url_path(rest).map_err(Failure::Fatal)?;
            let file = fs::File::open(&path).map_err(|e| {
                let not_found = e.kind() == io::ErrorKind::NotFound;
                let e = anyhow!(e).context(format!("opening {}", path.display()));
                if not_found {
                    Failure::NotFound(e)
                } else {
                    Failure::Fatal(e)
                }
            })?;
            let len = file.metadata().ok().map(|m| m.len());
            return Ok((Box::new(file), len));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Failure::Fatal(anyhow!(
                "unsupported URL scheme in {url} (use http://, https:// or file://)"
            )));
        }
        let response = self.agent.get(url).call().map_err(|e| {
            let transient = matches!(
                e,
                ureq::Error::Io(_)
                    | ureq::Error::Timeout(_)
                    | ureq::Error::ConnectionFailed
                    | ureq::Error::HostNotFound
            );
            let e = anyhow!(e);
            if transient {
                Failure::Transient(e)
            } else {
                Failure::Fatal(e)
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            let e = anyhow!(
                "the server answered HTTP {} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
            return Err(match status.as_u16() {
                404 | 410 => Failure::NotFound(e),
                500..=599 => Failure::Transient(e),
                _ => Failure::Fatal(e),
            });
        }
        let body = response.into_body();
        let length = body.content_length();
        Ok((Box::new(body.into_reader()), length))
    }
}

/// The local path of a `file://` URL (after the scheme): `/abs/path` or
/// `localhost/abs/path`, percent-decoded.
fn file_url_path(rest: &str) -> Result<PathBuf> {
    let path = rest.strip_prefix("localhost").unwrap_or(rest);
    if !path.starts_with('/') {
        bail!("file URL file://{rest} must name an absolute path (file:///...)");
    }
    let decoded = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .with_context(|| format!("file URL file://{rest} is not valid UTF-8"))?;
    Ok(PathBuf::from(decoded.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetcher(dir: &std::path::Path, offline: bool) -> Fetcher {
        Fetcher::new(Cache::new(dir.join("cache")), offline).unwrap()
    }

    #[test]
    fn file_urls_verified_and_cached() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("my file.bin");
        fs::write(&src, b"payload").unwrap();
        let url = format!("file://{}", dir.path().join("my%20file.bin").display());
        let sha = sha256_hex(b"payload");
        let f = fetcher(dir.path(), false);
        let path = f.fetch_verified(&url, &sha, Some(7), "test file").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"payload");

        // Cache hit: works even after the source is gone, and offline.
        fs::remove_file(&src).unwrap();
        assert_eq!(
            f.fetch_verified(&url, &sha, Some(7), "test file").unwrap(),
            path
        );
        let off = fetcher(dir.path(), true);
        assert_eq!(
            off.fetch_verified(&url, &sha, None, "test file").unwrap(),
            path
        );
    }

    #[test]
    fn mismatches_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"payload").unwrap();
        let url = format!("file://{}/a", dir.path().display());
        let f = fetcher(dir.path(), false);
        let wrong = "0".repeat(64);
        let err = f.fetch_verified(&url, &wrong, None, "thing A").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!(
                "downloading thing A from {url}: sha256 mismatch: expected {wrong}, got "
            )),
            "{msg}"
        );
        let err = f
            .fetch_verified(&url, &sha256_hex(b"payload"), Some(6), "thing A")
            .unwrap_err();
        assert!(format!("{err:#}").contains("size mismatch"), "{err:#}");
        let err = f
            .fetch_verified(&url, &sha256_hex(b"payload"), Some(8), "thing A")
            .unwrap_err();
        assert!(format!("{err:#}").contains("size mismatch"), "{err:#}");
        // Nothing was committed, and no temporary file was left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("cache/sha256"))
            .unwrap()
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn offline_miss_names_what_and_url() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), true);
        let url = "http://mirror.example/debian/pool/x.deb";
        let err = f
            .fetch_verified(url, &"1".repeat(64), None, "package x 1.0")
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("package x 1.0") && msg.contains(url) && msg.contains("--offline"),
            "{msg}"
        );
        let err = f
            .fetch_signed_document(url, "InRelease of trixie")
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("InRelease of trixie"),
            "{err:#}"
        );
        let items = vec![FetchItem {
            url: url.into(),
            sha256: "2".repeat(64),
            size: Some(1),
            what: "package y 2".into(),
            ..Default::default()
        }];
        let err = f.fetch_many(&items).unwrap_err();
        assert!(format!("{err:#}").contains("package y 2"), "{err:#}");
    }

    #[test]
    fn fetch_many_in_order_and_first_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut items = Vec::new();
        for i in 0..10 {
            let content = format!("file number {i}");
            fs::write(dir.path().join(format!("f{i}")), &content).unwrap();
            items.push(FetchItem {
                url: format!("file://{}/f{i}", dir.path().display()),
                sha256: sha256_hex(content.as_bytes()),
                size: Some(content.len() as u64),
                what: format!("file {i}"),
                ..Default::default()
            });
        }
        let f = fetcher(dir.path(), false);
        let paths = f.fetch_many(&items).unwrap();
        for (i, p) in paths.iter().enumerate() {
            assert_eq!(fs::read_to_string(p).unwrap(), format!("file number {i}"));
        }
        items.push(FetchItem {
            url: format!("file://{}/nonexistent", dir.path().display()),
            sha256: "3".repeat(64),
            size: None,
            what: "the missing one".into(),
            ..Default::default()
        });
        let err = f.fetch_many(&items).unwrap_err();
        assert!(format!("{err:#}").contains("the missing one"), "{err:#}");
    }

    #[test]
    fn signed_document_roundtrip_offline() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("InRelease"), b"signed text").unwrap();
        let url = format!("file://{}/InRelease", dir.path().display());
        let online = fetcher(dir.path(), false);
        assert_eq!(
            online.fetch_signed_document(&url, "InRelease").unwrap(),
            b"signed text"
        );
        fs::remove_file(dir.path().join("InRelease")).unwrap();
        let offline = fetcher(dir.path(), true);
        assert_eq!(
            offline.fetch_signed_document(&url, "InRelease").unwrap(),
            b"signed text"
        );
        let err = online
            .fetch_signed_document(&url, "InRelease of s")
            .unwrap_err();
        assert!(format!("{err:#}").contains(&url), "{err:#}");
    }

    #[test]
    fn alternates_only_when_not_found() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("plain"), b"index").unwrap();
        fs::write(dir.path().join("wrong"), b"other").unwrap();
        let base = format!("file://{}", dir.path().display());
        let f = fetcher(dir.path(), false);
        let item = FetchItem {
            url: format!("{base}/by-hash-missing"),
            sha256: sha256_hex(b"index"),
            size: Some(5),
            what: "an index".into(),
            alternates: vec![format!("{base}/plain")],
        };
        let paths = f.fetch_many(std::slice::from_ref(&item)).unwrap();
        assert_eq!(fs::read(&paths[0]).unwrap(), b"index");

        // A mismatch at the first URL is final, even with a good alternate.
        let f = fetcher(&dir.path().join("second"), false);
        let item = FetchItem {
            url: format!("{base}/wrong"),
            ..item
        };
        let err = f.fetch_many(&[item]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("from {base}/wrong: sha256 mismatch")),
            "{msg}"
        );
    }

    #[test]
    fn unsupported_scheme() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), false);
        let err = f
            .fetch_verified("ftp://mirror.example/x", &"1".repeat(64), None, "x")
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("unsupported URL scheme"),
            "{err:#}"
        );
    }
}
