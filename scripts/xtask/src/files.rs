// SPDX-License-Identifier: MIT OR Apache-2.0
//! Input files a user names (a config, a kernel ELF), read safely: only a regular file
//! (symlinks followed), its size checked against a limit before anything is read, and the
//! read itself bounded (a file that grows meanwhile is refused, never read on). A FIFO named
//! as a kernel would otherwise block `cargo xtask check` for ever, and a link to `/dev/zero`
//! would be read until memory runs out. The file is opened without blocking (a FIFO swapped
//! in after the first look does not block the open) and looked at again once open.
//!
//! Owns nothing; may call `std::fs` and `nix` (the open flag) only.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest config file `cargo xtask` reads (a config at every limit of the blob, 64
/// guests, 256 channels and 256 grants, is a few tens of KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// What kind of file `meta` describes, for an error.
fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Checks `meta` (of `path`, `what` it should be: "an ELF file") against the rules.
fn check(path: &Path, meta: &Metadata, limit: u64, what: &str) -> Result<(), String> {
    let shown = path.display();
    if !meta.is_file() {
        return Err(format!("{shown} is {}, not {what}", kind(meta)));
    }
    if meta.len() > limit {
        return Err(format!(
            "{shown} is {} bytes: larger than the {} for {what}",
            meta.len(),
            human(limit)
        ));
    }
    Ok(())
}

/// `limit` bytes as text (`16 MiB`).
fn human(limit: u64) -> String {
    match limit {
        l if l >= 1 << 20 && l % (1 << 20) == 0 => format!("{} MiB", l >> 20),
        l if l >= 1 << 10 && l % (1 << 10) == 0 => format!("{} KiB", l >> 10),
        l => format!("{l} bytes"),
    }
}

/// The contents of `path` if it is a regular file (after symlinks) of at most `limit`
/// bytes; otherwise an error naming the path and saying what is wrong. `what` is what the
/// file should be, with its article ("an ELF file", "a config file").
pub fn read(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    check(path, &meta, limit, what)?;
    let file = File::options()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    // The path may name another file by now: what was opened is what counts.
    let meta = file.metadata().map_err(|e| format!("cannot read {shown}: {e}"))?;
    check(path, &meta, limit, what)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{shown} grew past the {} for {what} while it was read", human(limit)));
    }
    Ok(bytes)
}

/// [`read`] of a config file (UTF-8 text of at most [`MAX_CONFIG_BYTES`]).
pub fn read_config(path: &Path) -> Result<String, String> {
    let bytes = read(path, MAX_CONFIG_BYTES, "a config file")?;
    String::from_utf8(bytes).map_err(|e| format!("{} is not UTF-8 text: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Runs `f` on another thread and fails if it takes more than 10 s (a read that blocks
    /// on a FIFO must not hang the test run).
    fn promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()).unwrap());
        rx.recv_timeout(Duration::from_secs(10)).expect("blocked instead of refusing")
    }

    #[test]
    fn a_regular_file_within_the_limit_is_read_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.elf");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read(&p, 10, "an ELF file").unwrap(), b"0123456789");
        // Through a symlink too: what counts is the file it leads to.
        let link = d.path().join("link.elf");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(read(&link, 10, "an ELF file").unwrap(), b"0123456789");
    }

    #[test]
    fn an_oversized_file_is_refused_before_it_is_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big.elf");
        std::fs::write(&p, vec![0u8; 11]).unwrap();
        let e = read(&p, 10, "an ELF file").unwrap_err();
        assert!(e.contains("big.elf is 11 bytes: larger than the 10 bytes for an ELF file"), "{e}");
        let f = File::create(d.path().join("sparse.toml")).unwrap();
        f.set_len(MAX_CONFIG_BYTES + 1).unwrap();
        let e = read_config(&d.path().join("sparse.toml")).unwrap_err();
        assert!(e.contains("larger than the 1 MiB for a config file"), "{e}");
    }

    #[test]
    fn a_fifo_is_refused_at_once() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fifo.elf");
        let made = std::process::Command::new("mkfifo").arg(&p).status().unwrap();
        assert!(made.success());
        let started = Instant::now();
        let e = promptly(move || read(&p, 16 << 20, "an ELF file")).unwrap_err();
        assert!(e.ends_with("fifo.elf is a FIFO, not an ELF file"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_device_and_a_symlink_to_one_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("zero.elf");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        for p in [Path::new("/dev/zero").to_path_buf(), link] {
            let shown = p.display().to_string();
            let e = promptly(move || read(&p, 16 << 20, "an ELF file")).unwrap_err();
            assert_eq!(e, format!("{shown} is a character device, not an ELF file"));
        }
        let e = read(Path::new("/"), 16 << 20, "a config file").unwrap_err();
        assert_eq!(e, "/ is a directory, not a config file");
        let e = read(&d.path().join("missing"), 1, "a config file").unwrap_err();
        assert!(e.starts_with("cannot read ") && e.contains("missing"), "{e}");
    }

    #[test]
    fn a_config_must_be_text() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(read_config(&p).unwrap_err().contains("is not UTF-8 text"));
    }
}
