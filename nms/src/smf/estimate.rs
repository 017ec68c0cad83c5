//! The SMF's estimate of the service migration time (SMT) of a volume, learnt from the moves it
//! has made: `SMT(bytes) = fixed_s + bytes * seconds_per_byte`, fitted by normalised least
//! mean squares on every measured move. Pure: the caller passes the measurements.

/// Bytes are scaled to MiB for the fit so that both features have similar magnitudes.
const BYTES_PER_UNIT: f64 = 1024.0 * 1024.0;

/// Tuning of the estimator.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EstimatorConfig {
    /// Prior fixed cost of a move (prepare, switch, epoch raise through Raft), seconds.
    pub prior_fixed_s: f64,
    /// Prior transfer rate, bytes per second.
    pub prior_rate_bytes_per_s: f64,
    /// Learning rate in (0, 1]: the share of each prediction error corrected per move.
    pub learning_rate: f64,
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        // Conservative priors (a slow 100 Mbit/s backhaul, 0.5 s fixed) so that the first
        // moves start early rather than late; measured moves pull them down.
        Self { prior_fixed_s: 0.5, prior_rate_bytes_per_s: 12.5e6, learning_rate: 0.5 }
    }
}

/// A learning SMT estimate.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SmtEstimator {
    fixed_s: f64,
    s_per_unit: f64,
    learning_rate: f64,
    samples: u64,
}

impl SmtEstimator {
    pub fn new(config: EstimatorConfig) -> Self {
        let rate =
            if config.prior_rate_bytes_per_s.is_finite() && config.prior_rate_bytes_per_s > 0.0 {
                config.prior_rate_bytes_per_s
            } else {
                EstimatorConfig::default().prior_rate_bytes_per_s
            };
        Self {
            fixed_s: config.prior_fixed_s.max(0.0),
            s_per_unit: BYTES_PER_UNIT / rate,
            learning_rate: config.learning_rate.clamp(0.01, 1.0),
            samples: 0,
        }
    }

    /// Predicted seconds to move `bytes`.
    pub fn predict_s(&self, bytes: u64) -> f64 {
        self.fixed_s + self.s_per_unit * units(bytes)
    }

    /// Learns from one measured move of `bytes` that took `measured_s`. Non-finite or
    /// negative measurements are ignored (a clock step must not poison the estimate).
    pub fn observe(&mut self, bytes: u64, measured_s: f64) {
        if !measured_s.is_finite() || measured_s < 0.0 {
            return;
        }
        let x = units(bytes);
        let error = measured_s - self.predict_s(bytes);
        // NLMS step on features (1, x): w += mu * e * phi / |phi|^2, which moves this
        // sample's prediction by mu * e.
        let target = self.predict_s(bytes) + self.learning_rate * error;
        let norm = 1.0 + x * x;
        let fixed = self.fixed_s + self.learning_rate * error / norm;
        let slope = self.s_per_unit + self.learning_rate * error * x / norm;
        // Both parts of a time are >= 0: when the step drives one below 0, clamp it and let
        // the other absorb the step, so the sample is still learnt.
        (self.fixed_s, self.s_per_unit) = if slope < 0.0 {
            (target.max(0.0), 0.0)
        } else if fixed < 0.0 {
            (0.0, if x > 0.0 { (target / x).max(0.0) } else { slope })
        } else {
            (fixed, slope)
        };
        self.samples += 1;
    }

    /// Moves learnt from so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }
    pub fn fixed_s(&self) -> f64 {
        self.fixed_s
    }
    /// Learnt transfer rate, bytes per second (infinite when the per-byte cost learnt is 0).
    pub fn rate_bytes_per_s(&self) -> f64 {
        BYTES_PER_UNIT / self.s_per_unit
    }
}

fn units(bytes: u64) -> f64 {
    // Precision loss above 2^53 bytes is irrelevant for a time estimate.
    bytes as f64 / BYTES_PER_UNIT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_repeated_move() {
        let mut e = SmtEstimator::new(EstimatorConfig::default());
        let before = e.predict_s(8 << 20);
        for _ in 0..30 {
            e.observe(8 << 20, 0.08);
        }
        assert!(before > 0.5);
        let after = e.predict_s(8 << 20);
        assert!((after - 0.08).abs() < 0.005, "{after}");
        assert_eq!(e.samples(), 30);
    }

    #[test]
    fn learns_fixed_cost_and_rate_from_two_sizes() {
        // Truth: 0.05 s + 100 MiB/s.
        let truth = |b: u64| 0.05 + b as f64 / (100.0 * BYTES_PER_UNIT);
        let mut e = SmtEstimator::new(EstimatorConfig::default());
        for i in 0..400 {
            let b = if i % 2 == 0 { 1 << 20 } else { 32 << 20 };
            e.observe(b, truth(b));
        }
        for b in [1u64 << 20, 16 << 20, 64 << 20] {
            let (p, t) = (e.predict_s(b), truth(b));
            assert!((p - t).abs() / t < 0.05, "{b}: predicted {p}, truth {t}");
        }
    }

    #[test]
    fn ignores_garbage_measurements() {
        let mut e = SmtEstimator::new(EstimatorConfig::default());
        let p = e.predict_s(1 << 20);
        e.observe(1 << 20, f64::NAN);
        e.observe(1 << 20, -3.0);
        assert_eq!(e.predict_s(1 << 20), p);
        assert_eq!(e.samples(), 0);
    }
}
