//! `drover-host`: what every Drover process needs from its host, once.
//!
//! Layout:
//! - [`fs`]: durable writes (temp file in the same directory, fsync, rename, directory
//!   fsync) and private files (mode 0600, refused on read when others may read them).
//! - [`clock`]: the [`clock::Clock`] trait with a system and a manual clock. The only place
//!   that reads the wall clock.
//! - [`crash`]: `--crash-at POINT:N` fault injection for the SIGKILL tests.
//! - [`ct_eq`]: constant-time comparison of secrets.
//! - [`prom`]: Prometheus text exposition (histograms in seconds, escaped labels) for the
//!   agent's and the control plane's `/metrics`.
//!
//! Architecture invariant: no async runtime, no network, no SQL; the pure cores above
//! this crate take time as an argument instead of calling [`clock::now_ms`].

pub mod clock;
pub mod crash;
pub mod fs;
pub mod prom;

/// Compares two byte strings in time that depends only on their lengths, for passwords,
/// tokens and MACs.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn ct_eq_compares_content_and_length() {
        assert!(super::ct_eq(b"abc", b"abc"));
        assert!(!super::ct_eq(b"abc", b"abd"));
        assert!(!super::ct_eq(b"abc", b"abcd"));
        assert!(super::ct_eq(b"", b""));
    }
}
