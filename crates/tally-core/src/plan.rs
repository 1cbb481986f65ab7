//! Plans: named rate-limit buckets, a monthly cap with a soft threshold, price bounds.
//! A [`Plan`] can only be built valid; the server's config turns raw TOML into plans.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::id::PlanName;
use crate::threshold::Thresholds;

/// Most rate-limit buckets one plan may have.
pub const PLAN_BUCKETS_MAX: usize = 8;
/// Longest rate-limit window: one day (`w` of the `RateLimit-Policy` header, in seconds).
pub const RATE_WINDOW_MS_MAX: u64 = 86_400_000;
/// Largest GCRA tolerance τ = T × burst (2^63 ns, 292 years), so that `now + τ` fits in
/// a u64 of nanoseconds until the year 2262.
const RATE_TOLERANCE_NS_MAX: u64 = 1 << 63;
/// Longest hold TTL a plan may allow: 7 days.
pub const HOLD_TTL_MS_MAX: u64 = 7 * 86_400_000;

/// One GCRA bucket: `quota` requests per `window_ms`, up to `burst` at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateBucket {
    pub name: String,
    pub quota: u32,
    pub window_ms: u64,
    pub burst: u32,
}

impl RateBucket {
    pub fn new(
        name: impl Into<String>,
        quota: u32,
        window_ms: u64,
        burst: u32,
    ) -> Result<Self, ValidationError> {
        let name = name.into();
        let invalid = |field, reason: &str| ValidationError::Invalid {
            field,
            reason: reason.to_owned(),
        };
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(invalid("bucket name", "1-64 characters of [A-Za-z0-9_-]"));
        }
        if quota == 0 {
            return Err(invalid("quota", "must be at least 1"));
        }
        if window_ms == 0 || window_ms > RATE_WINDOW_MS_MAX || !window_ms.is_multiple_of(1_000) {
            return Err(invalid("window_ms", "must be whole seconds, 1 s to 1 day"));
        }
        if burst == 0 {
            return Err(invalid("burst", "must be at least 1"));
        }
        let emission_interval_ns = window_ms * 1_000_000 / u64::from(quota);
        if emission_interval_ns == 0 {
            return Err(invalid("quota", "more than one request per nanosecond"));
        }
        if emission_interval_ns
            .checked_mul(u64::from(burst))
            .is_none_or(|tau_ns| tau_ns > RATE_TOLERANCE_NS_MAX)
        {
            return Err(invalid("burst", "burst x window / quota exceeds 292 years"));
        }
        Ok(Self {
            name,
            quota,
            window_ms,
            burst,
        })
    }

    /// GCRA's emission interval T: the time one request "costs", in nanoseconds.
    #[inline]
    pub fn emission_interval_ns(&self) -> u64 {
        self.window_ms * 1_000_000 / u64::from(self.quota)
    }

    /// GCRA's delay tolerance τ = T × burst, in nanoseconds.
    #[inline]
    pub fn tolerance_ns(&self) -> u64 {
        self.emission_interval_ns()
            .saturating_mul(u64::from(self.burst))
    }

    /// The `RateLimit-Policy` item of this bucket (`"default";q=100;w=60`).
    pub fn policy_header_item(&self) -> String {
        format!(
            "\"{}\";q={};w={}",
            self.name,
            self.quota,
            self.window_ms / 1_000
        )
    }
}

/// `price = cost × (1 + margin)`, rounded up to a micro, clamped to `[min, max]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pricing {
    /// Margin in parts per million: 200_000 is +20 %.
    pub margin_ppm: u64,
    pub min_micros: u64,
    pub max_micros: u64,
}

impl Default for Pricing {
    fn default() -> Self {
        Self {
            margin_ppm: 0,
            min_micros: 0,
            max_micros: u64::MAX,
        }
    }
}

/// A validated plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: PlanName,
    pub buckets: Vec<RateBucket>,
    /// Hard monthly spend cap; `None` is no cap.
    pub monthly_cap_micros: Option<u64>,
    /// Past this share of the cap, `priority = low` requests are denied.
    pub soft_threshold_pct: Option<u8>,
    /// Day of the month (UTC) on which a period starts, 1–28.
    pub anchor_day: u8,
    pub pricing: Pricing,
    /// Longest TTL a hold may ask for.
    pub hold_ttl_max_ms: u64,
    /// Notifications for agents on this plan (an agent's own replace them).
    pub thresholds: Thresholds,
}

impl Plan {
    /// Builds a plan and checks every field.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: PlanName,
        buckets: Vec<RateBucket>,
        monthly_cap_micros: Option<u64>,
        soft_threshold_pct: Option<u8>,
        anchor_day: u8,
        pricing: Pricing,
        hold_ttl_max_ms: u64,
    ) -> Result<Self, ValidationError> {
        let plan = Self {
            name,
            buckets,
            monthly_cap_micros,
            soft_threshold_pct,
            anchor_day,
            pricing,
            hold_ttl_max_ms,
            thresholds: Thresholds::default(),
        };
        plan.validate()?;
        Ok(plan)
    }

    /// An open plan: no rate limit, no cap, holds up to one hour.
    pub fn unlimited(name: PlanName) -> Self {
        Self {
            name,
            buckets: Vec::new(),
            monthly_cap_micros: None,
            soft_threshold_pct: None,
            anchor_day: 1,
            pricing: Pricing::default(),
            hold_ttl_max_ms: 3_600_000,
            thresholds: Thresholds::default(),
        }
    }

    /// This plan with notification thresholds.
    pub fn with_thresholds(mut self, thresholds: Thresholds) -> Result<Self, ValidationError> {
        self.thresholds = thresholds;
        self.validate()?;
        Ok(self)
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        let invalid = |field, reason: String| Err(ValidationError::Invalid { field, reason });
        if self.buckets.len() > PLAN_BUCKETS_MAX {
            return invalid("buckets", format!("at most {PLAN_BUCKETS_MAX}"));
        }
        for (i, b) in self.buckets.iter().enumerate() {
            RateBucket::new(b.name.clone(), b.quota, b.window_ms, b.burst)?;
            if self.buckets[..i].iter().any(|o| o.name == b.name) {
                return invalid("buckets", format!("bucket name {:?} used twice", b.name));
            }
        }
        if !(1..=28).contains(&self.anchor_day) {
            return invalid("anchor_day", "must be 1..=28".into());
        }
        if let Some(pct) = self.soft_threshold_pct {
            if !(1..=100).contains(&pct) {
                return invalid("soft_threshold_pct", "must be 1..=100".into());
            }
            if self.monthly_cap_micros.is_none() {
                return invalid("soft_threshold_pct", "needs monthly_cap_micros".into());
            }
        }
        if self.pricing.min_micros > self.pricing.max_micros {
            return invalid("pricing", "min_micros exceeds max_micros".into());
        }
        self.thresholds.validate()?;
        if self.thresholds.cap_spend_percent.is_some() && self.monthly_cap_micros.is_none() {
            return invalid("cap_spend_percent", "needs monthly_cap_micros".into());
        }
        if self.hold_ttl_max_ms == 0 || self.hold_ttl_max_ms > crate::plan::HOLD_TTL_MS_MAX {
            return invalid("hold_ttl_max_ms", format!("must be 1..={HOLD_TTL_MS_MAX}"));
        }
        Ok(())
    }

    /// The spend at which low-priority work pauses, if the plan has a soft threshold.
    pub fn soft_limit_micros(&self) -> Option<u64> {
        let cap = self.monthly_cap_micros?;
        let pct = self.soft_threshold_pct?;
        // cap × pct / 100 cannot overflow in u128 and fits back in u64 since pct ≤ 100.
        Some((u128::from(cap) * u128::from(pct) / 100) as u64)
    }

    /// The `RateLimit-Policy` header value for all buckets.
    pub fn policy_header(&self) -> String {
        self.buckets
            .iter()
            .map(RateBucket::policy_header_item)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The plans in force, by name. Agents refer to their plan by name, so a plan can change
/// under them; their journal does not depend on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanBook {
    plans: BTreeMap<PlanName, Plan>,
}

impl PlanBook {
    pub fn new(plans: impl IntoIterator<Item = Plan>) -> Self {
        Self {
            plans: plans.into_iter().map(|p| (p.name.clone(), p)).collect(),
        }
    }

    pub fn get(&self, name: &PlanName) -> Option<&Plan> {
        self.plans.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Plan> {
        self.plans.values()
    }

    pub fn len(&self) -> usize {
        self.plans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan::unlimited(PlanName::new("p").expect("valid"))
    }

    #[test]
    fn bucket_edges() {
        assert!(RateBucket::new("default", 10, 1_000, 10).is_ok());
        assert!(RateBucket::new("default", 0, 1_000, 10).is_err());
        assert!(RateBucket::new("default", 10, 0, 10).is_err());
        assert!(RateBucket::new("default", 10, 1_500, 10).is_err());
        assert!(RateBucket::new("default", 10, RATE_WINDOW_MS_MAX, 10).is_ok());
        assert!(RateBucket::new("default", 10, RATE_WINDOW_MS_MAX + 1_000, 10).is_err());
        assert!(RateBucket::new("default", 10, 1_000, 0).is_err());
        assert!(RateBucket::new("bad name", 10, 1_000, 1).is_err());
        // τ = T × burst must fit: one per day with a burst of 10^6 is 2,739 years.
        assert!(RateBucket::new("default", 1, RATE_WINDOW_MS_MAX, 1_000_000).is_err());
        assert!(RateBucket::new("default", 1, RATE_WINDOW_MS_MAX, u32::MAX).is_err());
        // 106,751 days of tolerance (just under 2^63 ns) is the most a bucket may have.
        assert!(RateBucket::new("default", 1, RATE_WINDOW_MS_MAX, 106_751).is_ok());
        assert!(RateBucket::new("default", 1, RATE_WINDOW_MS_MAX, 106_752).is_err());
        assert!(RateBucket::new("default", 1_000_000_000, 1_000, u32::MAX).is_ok());
        let b = RateBucket::new("default", 100, 60_000, 100).expect("valid");
        assert_eq!(b.emission_interval_ns(), 600_000_000);
        assert_eq!(b.policy_header_item(), "\"default\";q=100;w=60");
    }

    #[test]
    fn plan_validation() {
        let mut p = plan();
        assert!(p.validate().is_ok());
        p.anchor_day = 0;
        assert!(p.validate().is_err());
        p.anchor_day = 28;
        assert!(p.validate().is_ok());
        p.anchor_day = 29;
        assert!(p.validate().is_err());
        p.anchor_day = 1;
        p.soft_threshold_pct = Some(80);
        assert!(p.validate().is_err(), "soft threshold without a cap");
        p.monthly_cap_micros = Some(1_000);
        assert!(p.validate().is_ok());
        assert_eq!(p.soft_limit_micros(), Some(800));
        p.soft_threshold_pct = Some(101);
        assert!(p.validate().is_err());
        p.soft_threshold_pct = None;
        p.buckets = vec![RateBucket::new("a", 1, 1_000, 1).expect("valid"); 2];
        assert!(p.validate().is_err(), "duplicate bucket names");
    }

    #[test]
    fn soft_limit_never_overflows() {
        let mut p = plan();
        p.monthly_cap_micros = Some(u64::MAX);
        p.soft_threshold_pct = Some(100);
        assert_eq!(p.soft_limit_micros(), Some(u64::MAX));
    }
}
