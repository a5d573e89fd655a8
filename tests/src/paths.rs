//! Where the workspace, its build outputs and the testbed's caches live.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` when set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// A binary of `cargo build --release`, e.g. `release_bin("atoll")`.
pub fn release_bin(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

/// Downloaded and extracted kernel packages, kept across runs.
pub fn cache_dir() -> PathBuf {
    target_dir().join("testbed-cache")
}

/// Work directories of testbed runs (console logs, L2 logs, generated initramfs images).
pub fn runs_dir() -> PathBuf {
    target_dir().join("testbed")
}

/// A release binary the whole-VM tests need is not built.
#[derive(Debug, thiserror::Error)]
#[error("{} does not exist: these tests run after `cargo build --release --workspace`", .0.display())]
pub struct MissingBinary(pub PathBuf);

/// [`release_bin`], which must exist.
pub fn require_release_bin(name: &str) -> Result<PathBuf, MissingBinary> {
    let path = release_bin(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(MissingBinary(path))
    }
}
