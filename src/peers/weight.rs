//! A peer's weight: an integer as nginx has it, or a fraction (`1.5`) as
//! lua-resty-upstream-etcd allowed. It is kept in thousandths, so the
//! schedule builder, which works on integers, honours a fractional weight
//! exactly (1.5 against 1 is 1500 against 1000, reduced to 3 against 2).

use std::fmt;

use serde::{Serialize, Serializer};

use super::{MAX_WEIGHT, ParamError};

/// Thousandths in one unit of weight.
const MILLI: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Weight(u32);

impl Weight {
    /// A whole weight, 1..=[`MAX_WEIGHT`] (the caller's constant, not
    /// checked again).
    pub const fn whole(n: u32) -> Weight {
        Weight(n * MILLI)
    }

    /// A weight as written, an integer or a decimal fraction, from 0.001 up
    /// to [`MAX_WEIGHT`]; finer fractions are rounded to the thousandth.
    pub fn from_f64(w: f64) -> Result<Weight, ParamError> {
        let milli = (w * f64::from(MILLI)).round();
        if !w.is_finite() || milli < 1.0 || w > f64::from(MAX_WEIGHT) {
            return Err(ParamError::WeightRange(w.to_string()));
        }
        // In 1..=MAX_WEIGHT * 1000, so it fits.
        Ok(Weight(milli as u32))
    }

    /// Parses `3` or `1.5` (no sign, no exponent).
    pub fn parse(text: &str) -> Result<Weight, ParamError> {
        let digits = !text.is_empty()
            && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && text.bytes().filter(|&b| b == b'.').count() <= 1
            && !text.starts_with('.')
            && !text.ends_with('.');
        match text.parse::<f64>() {
            Ok(w) if digits => Weight::from_f64(w),
            _ => Err(ParamError::Invalid {
                name: "weight",
                value: text.to_string(),
            }),
        }
    }

    /// The weight in thousandths, as the schedule takes it.
    pub fn milli(self) -> u32 {
        self.0
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / f64::from(MILLI)
    }

    pub fn is_whole(self) -> bool {
        self.0.is_multiple_of(MILLI)
    }
}

/// `3`, or `1.5`: as short as it is exact.
impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_whole() {
            write!(f, "{}", self.0 / MILLI)
        } else {
            let text = format!("{}.{:03}", self.0 / MILLI, self.0 % MILLI);
            f.write_str(text.trim_end_matches('0'))
        }
    }
}

/// A JSON integer when whole, else a number with its fraction.
impl Serialize for Weight {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_whole() {
            s.serialize_u32(self.0 / MILLI)
        } else {
            s.serialize_f64(self.as_f64())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_and_fractional_weights_round_trip() {
        for (text, milli, shown) in [
            ("3", 3000, "3"),
            ("1.5", 1500, "1.5"),
            ("0.001", 1, "0.001"),
            ("2.25", 2250, "2.25"),
            ("10000", 10_000_000, "10000"),
            ("1.0", 1000, "1"),
        ] {
            let w = Weight::parse(text).expect(text);
            assert_eq!(w.milli(), milli, "{text}");
            assert_eq!(w.to_string(), shown);
            assert_eq!(Weight::parse(&w.to_string()), Ok(w));
        }
        assert_eq!(
            serde_json::to_string(&Weight::whole(3)).ok().as_deref(),
            Some("3")
        );
        assert_eq!(
            serde_json::to_string(&Weight::parse("1.5").expect("1.5"))
                .ok()
                .as_deref(),
            Some("1.5")
        );
        for bad in [
            "0", "0.0004", "-1", "1e3", "", ".5", "1.", "10000.5", "x", "1.2.3",
        ] {
            assert!(Weight::parse(bad).is_err(), "{bad}");
        }
    }
}
