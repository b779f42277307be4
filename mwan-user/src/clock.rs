//! Local time, for schedules and billing cycles: civil dates (pure
//! calendar arithmetic) and the wall clock as the system's time zone shows
//! it (`localtime_r` and `mktime`, which follow `TZ` and the tz database,
//! daylight saving included).
//!
//! What depends on local time (a rule's schedule, a billing cycle's end)
//! is computed by pure functions from a [`LocalTime`] and, where a moment
//! is needed, a converter from local civil time to the epoch ([`epoch_of`]
//! in the daemon, plain UTC in tests). Live connections never depend on
//! it: a schedule changes what new connections get, a clock jump or a
//! daylight saving change only moves the next boundary.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub const DAY: u32 = 86_400;
pub const WEEK: u32 = 7 * DAY;

/// The days of the week as config files name them, Monday first (the
/// index is [`Date::weekday`]'s).
pub const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// A day of the week by name: `Mon` or `Monday`, any case.
pub fn weekday_named(s: &str) -> Option<u8> {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let l = s.to_ascii_lowercase();
    (0..7u8).find(|&i| l == FULL[i as usize] || l == WEEKDAYS[i as usize].to_ascii_lowercase())
}

/// A day of the proleptic Gregorian calendar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Date {
    pub year: i32,
    /// 1..=12
    pub month: u8,
    /// 1..=31
    pub day: u8,
}

impl Date {
    pub fn new(year: i32, month: u8, day: u8) -> Date {
        debug_assert!((1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month));
        Date { year, month, day }
    }

    /// Days since 1970-01-01 (negative before).
    pub fn days(self) -> i64 {
        // Howard Hinnant's days_from_civil.
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The date `days` days after 1970-01-01.
    pub fn from_days(days: i64) -> Date {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        Date { year, month, day }
    }

    /// 0 for Monday … 6 for Sunday.
    pub fn weekday(self) -> u8 {
        // 1970-01-01 was a Thursday.
        (self.days() + 3).rem_euclid(7) as u8
    }

    pub fn add_days(self, n: i64) -> Date {
        Date::from_days(self.days() + n)
    }

    /// Day `day` of the month `n` months after this one, or that month's
    /// last day when it is shorter (day 31 in April is the 30th).
    pub fn nth_of_month(self, months: i32, day: u8) -> Date {
        let index = self.year * 12 + i32::from(self.month) - 1 + months;
        let (year, month) = (index.div_euclid(12), (index.rem_euclid(12) + 1) as u8);
        Date::new(year, month, day.min(days_in_month(year, month)))
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

pub fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

/// A moment, and what the local wall clock shows then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalTime {
    /// Seconds since the epoch.
    pub epoch: i64,
    pub date: Date,
    /// Seconds since local midnight (0..86400).
    pub secs: u32,
    /// Local time minus UTC, in seconds.
    pub utc_offset: i32,
}

impl LocalTime {
    /// Now, in the system's time zone.
    pub fn now() -> LocalTime {
        LocalTime::at(now_epoch())
    }

    /// `epoch`, in the system's time zone (`TZ`, else /etc/localtime).
    pub fn at(epoch: i64) -> LocalTime {
        let t = epoch as libc::time_t;
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
            return LocalTime::utc(epoch);
        }
        LocalTime {
            epoch,
            date: Date::new(tm.tm_year + 1900, (tm.tm_mon + 1) as u8, tm.tm_mday as u8),
            secs: (tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec.min(59)) as u32,
            utc_offset: tm.tm_gmtoff as i32,
        }
    }

    /// `epoch` in UTC (tests, and when the time zone cannot be read).
    pub fn utc(epoch: i64) -> LocalTime {
        LocalTime {
            epoch,
            date: Date::from_days(epoch.div_euclid(i64::from(DAY))),
            secs: epoch.rem_euclid(i64::from(DAY)) as u32,
            utc_offset: 0,
        }
    }

    /// Seconds since Monday 00:00 of this week, local time.
    pub fn week_secs(&self) -> u32 {
        u32::from(self.date.weekday()) * DAY + self.secs
    }

    /// The local civil time `secs` seconds of wall clock later (ignoring a
    /// daylight saving change in between: that is the converter's).
    pub fn civil_after(&self, secs: u32) -> (Date, u32) {
        let t = u64::from(self.secs) + u64::from(secs);
        (
            self.date.add_days((t / u64::from(DAY)) as i64),
            (t % u64::from(DAY)) as u32,
        )
    }
}

impl fmt::Display for LocalTime {
    /// RFC 3339 with the local offset: `2026-03-29T03:00:00+02:00`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (h, m, s) = (self.secs / 3600, self.secs / 60 % 60, self.secs % 60);
        let o = self.utc_offset.unsigned_abs();
        let sign = if self.utc_offset < 0 { '-' } else { '+' };
        write!(
            f,
            "{}T{h:02}:{m:02}:{s:02}{sign}{:02}:{:02}",
            self.date,
            o / 3600,
            o / 60 % 60
        )
    }
}

pub fn now_epoch() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The moment the local wall clock shows `date` at `secs` past midnight,
/// in the system's time zone. A time a daylight saving change skips (02:30
/// on the spring morning) is the moment after the jump; a time shown twice
/// (the autumn hour) is the first.
pub fn epoch_of(date: Date, secs: u32) -> i64 {
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = date.year - 1900;
    tm.tm_mon = i32::from(date.month) - 1;
    tm.tm_mday = i32::from(date.day);
    tm.tm_hour = (secs / 3600) as i32;
    tm.tm_min = (secs / 60 % 60) as i32;
    tm.tm_sec = (secs % 60) as i32;
    tm.tm_isdst = -1;
    let t = unsafe { libc::mktime(&mut tm) };
    if t == -1 {
        return utc_epoch_of(date, secs);
    }
    t as i64
}

/// The first second after `from` and up to `to` at which the system's
/// time zone's offset from UTC changes (a daylight saving change), if it
/// does.
pub fn offset_change(from: i64, to: i64) -> Option<i64> {
    let offset = |t: i64| LocalTime::at(t).utc_offset;
    let start = offset(from);
    if to <= from || offset(to) == start {
        return None;
    }
    // The offset at `lo` is the start's, at `hi` another: halve.
    let (mut lo, mut hi) = (from, to);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if offset(mid) == start {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

/// [`epoch_of`] in UTC.
pub fn utc_epoch_of(date: Date, secs: u32) -> i64 {
    date.days() * i64::from(DAY) + i64::from(secs)
}

/// Reads the time zone (`TZ`, else /etc/localtime) once, at start.
pub fn init() {
    extern "C" {
        fn tzset();
    }
    unsafe { tzset() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip_and_know_their_weekday() {
        for (days, date, weekday) in [
            (0, Date::new(1970, 1, 1), 3),
            (-1, Date::new(1969, 12, 31), 2),
            (11_016, Date::new(2000, 2, 29), 1),
            (20_454, Date::new(2026, 1, 1), 3),
            (20_513, Date::new(2026, 3, 1), 6),
        ] {
            assert_eq!(date.days(), days, "{date}");
            assert_eq!(Date::from_days(days), date);
            assert_eq!(date.weekday(), weekday, "{date}");
        }
        for d in -800_000..800_000i64 {
            if d % 997 == 0 {
                assert_eq!(Date::from_days(d).days(), d);
            }
        }
    }

    #[test]
    fn months_are_clamped_to_their_length() {
        let jan31 = Date::new(2026, 1, 31);
        assert_eq!(jan31.nth_of_month(1, 31), Date::new(2026, 2, 28));
        assert_eq!(jan31.nth_of_month(1, 30), Date::new(2026, 2, 28));
        assert_eq!(
            Date::new(2028, 1, 5).nth_of_month(1, 31),
            Date::new(2028, 2, 29)
        );
        assert_eq!(jan31.nth_of_month(-1, 15), Date::new(2025, 12, 15));
        assert_eq!(jan31.nth_of_month(11, 1), Date::new(2026, 12, 1));
        assert_eq!(jan31.nth_of_month(12, 1), Date::new(2027, 1, 1));
        assert_eq!(days_in_month(1900, 2), 28);
        assert_eq!(days_in_month(2000, 2), 29);
    }

    #[test]
    fn utc_local_times_and_their_text() {
        // 2026-03-29 (a Sunday) 01:59:30 UTC.
        let e = utc_epoch_of(Date::new(2026, 3, 29), 7170);
        let t = LocalTime::utc(e);
        assert_eq!((t.date, t.secs), (Date::new(2026, 3, 29), 7170));
        assert_eq!(t.week_secs(), 6 * DAY + 7170);
        assert_eq!(t.to_string(), "2026-03-29T01:59:30+00:00");
        assert_eq!(t.civil_after(DAY - 7170), (Date::new(2026, 3, 30), 0));
        let east = LocalTime {
            utc_offset: -(3 * 3600 + 1800),
            ..t
        };
        assert!(east.to_string().ends_with("-03:30"), "{east}");
        assert_eq!(weekday_named("sunday"), Some(6));
        assert_eq!(weekday_named("Mon"), Some(0));
        assert_eq!(weekday_named("Mo"), None);
    }
}
