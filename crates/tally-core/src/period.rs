//! Monthly periods in UTC with an optional anchor day: which period a moment falls in,
//! and when that period resets.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::TimestampMs;

/// A billing period, named by the month its first day falls in (`2026-11`), stored as
/// `year × 100 + month` so keys order by time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct PeriodKey(u32);

impl PeriodKey {
    pub fn new(year: i32, month: u32) -> Result<Self, ValidationError> {
        if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) {
            return Err(ValidationError::Invalid {
                field: "period",
                reason: format!("{year}-{month:02} is not a month between 1970-01 and 9999-12"),
            });
        }
        Ok(Self(year as u32 * 100 + month))
    }

    pub fn year(self) -> i32 {
        (self.0 / 100) as i32
    }

    pub fn month(self) -> u32 {
        self.0 % 100
    }

    pub fn as_u32(self) -> u32 {
        self.0
    }

    /// First moment of this period for the given anchor day.
    pub fn start_ms(self, anchor_day: u8) -> TimestampMs {
        month_day_ms(self.year(), self.month(), anchor_day)
    }

    /// First moment of the next period: `resets_at`.
    pub fn end_ms(self, anchor_day: u8) -> TimestampMs {
        let (y, m) = next_month(self.year(), self.month());
        month_day_ms(y, m, anchor_day)
    }
}

impl fmt::Display for PeriodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year(), self.month())
    }
}

impl fmt::Debug for PeriodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for PeriodKey {
    type Err = ValidationError;
    /// Parses exactly `YYYY-MM`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ValidationError::Invalid {
            field: "period",
            reason: "expected YYYY-MM".to_owned(),
        };
        let b = s.as_bytes();
        if b.len() != 7
            || b[4] != b'-'
            || !b
                .iter()
                .enumerate()
                .all(|(i, c)| i == 4 || c.is_ascii_digit())
        {
            return Err(bad());
        }
        let year = s[..4].parse().map_err(|_| bad())?;
        let month = s[5..].parse().map_err(|_| bad())?;
        Self::new(year, month)
    }
}

fn next_month(year: i32, month: u32) -> (i32, u32) {
    if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    }
}

fn month_day_ms(year: i32, month: u32, day: u8) -> TimestampMs {
    let date = NaiveDate::from_ymd_opt(year, month, u32::from(day))
        .expect("anchor days are 1..=28 and months 1..=12, so the date exists");
    let at = Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight exists"));
    u64::try_from(at.timestamp_millis()).expect("periods start after 1970")
}

/// The period containing `now_ms` for a plan whose periods start on `anchor_day`.
pub fn period_of(now_ms: TimestampMs, anchor_day: u8) -> PeriodKey {
    let anchor_day = anchor_day.clamp(1, 28);
    let now_ms = i64::try_from(now_ms).unwrap_or(i64::MAX);
    let at: DateTime<Utc> = DateTime::from_timestamp_millis(now_ms)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
        .min(
            Utc.with_ymd_and_hms(9999, 12, 1, 0, 0, 0)
                .single()
                .expect("valid date"),
        );
    let (mut year, mut month) = (at.year(), at.month());
    if at.day() < u32::from(anchor_day) {
        if month == 1 {
            year -= 1;
            month = 12;
        } else {
            month -= 1;
        }
    }
    if year < 1970 {
        // Before the first period we can name: count it in the first.
        return PeriodKey(197_001);
    }
    PeriodKey::new(year, month).expect("year and month are in range")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i32, m: u32, d: u32, h: u32, mi: u32, s: u32) -> u64 {
        Utc.with_ymd_and_hms(y, m, d, h, mi, s)
            .single()
            .expect("valid")
            .timestamp_millis() as u64
    }

    #[test]
    fn calendar_months_dec_31_to_jan_1() {
        let last = ms(2026, 12, 31, 23, 59, 59) + 999;
        let p = period_of(last, 1);
        assert_eq!(p.to_string(), "2026-12");
        assert_eq!(p.end_ms(1), ms(2027, 1, 1, 0, 0, 0));
        assert_eq!(p.end_ms(1), last + 1);
        let next = period_of(last + 1, 1);
        assert_eq!(next.to_string(), "2027-01");
        assert_eq!(next.start_ms(1), last + 1);
    }

    #[test]
    fn leap_day_and_february() {
        let leap = ms(2028, 2, 29, 12, 0, 0);
        let p = period_of(leap, 1);
        assert_eq!(p.to_string(), "2028-02");
        assert_eq!(p.end_ms(1), ms(2028, 3, 1, 0, 0, 0));
        // With anchor 28, Feb 29 belongs to the period that started Feb 28.
        let p28 = period_of(leap, 28);
        assert_eq!(p28.to_string(), "2028-02");
        assert_eq!(p28.start_ms(28), ms(2028, 2, 28, 0, 0, 0));
        assert_eq!(p28.end_ms(28), ms(2028, 3, 28, 0, 0, 0));
        // Non-leap year: Mar 1 is the day after Feb 28.
        assert_eq!(period_of(ms(2027, 3, 1, 0, 0, 0), 1).to_string(), "2027-03");
        assert_eq!(
            period_of(ms(2027, 2, 28, 23, 59, 59), 1).to_string(),
            "2027-02"
        );
    }

    #[test]
    fn anchor_day_splits_months() {
        // Anchor 15: Jan 14 belongs to the December period, Jan 15 starts January's.
        assert_eq!(
            period_of(ms(2027, 1, 14, 23, 59, 59), 15).to_string(),
            "2026-12"
        );
        assert_eq!(
            period_of(ms(2027, 1, 15, 0, 0, 0), 15).to_string(),
            "2027-01"
        );
        let dec = period_of(ms(2027, 1, 1, 0, 0, 0), 15);
        assert_eq!(dec.start_ms(15), ms(2026, 12, 15, 0, 0, 0));
        assert_eq!(dec.end_ms(15), ms(2027, 1, 15, 0, 0, 0));
        // A 31-day month with anchor 28 runs to the 28th of the next month.
        let jan = period_of(ms(2027, 1, 31, 0, 0, 0), 28);
        assert_eq!(jan.to_string(), "2027-01");
        assert_eq!(jan.end_ms(28), ms(2027, 2, 28, 0, 0, 0));
    }

    #[test]
    fn parse_and_display() {
        assert_eq!(
            "2026-11".parse::<PeriodKey>().map(|p| p.as_u32()),
            Ok(202_611)
        );
        for bad in [
            "2026-13",
            "2026-00",
            "2026-1",
            "26-11",
            "2026/11",
            "2026-11x",
            "",
            "١٢٣٤-11",
        ] {
            assert!(bad.parse::<PeriodKey>().is_err(), "{bad}");
        }
        assert!(PeriodKey::new(2026, 11).expect("valid") < PeriodKey::new(2027, 1).expect("valid"));
    }

    #[test]
    fn extreme_times_do_not_panic() {
        assert_eq!(period_of(0, 1).to_string(), "1970-01");
        assert_eq!(period_of(0, 15).to_string(), "1970-01");
        let far = period_of(u64::MAX, 1);
        assert_eq!(far.to_string(), "9999-12");
    }
}
