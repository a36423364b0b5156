//! Rate-limit values: a [`Rate`] as configured (`"600/min"`), which limit a decision is about
//! ([`LimitKind`]) and what it decided ([`Verdict`]). Plain values, shared by the configuration,
//! per-key policies, the stores that keep shared limits, metrics and the limiter
//! ([`crate::ratelimit`]).

use std::time::Duration;

/// A rate: `count` events per `period`, allowing a burst of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Events allowed per period (and the burst size).
    pub count: u32,
    /// The period.
    pub period: Duration,
}

impl Rate {
    /// The longest period: 365 days, the longest duration any setting takes. Far longer would
    /// bring the limiter's deadlines near the overflow that panics `Instant` arithmetic.
    pub const MAX_PERIOD: Duration = Duration::from_secs(365 * 86_400);

    /// Parses `"600/min"`, `"10/s"`, `"1000/h"`, `"5000/d"` or `"20/30s"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (count, per) = s.split_once('/').ok_or("expected COUNT/PERIOD")?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| "COUNT must be a whole number")?;
        if count == 0 {
            return Err("COUNT must be above 0".into());
        }
        let period = match per.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => humantime::parse_duration(other)
                .map_err(|_| "PERIOD must be s, min, h, d or a duration")?,
        };
        if period.is_zero() || period / count < Duration::from_micros(1) {
            return Err("the rate is too high to enforce".into());
        }
        if period > Self::MAX_PERIOD {
            return Err("PERIOD must be at most 365d".into());
        }
        Ok(Self { count, period })
    }

    /// Time between two events at the sustained rate.
    pub fn emission_interval(&self) -> Duration {
        self.period / self.count
    }
}

/// Which limit a decision is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Requests per API key.
    Key,
    /// Failed authentications per client IP.
    IpFailures,
}

impl LimitKind {
    /// Label value, and the policy name in `RateLimit-Policy`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Key => "key",
            LimitKind::IpFailures => "ip_failures",
        }
    }
}

/// Outcome of one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; `remaining` more are allowed right now, the budget is full again after `reset`.
    Allowed { remaining: u32, reset: Duration },
    /// Over the limit; try again after `retry_after`.
    Limited { retry_after: Duration },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(
            Rate::parse("600/min"),
            Ok(Rate {
                count: 600,
                period: Duration::from_secs(60)
            })
        );
        assert_eq!(
            Rate::parse("10/s").unwrap().emission_interval(),
            Duration::from_millis(100)
        );
        assert_eq!(
            Rate::parse("20/30s").unwrap().period,
            Duration::from_secs(30)
        );
        assert_eq!(Rate::parse("1/365d").unwrap().period, Rate::MAX_PERIOD);
        for bad in [
            "",
            "10",
            "0/min",
            "x/min",
            "10/fortnight",
            "-1/s",
            "1/366d",
            "1/300000000000y",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }
}
