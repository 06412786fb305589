//! The file on disk: replaced atomically by flanneld, read by it at start and by the plugin.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::parse::{self, Rules};
use crate::{EnvError, SubnetEnv};

/// Consumers (the CNI plugin, scripts) read the file as another user, so it is world-readable.
const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> EnvError {
    let path = path.to_path_buf();
    move |error| EnvError::Io { path, op, error }
}

impl SubnetEnv {
    /// Reads the file with the plugin's rules ([`SubnetEnv::parse`]); a missing file is an
    /// error like any other read failure.
    pub fn load(path: &Path) -> Result<Self, EnvError> {
        let text = fs::read_to_string(path).map_err(io_err(path, "read"))?;
        parse_at(&text, path, Rules::PLUGIN)
    }

    /// Reads flanneld's old file with flanneld's rules ([`SubnetEnv::parse_lenient`]);
    /// `Ok(None)` when the file does not exist.
    pub fn read_lenient(path: &Path) -> Result<Option<Self>, EnvError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(path, "read")(e)),
        };
        parse_at(&text, path, Rules::FLANNELD).map(Some)
    }

    /// Replaces the file at `path` in one step, so a reader sees the old or the new content,
    /// never a torn one. `path` itself is never opened: a symlink planted there is replaced,
    /// not followed.
    pub fn write_atomic(&self, path: &Path) -> Result<(), EnvError> {
        let name = path.file_name().ok_or_else(|| EnvError::Io {
            path: path.to_path_buf(),
            op: "choose a temporary file",
            error: io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
        })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(io_err(dir, "create the directory"))?;
        let (tmp, file) = create_temp(dir, &name.to_string_lossy())?;
        let written = fill(file, &tmp, self.render().as_bytes()).and_then(|()| {
            fs::rename(&tmp, path).map_err(io_err(path, "rename the new file into place"))
        });
        if written.is_err() {
            // Best effort: the error being returned matters more than a stray temp file.
            let _ = fs::remove_file(&tmp);
        }
        written?;
        sync_dir(dir);
        Ok(())
    }
}

fn parse_at(text: &str, path: &Path, rules: Rules) -> Result<SubnetEnv, EnvError> {
    parse::parse(text, rules).map_err(|problem| EnvError::Invalid {
        path: Some(path.to_path_buf()),
        problem,
    })
}

/// A fresh file next to the target (so the rename stays on one filesystem), created with
/// O_EXCL so that nothing already there, a symlink included, is ever opened. The name is
/// unpredictable (std's per-process random hash keys) so that nobody can squat on it.
fn create_temp(dir: &Path, name: &str) -> Result<(PathBuf, File), EnvError> {
    let mut last = None;
    for attempt in 0..16u32 {
        let salt = RandomState::new().hash_one((std::process::id(), attempt));
        let tmp = dir.join(format!(".{name}.{salt:016x}.tmp"));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(io_err(&tmp, "create a temporary file")(e)),
        }
    }
    let error = last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists));
    Err(io_err(dir, "create a temporary file")(error))
}

fn fill(mut file: File, tmp: &Path, bytes: &[u8]) -> Result<(), EnvError> {
    file.write_all(bytes).map_err(io_err(tmp, "write"))?;
    // The creation mode was narrowed by the umask; consumers need exactly 0644.
    file.set_permissions(Permissions::from_mode(FILE_MODE))
        .map_err(io_err(tmp, "set the mode of"))?;
    file.sync_all().map_err(io_err(tmp, "sync"))
}

/// Makes the rename durable. Best effort: some filesystems refuse fsync on a directory, and the
/// file is already complete and in place either way.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
