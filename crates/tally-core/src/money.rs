//! Money: integer micro-units (1 unit = 1,000,000 micros, USDC's atomic scale), checked sums.

use crate::error::{CommandError, ValidationError};

/// Micros in one unit of currency.
pub const MICROS_PER_UNIT: u64 = 1_000_000;
/// Fractional digits a decimal amount may have.
pub const DECIMALS_MAX: usize = 6;

/// `a + b`, or [`CommandError::Overflow`].
#[inline]
pub fn add(a: u64, b: u64) -> Result<u64, CommandError> {
    a.checked_add(b).ok_or(CommandError::Overflow)
}

/// `a - b`, or [`CommandError::Overflow`] when it would go below zero.
#[inline]
pub fn sub(a: u64, b: u64) -> Result<u64, CommandError> {
    a.checked_sub(b).ok_or(CommandError::Overflow)
}

/// Parses a decimal amount of units (`"12.5"`, `"0.000001"`) into micros. Signs,
/// exponents, spaces and more than six decimals are rejected, never rounded.
pub fn parse_units(text: &str) -> Result<u64, ValidationError> {
    let invalid = |reason: &str| ValidationError::Invalid {
        field: "amount",
        reason: reason.to_owned(),
    };
    let (whole, frac) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty()
        || !digits(whole)
        || !digits(frac)
        || (text.contains('.') && frac.is_empty())
    {
        return Err(invalid(
            "expected digits with an optional '.' and up to 6 decimals",
        ));
    }
    if frac.len() > DECIMALS_MAX {
        return Err(invalid("more than 6 decimals"));
    }
    let whole: u64 = whole.parse().map_err(|_| invalid("too large"))?;
    let mut frac_micros: u64 = 0;
    for (i, b) in frac.bytes().enumerate() {
        frac_micros += u64::from(b - b'0') * 10u64.pow((DECIMALS_MAX - 1 - i) as u32);
    }
    whole
        .checked_mul(MICROS_PER_UNIT)
        .and_then(|w| w.checked_add(frac_micros))
        .ok_or_else(|| invalid("too large"))
}

/// Formats micros as a decimal amount of units with six decimals (`"12.500000"`).
pub fn format_units(micros: u64) -> String {
    format!(
        "{}.{:06}",
        micros / MICROS_PER_UNIT,
        micros % MICROS_PER_UNIT
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_sums_reject_overflow() {
        assert_eq!(add(u64::MAX - 1, 1), Ok(u64::MAX));
        assert_eq!(add(u64::MAX, 1), Err(CommandError::Overflow));
        assert_eq!(sub(5, 5), Ok(0));
        assert_eq!(sub(5, 6), Err(CommandError::Overflow));
    }

    #[test]
    fn parses_decimal_units() {
        assert_eq!(parse_units("0"), Ok(0));
        assert_eq!(parse_units("1"), Ok(1_000_000));
        assert_eq!(parse_units("12.5"), Ok(12_500_000));
        assert_eq!(parse_units("0.000001"), Ok(1));
        assert_eq!(parse_units("18446744073709.551615"), Ok(u64::MAX));
    }

    #[test]
    fn rejects_negative_looking_and_malformed_amounts() {
        for bad in [
            "",
            "-1",
            "-0",
            "+1",
            "1e5",
            " 1",
            "1 ",
            "1.",
            ".5",
            "1.2.3",
            "0x10",
            "1,5",
            "٣",
            "0.0000001",
            "18446744073709.551616",
            "99999999999999999999",
        ] {
            assert!(parse_units(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn formats_round_trip() {
        for m in [0, 1, 999_999, 1_000_000, 12_500_000, u64::MAX] {
            assert_eq!(parse_units(&format_units(m)), Ok(m));
        }
    }
}
