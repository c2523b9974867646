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
//! Liveness is read from `/proc/<pid>` (Linux, where these daemons run).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::Failure;

/// A pid file we wrote; removed on drop.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    /// Write our pid to `path`, unless it names another live process.
    pub fn create(path: &Path) -> Result<PidFile, Failure> {
        let pid = std::process::id();
        // Two tries: the second follows the removal of a stale file.
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut f) => {
                    f.write_all(format!("{pid}\n").as_bytes()).map_err(|e| {
                        Failure::Failed(format!("pid file {}: cannot write: {e}", path.display()))
                    })?;
                    return Ok(PidFile {
                        path: path.to_path_buf(),
                        pid,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if let Some(other) = read_pid(path) {
                        if other != pid && alive(other) {
                            return Err(Failure::Conflict(format!(
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
                            return Err(Failure::Failed(format!(
                                "pid file {}: cannot remove the stale file: {e}",
                                path.display()
                            )))
                        }
                    }
                }
                Err(e) => {
                    return Err(Failure::Failed(format!(
                        "pid file {}: cannot create: {e}",
                        path.display()
                    )))
                }
            }
        }
        Err(Failure::Conflict(format!(
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
fn rewrite_in_place(path: &Path, pid: u32) -> Result<PidFile, Failure> {
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Failure::Failed(format!("pid file {}: cannot write: {e}", path.display())))?;
    f.write_all(format!("{pid}\n").as_bytes())
        .map_err(|e| Failure::Failed(format!("pid file {}: cannot write: {e}", path.display())))?;
    Ok(PidFile {
        path: path.to_path_buf(),
        pid,
    })
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
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

    #[test]
    fn a_live_pid_refuses() {
        let p = tmp("c");
        // pid 1 is always alive, and never us in a test.
        std::fs::write(&p, "1\n").unwrap();
        let err = PidFile::create(&p).unwrap_err();
        assert!(matches!(err, Failure::Conflict(_)), "{err}");
        assert_eq!(read_pid(&p), Some(1), "the live file is left alone");
        std::fs::remove_file(&p).unwrap();
    }
}
