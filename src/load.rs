//! Reading policies from disk: the only place (with the gateway's config
//! loader) where the language side touches the file system.
//!
//! A policy is the set of `.route` files in one directory, read in name order.
//! A `.route` file named on its own is a policy of one file. A directory that
//! holds no `.route` files itself is searched recursively, and each directory
//! found with `.route` files is one policy: `routeplane check policies/`
//! checks every example policy separately.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::source::Sources;

/// One policy read from disk.
#[derive(Debug)]
pub struct PolicyDir {
    /// The directory (or the single file) the policy came from.
    pub root: PathBuf,
    pub sources: Sources,
}

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum LoadError {
    #[error("cannot read `{path}`: {source}")]
    #[diagnostic(code(route::io), help("check that the path exists and is readable"))]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("no `.route` files found under `{path}`")]
    #[diagnostic(
        code("route::no-policy"),
        help("a policy is a directory of `.route` files, or one `.route` file")
    )]
    Empty { path: String },
}

fn io(path: &Path, source: std::io::Error) -> LoadError {
    LoadError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Find and read every policy under the given paths.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PolicyDir>, LoadError> {
    let mut out = Vec::new();
    for path in paths {
        let before = out.len();
        let meta = std::fs::metadata(path).map_err(|e| io(path, e))?;
        if meta.is_file() {
            out.push(read_files(path, std::slice::from_ref(path))?);
        } else {
            discover_dir(path, &mut out, &mut HashSet::new())?;
        }
        if out.len() == before {
            return Err(LoadError::Empty {
                path: path.display().to_string(),
            });
        }
    }
    Ok(out)
}

/// Read exactly one policy: a `.route` file, or the `.route` files directly in a directory.
pub fn read_policy(path: &Path) -> Result<PolicyDir, LoadError> {
    let meta = std::fs::metadata(path).map_err(|e| io(path, e))?;
    if meta.is_file() {
        return read_files(path, &[path.to_path_buf()]);
    }
    let files = route_files(path)?;
    if files.is_empty() {
        return Err(LoadError::Empty {
            path: path.display().to_string(),
        });
    }
    read_files(path, &files)
}

fn route_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let p = entry.map_err(|e| io(dir, e))?.path();
        if p.extension().is_none_or(|e| e != "route") {
            continue;
        }
        // A `.route` entry that cannot be read (a dangling symlink after a
        // broken deploy, a FIFO) is an error, not skipped: a policy without
        // its `constraints.route` would still compile, and allow what the
        // missing rules denied.
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => files.push(p),
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(io(&p, std::io::Error::other("not a regular file"))),
            Err(e) => return Err(io(&p, e)),
        }
    }
    files.sort();
    Ok(files)
}

/// `seen` holds the directories already searched, resolved: a symlink back to
/// an ancestor (`ln -s .. loop`) would otherwise find the same policies again
/// under ever longer paths, and two such links made the search exponential.
fn discover_dir(
    dir: &Path,
    out: &mut Vec<PolicyDir>,
    seen: &mut HashSet<PathBuf>,
) -> Result<(), LoadError> {
    if let Ok(real) = std::fs::canonicalize(dir) {
        if !seen.insert(real) {
            return Ok(());
        }
    }
    let files = route_files(dir)?;
    if !files.is_empty() {
        out.push(read_files(dir, &files)?);
        return Ok(());
    }
    let mut subdirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let p = entry.map_err(|e| io(dir, e))?.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.') || n == "target");
        if p.is_dir() && !hidden {
            subdirs.push(p);
        }
    }
    subdirs.sort();
    for d in subdirs {
        discover_dir(&d, out, seen)?;
    }
    Ok(())
}

fn read_files(root: &Path, files: &[PathBuf]) -> Result<PolicyDir, LoadError> {
    let mut sources = Sources::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| io(f, e))?;
        // Invalid UTF-8 is replaced rather than refused, so that analysis
        // reports the bad bytes with a location instead of the loader failing blind.
        sources.add_bytes(f.display().to_string(), &bytes);
    }
    Ok(PolicyDir {
        root: root.to_path_buf(),
        sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_directory_with_route_files_is_one_policy() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("nested/b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("x.route"), "").unwrap();
        std::fs::write(a.join("y.route"), "").unwrap();
        std::fs::write(b.join("z.route"), "").unwrap();
        std::fs::write(b.join("notes.txt"), "").unwrap();
        let found = discover(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].sources.len(), 2);
        assert_eq!(found[1].sources.len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn symlink_loops_are_searched_once() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join("x.route"), "").unwrap();
        // A link back to the root found `a` again as self/a, self/self/a, ...
        // 41 times (until ELOOP); two such links took 2^40 searches.
        std::os::unix::fs::symlink(".", tmp.path().join("self")).unwrap();
        let found = discover(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].root, a);
        // The same policy named twice on the command line is still checked twice.
        let twice = discover(&[tmp.path().to_path_buf(), tmp.path().to_path_buf()]).unwrap();
        assert_eq!(twice.len(), 2);
    }

    #[cfg(unix)]
    #[test]
    fn a_dangling_route_symlink_is_an_error_not_a_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("models.route"), "").unwrap();
        std::os::unix::fs::symlink(
            tmp.path().join("gone/constraints.route"),
            tmp.path().join("constraints.route"),
        )
        .unwrap();
        let err = read_policy(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("constraints.route"), "{err}");
        assert!(discover(&[tmp.path().to_path_buf()]).is_err());
    }

    #[test]
    fn an_empty_directory_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            discover(&[tmp.path().to_path_buf()]),
            Err(LoadError::Empty { .. })
        ));
        assert!(matches!(
            discover(&[tmp.path().join("missing")]),
            Err(LoadError::Io { .. })
        ));
    }
}
