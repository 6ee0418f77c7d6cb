//! Opening a file of a local checkpoint so that nothing but a regular file below the root can
//! come back: every component below the root is opened with `O_NOFOLLOW` (a symlink anywhere
//! on the way is an error, even one swapped in after registration), the last one with
//! `O_NONBLOCK` (a FIFO does not hang the opener) and then checked with `fstat` to be a
//! regular file. The registry serves files through this; [`crate::reader::Checkpoint::verify`]
//! refuses the same things when it walks a step.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Why a file was not opened.
#[derive(Debug, thiserror::Error)]
pub enum PlainFileError {
    #[error("{key:?} is not a safe relative name")]
    BadKey { key: String },
    #[error("{path} does not exist")]
    NotFound { path: String },
    #[error("{path} is not a regular file (a symlink, a directory or a special file on the way)")]
    NotPlain { path: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn c_name(part: &[u8], key: &str) -> Result<CString, PlainFileError> {
    CString::new(part).map_err(|_| PlainFileError::BadKey { key: key.to_string() })
}

/// `openat(dir, name, flags)`, owned.
fn open_at(dir: libc::c_int, name: &CString, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the returned descriptor is owned by us.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open `key` (`a/b/c`, relative) below the directory `root` for reading; only a regular file,
/// reached without following any symlink below `root`, is returned.
pub fn open_plain(root: &Path, key: &str) -> Result<File, PlainFileError> {
    if !crate::reader::is_safe_key(key) {
        return Err(PlainFileError::BadKey { key: key.to_string() });
    }
    let shown = || root.join(key).display().to_string();
    let map = |e: io::Error| match e.raw_os_error() {
        Some(libc::ENOENT) => PlainFileError::NotFound { path: shown() },
        // ELOOP: a symlink where O_NOFOLLOW forbids one; ENOTDIR: a file where a directory
        // should be (or a symlink to one).
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => PlainFileError::NotPlain { path: shown() },
        _ => PlainFileError::Io {
            path: shown(),
            source: e,
        },
    };
    let root_c = c_name(root.as_os_str().as_bytes(), key)?;
    // The root itself may be reached through symlinks (it is the configured location).
    // SAFETY: valid C string; the descriptor is owned right below.
    let fd = unsafe { libc::open(root_c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(map(io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptor from open.
    let mut dir = unsafe { OwnedFd::from_raw_fd(fd) };
    let parts: Vec<&str> = key.split('/').collect();
    let (last, dirs) = parts.split_last().expect("a safe key has a segment");
    for part in dirs {
        dir = open_at(
            dir.as_raw_fd(),
            &c_name(part.as_bytes(), key)?,
            libc::O_RDONLY | libc::O_DIRECTORY,
        )
        .map_err(map)?;
    }
    let fd = open_at(
        dir.as_raw_fd(),
        &c_name(last.as_bytes(), key)?,
        libc::O_RDONLY | libc::O_NONBLOCK,
    )
    .map_err(map)?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(map)?;
    if !meta.file_type().is_file() {
        return Err(PlainFileError::NotPlain { path: shown() });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("gantry-plain-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("step/rank-00000")).unwrap();
        d
    }

    #[test]
    fn only_regular_files_below_the_root_open() {
        let d = tmp("open");
        std::fs::write(d.join("step/rank-00000/a.bin"), b"abc").unwrap();
        std::fs::write(d.join("secret"), b"s").unwrap();
        let mut f = open_plain(&d, "step/rank-00000/a.bin").unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!(s, "abc");
        // A symlink as the file, and as a directory on the way.
        std::os::unix::fs::symlink(d.join("secret"), d.join("step/rank-00000/b.bin")).unwrap();
        std::os::unix::fs::symlink(d.join("step/rank-00000"), d.join("step/rank-00001")).unwrap();
        assert!(matches!(
            open_plain(&d, "step/rank-00000/b.bin"),
            Err(PlainFileError::NotPlain { .. })
        ));
        assert!(matches!(
            open_plain(&d, "step/rank-00001/a.bin"),
            Err(PlainFileError::NotPlain { .. })
        ));
        // A FIFO does not hang, a directory is not a file, a missing file is NotFound.
        let fifo = CString::new(d.join("step/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            open_plain(&d, "step/fifo"),
            Err(PlainFileError::NotPlain { .. })
        ));
        assert!(matches!(
            open_plain(&d, "step/rank-00000"),
            Err(PlainFileError::NotPlain { .. })
        ));
        assert!(matches!(
            open_plain(&d, "step/nope"),
            Err(PlainFileError::NotFound { .. })
        ));
        for bad in ["../secret", "/etc/passwd", "step/../secret", "", "a//b"] {
            assert!(
                matches!(open_plain(&d, bad), Err(PlainFileError::BadKey { .. })),
                "{bad}"
            );
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
