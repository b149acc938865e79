//! What the running kernel is: its release, compared against the first release of a feature.

/// The running kernel's release (`uname -r`).
pub fn release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// Whether kernel `release` (e.g. `6.18.44-foo`) is `first` (major, minor) or later; `false`
/// when the release cannot be read as one.
pub fn release_at_least(release: &str, first: (u32, u32)) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse::<u32>().ok());
    match (numbers.next(), numbers.next()) {
        (Some(major), Some(minor)) => (major, minor) >= first,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_compare_by_major_then_minor() {
        assert!(release_at_least("6.18.44-fc-v657", (6, 2)));
        assert!(release_at_least("6.2.0", (6, 2)));
        assert!(release_at_least("7.0.1", (6, 2)));
        assert!(!release_at_least("6.1.119-1-cloud", (6, 2)));
        assert!(!release_at_least("5.13.0", (5, 14)));
        assert!(!release_at_least("garbage", (5, 14)));
    }
}
