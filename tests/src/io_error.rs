//! The harness's one file-system error: what was being done, to which path, and why it failed.
//! Each module's error enum carries it as `Io(#[from] IoError)`, so `.map_err(io(..))?` works
//! everywhere.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

/// An I/O operation on a path failed, e.g. "writing /w/l1-script.sh".
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}")]
pub struct IoError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Maps an `std::io::Error` of `action` ("reading", "writing", ...) on `path` to an
/// [`IoError`]: `std::fs::write(p, b).map_err(io("writing", p))?`.
pub fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IoError {
    let path = path.to_path_buf();
    move |source| IoError {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn says_what_failed_on_which_path() {
        let err = io("reading", Path::new("/no/such"))(std::io::Error::from(
            std::io::ErrorKind::NotFound,
        ));
        assert_eq!(err.to_string(), "reading /no/such");
        assert_eq!(
            err.source().map(ToString::to_string),
            Some(std::io::Error::from(std::io::ErrorKind::NotFound).to_string())
        );
    }
}
