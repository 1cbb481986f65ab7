//! Pricing: `price = cost × (1 + margin)`, rounded up to a micro, clamped to the plan's
//! `[min, max]`. Route prices in the proxy are computed here.

use crate::error::CommandError;
use crate::plan::Pricing;

const PPM: u128 = 1_000_000;

/// The price of a call that costs `cost_micros` upstream.
pub fn price_micros(cost_micros: u64, pricing: &Pricing) -> Result<u64, CommandError> {
    // u64 × (10^6 + u64) can exceed even u128 when the margin is absurd.
    let scaled = u128::from(cost_micros)
        .checked_mul(PPM + u128::from(pricing.margin_ppm))
        .ok_or(CommandError::Overflow)?;
    let rounded_up = scaled.div_ceil(PPM);
    let price = u64::try_from(rounded_up).map_err(|_| CommandError::Overflow)?;
    Ok(price.clamp(pricing.min_micros, pricing.max_micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pricing(margin_ppm: u64, min_micros: u64, max_micros: u64) -> Pricing {
        Pricing {
            margin_ppm,
            min_micros,
            max_micros,
        }
    }

    #[test]
    fn margin_rounds_up_to_a_micro() {
        let p = pricing(200_000, 0, u64::MAX);
        assert_eq!(price_micros(1_000_000, &p), Ok(1_200_000));
        assert_eq!(price_micros(1, &p), Ok(2), "1.2 micros rounds up to 2");
        assert_eq!(price_micros(5, &p), Ok(6));
        assert_eq!(price_micros(0, &p), Ok(0));
        assert_eq!(price_micros(7, &pricing(0, 0, u64::MAX)), Ok(7));
    }

    #[test]
    fn clamped_to_bounds() {
        let p = pricing(500_000, 100, 1_000);
        assert_eq!(price_micros(1, &p), Ok(100));
        assert_eq!(price_micros(600, &p), Ok(900));
        assert_eq!(price_micros(700, &p), Ok(1_000));
    }

    #[test]
    fn overflow_is_rejected_not_wrapped() {
        let p = pricing(1, 0, u64::MAX);
        assert_eq!(price_micros(u64::MAX, &p), Err(CommandError::Overflow));
        assert_eq!(
            price_micros(u64::MAX, &pricing(0, 0, u64::MAX)),
            Ok(u64::MAX)
        );
        // Plans do not bound the margin; the largest one must not overflow u128.
        let absurd = pricing(u64::MAX, 0, u64::MAX);
        assert_eq!(price_micros(u64::MAX, &absurd), Err(CommandError::Overflow));
        assert_eq!(price_micros(1, &absurd), Ok(18_446_744_073_711));
    }
}
