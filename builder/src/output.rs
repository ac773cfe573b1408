//! Atomic output: an image is written into a temporary directory beside its
//! final place and renamed into `<out>/<name>` only when complete, so a failed
//! or interrupted build never leaves a half-written image (the previous one
//! stays until the new one is whole, and the two are swapped atomically).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub struct OutputDir {
    tmp: tempfile::TempDir,
    target: PathBuf,
}

impl OutputDir {
    /// Makes `<out>/.<name>.tmp-XXXX`.
    pub fn create(out: &Path, name: &str) -> Result<OutputDir> {
        std::fs::create_dir_all(out)
            .with_context(|| format!("creating the output directory {}", out.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp-"))
            .tempdir_in(out)
            .with_context(|| format!("creating a temporary directory in {}", out.display()))?;
        Ok(OutputDir {
            tmp,
            target: out.join(name),
        })
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Moves the finished directory into place, replacing an older image.
    pub fn commit(self) -> Result<PathBuf> {
        let tmp = self.tmp.keep();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting the mode of {}", tmp.display()))?;
        if self.target.exists() {
            // One atomic swap (renameat2 RENAME_EXCHANGE): readers of the
            // target (kiln serve) see the old image or the new one, never
            // neither, and a failure leaves the old one in place.
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                &tmp,
                rustix::fs::CWD,
                &self.target,
                rustix::fs::RenameFlags::EXCHANGE,
            )
            .with_context(|| format!("swapping the new image into {}", self.target.display()))?;
            // `tmp` now holds the previous image.
            std::fs::remove_dir_all(&tmp).with_context(|| {
                format!("removing the previous image (moved to {})", tmp.display())
            })?;
        } else {
            std::fs::rename(&tmp, &self.target)
                .with_context(|| format!("moving the new image into {}", self.target.display()))?;
        }
        if let Some(parent) = self.target.parent() {
            if let Ok(d) = std::fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uncommitted_build_leaves_nothing_and_a_commit_replaces() {
        let d = tempfile::tempdir().unwrap();
        {
            let o = OutputDir::create(d.path(), "img").unwrap();
            std::fs::write(o.path().join("a"), "1").unwrap();
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        let o = OutputDir::create(d.path(), "img").unwrap();
        std::fs::write(o.path().join("a"), "1").unwrap();
        o.commit().unwrap();
        let o = OutputDir::create(d.path(), "img").unwrap();
        std::fs::write(o.path().join("b"), "2").unwrap();
        let dir = o.commit().unwrap();
        assert!(!dir.join("a").exists() && dir.join("b").exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
