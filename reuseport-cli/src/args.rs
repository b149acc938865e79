//! What the verbs share on the command line: `--spill-period`'s parser.

use std::time::Duration;

/// `--spill-period`: a duration more than 0 and at most [`reuseport::spill::MAX_PERIOD`].
pub fn parse_spill_period(value: &str) -> Result<Duration, String> {
    let period = humantime::parse_duration(value).map_err(|err| err.to_string())?;
    if period.is_zero() || period > reuseport::spill::MAX_PERIOD {
        return Err("must be more than 0 and at most 1s".to_owned());
    }
    Ok(period)
}
