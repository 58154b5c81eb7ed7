//! `Seconds`: a duration in whole seconds, written the way people write it ("90s", "5m", "1h").

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Seconds(pub u64);

impl Seconds {
    pub fn duration(self) -> Duration {
        Duration::from_secs(self.0)
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.duration()))
    }
}

impl std::str::FromStr for Seconds {
    type Err = String;

    fn from_str(s: &str) -> Result<Seconds, String> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("{s:?} is not a duration like 30s or 5m: {e}"))?;
        if d.subsec_nanos() != 0 {
            return Err(format!("{s:?} is not a whole number of seconds"));
        }
        Ok(Seconds(d.as_secs()))
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Seconds, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("90s".parse::<Seconds>(), Ok(Seconds(90)));
        assert_eq!("5m".parse::<Seconds>(), Ok(Seconds(300)));
        assert_eq!(Seconds(90).to_string(), "1m 30s");
        assert!("1.5s".parse::<Seconds>().is_err());
        assert!("soon".parse::<Seconds>().is_err());
        let json = serde_json::to_string(&Seconds(300)).unwrap();
        assert_eq!(json, "\"5m\"");
        assert_eq!(
            serde_json::from_str::<Seconds>(&json).unwrap(),
            Seconds(300)
        );
    }
}
