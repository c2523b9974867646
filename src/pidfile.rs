//! `start --pid-file`: the daemons' pid file, as Caliopen's container
//! entrypoints ask for it (`imapworker start ... -p /imapworker.pid`).
//!
//! The Go daemons overwrote the file blindly and never removed it. Here a
//! pid file that names a live process other than us refuses the start (a
//! second daemon on the same file is a mistake, exit code 4 "conflict"); a
//! stale one (dead pid, garbage, or our own pid, as after a container restart
//! where the new process is pid 1 again) is replaced. The file is removed when
//! the [`PidFile`] is dropped, which `app` does after the daemon's shutdown
//! path has finished, and only while it still holds our pid.
//!
//! A stale file in a folder we may not write (the container image's `/`,
//! where its user owns only the pid files) is overwritten in place, and
//! emptied rather than removed at exit.
//!
//! Liveness is read from `/proc/<pid>` (Linux, where these daemons run),
//! and a live pid counts only when that process is one of ours: its
//! executable or its `argv[0]` is named `caliopen-imap`, `imapworker`,
//! `idpoller` or `imapctl` (or as our own executable). After a reboot, or in
//! a container whose pid file survived on a volume, the pid is often some
//! unrelated program's, which must not block the start.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why the pid file could not be written; the edge (`error.rs`) maps
/// [`PidFileError::Held`] to the conflict exit code, the rest to failure.
#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    /// Another live process of ours holds it.
    #[error("{0}")]
    Held(String),
    /// It could not be read, written or removed.
    #[error("{0}")]
    Io(String),
}

/// A pid file we wrote; removed on drop.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    /// Write our pid to `path`, unless it names another live process.
    pub fn create(path: &Path) -> Result<PidFile, PidFileError> {
        let pid = std::process::id();
        // Two tries: the second follows the removal of a stale file.
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut f) => {
                    f.write_all(format!("{pid}\n").as_bytes()).map_err(|e| {
                        PidFileError::Io(format!("pid file {}: cannot write: {e}", path.display()))
                    })?;
                    return Ok(PidFile {
                        path: path.to_path_buf(),
                        pid,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if let Some(other) = read_pid(path) {
                        if other != pid && ours(other) {
                            return Err(PidFileError::Held(format!(
                                "pid file {} names process {other}, which is running: \
                                 stop it first, or give another --pid-file",
                                path.display()
                            )));
                        }
                    }
                    tracing::info!(file = %path.display(), "replacing a stale pid file");
                    match std::fs::remove_file(path) {
                        Ok(()) => {}
                        // A folder we may not write (`/` for a container's
                        // non-root user) holding a file we may: reuse it.
                        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                            return rewrite_in_place(path, pid);
                        }
                        Err(e) => {
                            return Err(PidFileError::Io(format!(
                                "pid file {}: cannot remove the stale file: {e}",
                                path.display()
                            )))
                        }
                    }
                }
                Err(e) => {
                    return Err(PidFileError::Io(format!(
                        "pid file {}: cannot create: {e}",
                        path.display()
                    )))
                }
            }
        }
        Err(PidFileError::Held(format!(
            "pid file {}: another process keeps creating it",
            path.display()
        )))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Someone may have replaced it (a forced second start): leave theirs.
        if read_pid(&self.path) == Some(self.pid) {
            let gone = match std::fs::remove_file(&self.path) {
                // Not removable (see `rewrite_in_place`): an empty file is
                // stale for the next start.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    std::fs::write(&self.path, b"")
                }
                other => other,
            };
            if let Err(e) = gone {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot remove the pid file");
            }
        }
    }
}

/// Overwrite a stale pid file we cannot remove, as in a container image
/// whose non-root user owns `/imapworker.pid` but not `/`. Not atomic
/// against a second start on the same file, as the Go daemons' write was not.
fn rewrite_in_place(path: &Path, pid: u32) -> Result<PidFile, PidFileError> {
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| PidFileError::Io(format!("pid file {}: cannot write: {e}", path.display())))?;
    f.write_all(format!("{pid}\n").as_bytes())
        .map_err(|e| PidFileError::Io(format!("pid file {}: cannot write: {e}", path.display())))?;
    Ok(PidFile {
        path: path.to_path_buf(),
        pid,
    })
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The names this program runs under: the multi-call binary and the three
/// names of Caliopen's binaries it stands in for.
const OUR_NAMES: [&str; 4] = ["caliopen-imap", "imapworker", "idpoller", "imapctl"];

/// Is `pid` a live process of this program? When `/proc` cannot say what it
/// runs (another user's process under `hidepid`), it is taken as ours: a
/// refused start is better than two daemons on one file.
fn ours(pid: u32) -> bool {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    if pid == 0 || !dir.exists() {
        return false;
    }
    let exe = std::fs::read_link(dir.join("exe"));
    let cmdline = std::fs::read(dir.join("cmdline"));
    if let Ok(exe) = &exe {
        // An upgraded binary shows as "/path (deleted)".
        let exe = exe.to_string_lossy();
        let exe = Path::new(exe.trim_end_matches(" (deleted)"));
        if is_our_name(exe) || std::env::current_exe().is_ok_and(|me| me == exe) {
            return true;
        }
    }
    if let Ok(cmdline) = &cmdline {
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        if is_our_name(Path::new(&*String::from_utf8_lossy(argv0))) {
            return true;
        }
    }
    exe.is_err() && cmdline.is_err()
}

/// Is the file name of `path` one of [`OUR_NAMES`], or our own executable's?
fn is_our_name(path: &Path) -> bool {
    let Some(name) = path.file_name() else {
        return false;
    };
    OUR_NAMES.iter().any(|n| name == *n)
        || std::env::current_exe().is_ok_and(|me| me.file_name() == Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("pidfile-{}-{name}", std::process::id()))
    }

    #[test]
    fn written_then_removed() {
        let p = tmp("a");
        let _ = std::fs::remove_file(&p);
        let f = PidFile::create(&p).unwrap();
        assert_eq!(read_pid(&p), Some(std::process::id()));
        drop(f);
        assert!(!p.exists());
    }

    #[test]
    fn stale_or_own_or_garbage_is_replaced() {
        let p = tmp("b");
        for content in ["999999999\n", "not a pid", ""] {
            std::fs::write(&p, content).unwrap();
            let f = PidFile::create(&p).unwrap();
            assert_eq!(read_pid(&p), Some(std::process::id()));
            drop(f);
        }
        // Our own pid: a container restarted with the same pid 1.
        std::fs::write(&p, std::process::id().to_string()).unwrap();
        drop(PidFile::create(&p).unwrap());
        assert!(!p.exists());
    }

    /// A live process started as `name` (a symlink to `sleep`), killed on drop.
    struct Named(std::process::Child);

    impl Named {
        fn start(name: &str) -> Named {
            let dir = tmp(&format!("bin-{name}"));
            std::fs::create_dir_all(&dir).unwrap();
            let link = dir.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink("/bin/sleep", &link).unwrap();
            let child = std::process::Command::new(&link).arg("60").spawn().unwrap();
            // Seen once: the child's /proc entry did not yet show its new
            // argv[0]. Wait (bounded) until it does, so the test checks
            // `ours`, not the kernel's pace.
            let cmdline = PathBuf::from(format!("/proc/{}/cmdline", child.id()));
            for _ in 0..500 {
                let argv0 = std::fs::read(&cmdline).unwrap_or_default();
                if argv0.split(|b| *b == 0).next() == Some(link.as_os_str().as_encoded_bytes()) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Named(child)
        }
    }

    impl Drop for Named {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_live_daemon_of_ours_refuses() {
        let p = tmp("c");
        let other = Named::start("imapworker");
        let pid = other.0.id();
        std::fs::write(&p, format!("{pid}\n")).unwrap();
        let err = PidFile::create(&p).unwrap_err();
        assert!(matches!(err, PidFileError::Held(_)), "{err}");
        assert_eq!(read_pid(&p), Some(pid), "the live file is left alone");
        std::fs::remove_file(&p).unwrap();
    }

    /// After a reboot or in a container the pid is often some other
    /// program's: not ours, so the file is stale.
    #[test]
    fn a_live_unrelated_process_does_not_block() {
        let p = tmp("d");
        let other = Named::start("sleep");
        std::fs::write(&p, format!("{}\n", other.0.id())).unwrap();
        let f = PidFile::create(&p).unwrap();
        assert_eq!(read_pid(&p), Some(std::process::id()));
        drop(f);
        assert!(!p.exists());
    }
}
