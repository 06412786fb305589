//! The private key file (`/run/flannel/wgkey` or `$WIREGUARD_KEY_FILE`): base64, flannel's
//! format. Created atomically with mode 0600 (a temporary file made with `O_EXCL` and mode
//! 0600 from the start, then renamed), so no one can open it before it is private. The key is
//! never logged.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::config::{decode_key, encode_key};

pub const DEFAULT_PATH: &str = "/run/flannel/wgkey";
pub const ENV: &str = "WIREGUARD_KEY_FILE";

/// Where the key file is: `$WIREGUARD_KEY_FILE` or flannel's default.
pub fn path_from_env() -> PathBuf {
    std::env::var_os(ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_PATH), PathBuf::from)
}

/// What happened to the key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Read,
    Created,
}

/// A fresh private key, clamped as `wg genkey` clamps it.
fn generate() -> io::Result<Zeroizing<[u8; 32]>> {
    use rand::TryRngCore;
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng
        .try_fill_bytes(&mut key[..])
        .map_err(|e| io::Error::other(format!("the system's random source: {e}")))?;
    key[0] &= 248;
    key[31] = (key[31] & 127) | 64;
    Ok(key)
}

/// Reads the key at `path`, or creates one there when the file does not exist.
pub fn load_or_create(path: &Path) -> io::Result<(Zeroizing<[u8; 32]>, Origin)> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let text = Zeroizing::new(text);
            let mode = fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    "wireguard: private key file {} has mode {:o}: readable by others than its owner",
                    path.display(),
                    mode & 0o777
                );
            }
            let key = decode_key(&text).map_err(|why| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("private key file {}: {why}", path.display()),
                )
            })?;
            Ok((Zeroizing::new(key), Origin::Read))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = generate()?;
            create(path, &key)?;
            Ok((key, Origin::Created))
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("reading private key file {}: {e}", path.display()),
        )),
    }
}

/// Writes `key` to `path` through a private temporary file renamed into place.
fn create(path: &Path, key: &[u8; 32]) -> io::Result<()> {
    let ctx = |what: &str| {
        let p = path.display().to_string();
        let what = what.to_string();
        move |e: io::Error| io::Error::new(e.kind(), format!("{what} {p}: {e}"))
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(ctx("creating the directory of"))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "wgkey".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(encode_key(key).as_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(ctx("writing private key file")(e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        ctx("renaming into place private key file")(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_key_file_is_created_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/wgkey");
        let (key, origin) = load_or_create(&path).unwrap();
        assert_eq!(origin, Origin::Created);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            encode_key(&key),
            "base64, no newline, as flannel writes it"
        );
        let (again, origin) = load_or_create(&path).unwrap();
        assert_eq!((origin, *again), (Origin::Read, *key));
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_key_written_by_wg_genkey_with_a_newline_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgkey");
        let key = [7u8; 32];
        fs::write(&path, format!("  {}\n", encode_key(&key))).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(*load_or_create(&path).unwrap().0, key);
    }

    #[test]
    fn a_bad_key_file_is_an_error_naming_the_file_not_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgkey");
        fs::write(&path, "c2VjcmV0LXNob3J0").unwrap();
        let e = load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(
            e.contains("12 bytes") && !e.contains("c2VjcmV0LXNob3J0"),
            "{e}"
        );
    }

    #[test]
    fn generated_keys_differ_and_are_clamped() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        assert_ne!(*a, *b);
        assert_eq!(a[0] & 7, 0);
        assert_eq!(a[31] & 0xc0, 0x40);
    }
}
