//! Apply windows: when devices may switch to the candidate, in the operator's time zone
//! (`"Sat 02:00-05:00 Europe/Berlin"`, `"Mon-Fri 22:00-04:00 UTC"`, `"daily 01:00-03:00
//! America/Chicago"`). Outside every window of a plan devices still download, self-test
//! and run the candidate in shadow; activation (a promote, or a direct deploy to a device
//! with nothing to shadow beside) waits for a window.
//!
//! Pure: the time is passed in and the zone data is bundled into the binary (jiff's
//! `tzdb-bundle-always`), so a window check reads no file and no clock. Times are wall
//! clock in the zone, so a window keeps its local hours across daylight-saving changes.

use jiff::tz::TimeZone;
use jiff::Timestamp;

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One parsed window.
#[derive(Clone, Debug)]
pub struct Window {
    /// Bit `i` set: the window opens on day `i` (0 = Monday).
    days: u8,
    /// Minutes after local midnight; `end <= start` runs past midnight into the next day.
    start: u16,
    end: u16,
    tz: TimeZone,
}

fn day(s: &str) -> Option<usize> {
    let s = s.to_ascii_lowercase();
    let head = s.get(..3)?;
    DAYS.iter().position(|d| *d == head && s.len() <= 9)
}

fn days(spec: &str) -> Result<u8, String> {
    if spec.eq_ignore_ascii_case("daily") {
        return Ok(0x7f);
    }
    let mut mask = 0u8;
    for part in spec.split(',') {
        let bad = || format!("day {part:?}: use Mon..Sun, a range like Mon-Fri, or daily");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a).ok_or_else(bad)?, day(b).ok_or_else(bad)?);
                let mut d = a;
                loop {
                    mask |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => mask |= 1 << day(part).ok_or_else(bad)?,
        }
    }
    Ok(mask)
}

fn minutes(hhmm: &str) -> Option<u16> {
    let (h, m) = hhmm.split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
}

impl Window {
    /// Parses `DAYS HH:MM-HH:MM ZONE`; the error says what to write.
    pub fn parse(s: &str) -> Result<Window, String> {
        let what = |why: String| {
            format!("apply window {s:?}: {why} (write e.g. \"Sat 02:00-05:00 Europe/Berlin\")")
        };
        let parts: Vec<&str> = s.split_whitespace().collect();
        let [d, hours, zone] = parts[..] else {
            return Err(what("needs days, hours and a time zone".into()));
        };
        let days = days(d).map_err(what)?;
        let (start, end) = hours
            .split_once('-')
            .and_then(|(a, b)| Some((minutes(a)?, minutes(b)?)))
            .ok_or_else(|| what(format!("hours {hours:?} must look like 02:00-05:00")))?;
        if start == end {
            return Err(what("the window is empty".into()));
        }
        let tz = TimeZone::get(zone)
            .map_err(|_| what(format!("unknown time zone {zone:?} (an IANA name)")))?;
        Ok(Window {
            days,
            start,
            end,
            tz,
        })
    }

    /// Whether the window is open at `now_ms` (Unix milliseconds).
    pub fn is_open(&self, now_ms: u64) -> bool {
        let Ok(ts) = Timestamp::from_millisecond(i64::try_from(now_ms).unwrap_or(i64::MAX)) else {
            return false;
        };
        let z = ts.to_zoned(self.tz.clone());
        let today = (z.weekday() as u8 - 1) as usize;
        let yesterday = (today + 6) % 7;
        let m = z.hour() as u16 * 60 + z.minute() as u16;
        let on = |d: usize| self.days & (1 << d) != 0;
        if self.start < self.end {
            on(today) && (self.start..self.end).contains(&m)
        } else {
            (on(today) && m >= self.start) || (on(yesterday) && m < self.end)
        }
    }
}

/// Whether any of `windows` is open at `now_ms`; no windows at all means always open.
/// Windows that do not parse (the plan was validated, so only a stored plan from a
/// newer build could carry one) never open: activation waits rather than surprises.
pub fn open(windows: &[String], now_ms: u64) -> bool {
    windows.is_empty()
        || windows
            .iter()
            .any(|w| Window::parse(w).is_ok_and(|w| w.is_open(now_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix ms of a wall-clock time in a zone, e.g. `at("2026-12-05T02:30", "Europe/Berlin")`.
    pub(crate) fn at(civil: &str, zone: &str) -> u64 {
        let dt: jiff::civil::DateTime = civil.parse().unwrap();
        let z = dt.to_zoned(TimeZone::get(zone).unwrap()).unwrap();
        z.timestamp().as_millisecond() as u64
    }

    #[test]
    fn a_window_opens_on_its_day_and_hours_in_its_zone() {
        let w = Window::parse("Sat 02:00-05:00 Europe/Berlin").unwrap();
        // 2026-12-05 is a Saturday.
        assert!(!w.is_open(at("2026-12-05T01:59", "Europe/Berlin")));
        assert!(w.is_open(at("2026-12-05T02:00", "Europe/Berlin")));
        assert!(w.is_open(at("2026-12-05T04:59", "Europe/Berlin")));
        assert!(!w.is_open(at("2026-12-05T05:00", "Europe/Berlin")));
        assert!(
            !w.is_open(at("2026-12-04T03:00", "Europe/Berlin")),
            "Friday"
        );
        // 02:30 in Berlin is 01:30 UTC in winter.
        assert!(w.is_open(at("2026-12-05T01:30", "UTC")));
        // Summer time: still 02:00-05:00 local (00:00-03:00 UTC).
        assert!(w.is_open(at("2026-06-06T00:30", "UTC")));
    }

    #[test]
    fn overnight_ranges_and_day_lists_parse() {
        let w = Window::parse("Mon-Fri 22:00-04:00 UTC").unwrap();
        assert!(w.is_open(at("2026-12-04T23:00", "UTC")), "Friday night");
        assert!(
            w.is_open(at("2026-12-05T03:00", "UTC")),
            "Friday's window into Saturday"
        );
        assert!(!w.is_open(at("2026-12-05T23:00", "UTC")), "Saturday night");
        assert!(
            !w.is_open(at("2026-12-07T03:00", "UTC")),
            "Sunday's night is not in"
        );
        let d = Window::parse("daily 01:00-03:00 America/Chicago").unwrap();
        assert!(d.is_open(at("2026-12-06T02:00", "America/Chicago")));
        let s = Window::parse("Sat,Sun 00:00-24:00 UTC").unwrap();
        assert!(s.is_open(at("2026-12-06T23:59", "UTC")));
        assert!(!s.is_open(at("2026-12-07T00:00", "UTC")));
        assert!(open(&[], 0), "no windows: always open");
    }

    #[test]
    fn bad_windows_say_what_to_write() {
        for (spec, needle) in [
            ("Sat 02:00-05:00", "needs days, hours and a time zone"),
            ("Caturday 02:00-05:00 UTC", "day \"Caturday\""),
            ("Sat 2-5 UTC", "must look like 02:00-05:00"),
            ("Sat 02:00-05:00 Mars/Olympus", "unknown time zone"),
            ("Sat 02:00-02:00 UTC", "empty"),
        ] {
            let e = Window::parse(spec).unwrap_err();
            assert!(
                e.contains(needle) && e.contains("Europe/Berlin"),
                "{spec}: {e}"
            );
        }
    }
}
