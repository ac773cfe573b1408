//! User overlays: directories laid over the root tree. Files ending in
//! `.tera` are rendered with the spec's variables (and `name`, `arch`,
//! `debian_arch`, `kernel_version`, `k3s_version`) and lose the suffix.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::tree::{Entry, Tree};

/// Lays one overlay directory over the tree. Modes are normalised: 0755 for
/// directories and for files with any execute bit, 0644 otherwise; owner root.
pub fn lay(dir: &Path, tree: &mut Tree, vars: &tera::Context) -> Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .with_context(|| format!("reading overlay directory {}", d.display()))?
        {
            let e = e.with_context(|| format!("reading overlay directory {}", d.display()))?;
            let path = e.path();
            let ft = e
                .file_type()
                .with_context(|| format!("reading {}", path.display()))?;
            if ft.is_dir() {
                stack.push(path.clone());
            }
            files.push((path, ft));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, ft) in files {
        let rel = path
            .strip_prefix(dir)
            .expect("under the overlay")
            .to_string_lossy()
            .into_owned();
        if ft.is_dir() {
            tree.insert(&rel, Entry::dir(0o755))
                .with_context(|| format!("laying {}", path.display()))?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)
                .with_context(|| format!("reading link {}", path.display()))?;
            tree.insert(&rel, Entry::symlink(target.to_string_lossy().into_owned()))
                .with_context(|| format!("laying {}", path.display()))?;
        } else if ft.is_file() {
            use std::os::unix::fs::PermissionsExt;
            let meta =
                std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let (rel, bytes) = match rel.strip_suffix(".tera") {
                Some(stem) => (stem.to_string(), render(&path, &bytes, vars)?.into_bytes()),
                None => (rel, bytes),
            };
            tree.insert(&rel, Entry::file(bytes, mode))
                .with_context(|| format!("laying {}", path.display()))?;
        } else {
            bail!(
                "overlay {}: {} is neither a file, a directory nor a symlink",
                dir.display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// Renders one template; errors name the file and tera's reason.
pub fn render(path: &Path, bytes: &[u8], vars: &tera::Context) -> Result<String> {
    let text = std::str::from_utf8(bytes)
        .with_context(|| format!("template {} is not UTF-8", path.display()))?;
    let mut t = tera::Tera::default();
    let name = path.display().to_string();
    t.add_raw_template(&name, text)
        .map_err(|e| tera_error(&name, e))?;
    t.render(&name, vars).map_err(|e| tera_error(&name, e))
}

fn tera_error(name: &str, e: tera::Error) -> anyhow::Error {
    // tera keeps the useful part (the missing variable, the line) in the source chain.
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    anyhow::anyhow!("rendering template {name}: {msg}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_modes_normalise() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc/kiln")).unwrap();
        std::fs::write(
            d.path().join("etc/kiln/motd.tera"),
            "hello {{ name }} on {{ arch }}\n",
        )
        .unwrap();
        std::fs::write(d.path().join("etc/plain"), "x").unwrap();
        std::os::unix::fs::symlink("plain", d.path().join("etc/link")).unwrap();
        let mut vars = tera::Context::new();
        vars.insert("name", "n1");
        vars.insert("arch", "x86_64");
        let mut t = Tree::new();
        lay(d.path(), &mut t, &vars).unwrap();
        assert_eq!(
            t.read("etc/kiln/motd").unwrap().as_ref(),
            b"hello n1 on x86_64\n"
        );
        assert!(t.get("etc/kiln/motd.tera").is_none());
        assert_eq!(t.get("etc/plain").unwrap().mode, 0o644);
        assert_eq!(
            t.get("etc/link").unwrap().kind,
            crate::tree::Kind::Symlink("plain".into())
        );
    }

    #[test]
    fn a_missing_variable_names_the_template() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("x.tera"), "{{ nope }}").unwrap();
        let e = lay(d.path(), &mut Tree::new(), &tera::Context::new()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("x.tera") && msg.contains("nope"), "{msg}");
    }
}
