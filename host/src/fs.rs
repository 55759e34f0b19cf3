//! Crash-safe file writes with one guarantee: after `Ok`, the file holds exactly the new
//! bytes and survives a power cut (temp file in the same directory, fsync, rename,
//! directory fsync); before it, the old content is intact. Private files are created
//! 0600 and refused on read when group or others may read them.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}` and retry"
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
}

impl FsError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FsError + '_ {
        move |source| FsError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_with_mode(path, bytes, None)
}

/// Like [`write_atomic`], with mode 0600 from the first byte written.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_with_mode(path, bytes, Some(0o600)).map_err(FsError::io(path))
}

fn write_with_mode(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}{TMP_SUFFIX}"));
    let written = (|| {
        let mut opts = OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        if let Some(m) = mode {
            opts.mode(m);
        }
        let mut f = opts.open(&tmp)?;
        if let Some(m) = mode {
            // An existing temp file keeps its old mode through `open`: set it explicitly.
            f.set_permissions(fs::Permissions::from_mode(m))?;
        }
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        // A full disk must not also fill up with half-written temp files.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    crate::crash::point("fs.after_tmp_write");
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// How [`write_atomic`] names its temp file: `.<name>` + this.
pub const TMP_SUFFIX: &str = ".tmp";

/// Removes the temp files an interrupted [`write_atomic`] left in `dir` (a SIGKILL
/// between write and rename); returns how many. Call it before anything writes in `dir`.
pub fn remove_temp_files(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(TMP_SUFFIX) && entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Bytes an unprivileged writer may still use on the file system holding `path`
/// (`statvfs`: available blocks times fragment size).
pub fn free_space(path: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// fsyncs a directory so a rename or unlink in it survives a power cut.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Refuses a file that group or others may read (a private key, a token).
pub fn check_private(path: &Path) -> Result<(), FsError> {
    let mode = fs::metadata(path)
        .map_err(FsError::io(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(FsError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Reads a private file after [`check_private`].
pub fn read_private(path: &Path) -> Result<Vec<u8>, FsError> {
    check_private(path)?;
    fs::read(path).map_err(FsError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn temp_files_left_by_an_interrupted_write_are_removed_and_free_space_is_read() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".a.frame.tmp"), b"half").unwrap();
        fs::write(dir.path().join("a.frame"), b"kept").unwrap();
        fs::write(dir.path().join(".hidden"), b"kept").unwrap();
        assert_eq!(remove_temp_files(dir.path()).unwrap(), 1);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        assert_eq!(remove_temp_files(&dir.path().join("absent")).unwrap(), 0);
        assert!(free_space(dir.path()).unwrap() > 0);
    }

    #[test]
    fn private_files_are_0600_and_a_readable_one_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        write_private(&p, b"secret").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_private(&p).unwrap(), b"secret");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private(&p).unwrap_err();
        assert!(
            matches!(err, FsError::InsecurePermissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn rewriting_a_private_file_keeps_it_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        // A stale temp file with a loose mode must not leak its mode into the result.
        fs::write(dir.path().join(".key.tmp"), b"old").unwrap();
        fs::set_permissions(
            dir.path().join(".key.tmp"),
            fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        write_private(&p, b"k").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
