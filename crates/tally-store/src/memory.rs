//! Process-wide memory settings that the engine's memory figures depend on, for the
//! binaries that run it (`tally serve`, the memory benchmark) to apply at start.

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` is set
/// (then mimalloc's own setting holds). mimalloc asks for huge pages on its arenas, and a
/// 2 MiB page that a few live records keep is resident whole: with a million agents, RSS
/// was ~45 MiB higher with them, and batched debits were no faster (README, "A million
/// agents"). Returns whether they were turned off; a kernel that refuses only costs memory.
pub fn disable_transparent_huge_pages() -> bool {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return false;
    }
    #[cfg(target_os = "linux")]
    {
        rustix::thread::disable_transparent_huge_pages(true).is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn huge_pages_are_turned_off_unless_mimalloc_is_told_otherwise() {
        // The test binary's own process: the flag only changes how its memory is backed.
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            assert!(!super::disable_transparent_huge_pages());
            return;
        }
        assert!(super::disable_transparent_huge_pages());
        assert_eq!(
            rustix::thread::transparent_huge_pages_are_disabled().ok(),
            Some(true)
        );
    }
}
