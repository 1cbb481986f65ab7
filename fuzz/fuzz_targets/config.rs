//! Fuzzes `tally.toml` parsing and validation (`tally_server::Config::from_toml`) with
//! arbitrary text: never panics, and a config that validates is safe to run: its default
//! plan exists, every plan re-validates, and the core's rate limiter, periods and pricing
//! work under each plan without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_core::period::period_of;
use tally_core::pricing::price_micros;
use tally_core::RateState;
use tally_server::Config;

/// 2026-01-27T00:00:00Z.
const NOW_MS: u64 = 1_769_472_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::from_toml(text, "fuzz.toml") else {
        return;
    };
    assert!(cfg.plans.get(&cfg.default_plan).is_some(), "default plan missing");
    assert!(cfg.limits.page_limit_default <= cfg.limits.page_limit_max);
    for plan in cfg.plans.iter() {
        assert_eq!(plan.validate(), Ok(()), "a validated plan fails validate()");
        let _ = plan.policy_header();
        let _ = plan.soft_limit_micros();
        let period = period_of(NOW_MS, plan.anchor_day);
        assert!(period.end_ms(plan.anchor_day) > NOW_MS);
        let _ = price_micros(1_000_000, &plan.pricing);
        let mut rate = RateState::default();
        for at_ms in [NOW_MS, NOW_MS, NOW_MS + 1, NOW_MS + 86_400_000] {
            let _ = rate.peek(plan, at_ms);
            let _ = rate.acquire(plan, at_ms);
        }
    }
});
