//! Schedules by time of day and day of week (`schedule = "Mon-Fri
//! 08:00-18:00"`): when a rule matches, when a weight applies. Pure: a
//! schedule is a set of intervals of the local week, asked whether it is
//! active at a moment and when that next changes.
//!
//! The text: one or more periods (a list, or separated by `;`), each
//! `[DAYS] [TIMES]`. DAYS is a day (`Mon`, `monday`), a range (`Mon-Fri`,
//! `Fri-Mon` wraps) or a comma list of both (`Sat,Sun`, `Mon,Wed-Fri`);
//! without it every day. TIMES is `HH:MM-HH:MM` or a comma list of them
//! (`08:00-12:00,13:00-17:30`); without it the whole day. A period whose
//! end is not after its start runs past midnight (`Fri 22:00-06:00` ends on
//! Saturday at 06:00); `24:00` is the end of the day. Periods of one
//! schedule may not overlap.

use std::fmt;

use crate::clock::{weekday_named, DAY, WEEK};

/// Intervals `[start, end)` of the week, in seconds since Monday 00:00,
/// each within `0..WEEK` (a period over Sunday midnight is split).
#[derive(Clone, PartialEq, Eq)]
pub struct Schedule {
    text: String,
    intervals: Vec<(u32, u32)>,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Schedule {
    /// Parses the periods `items` (each may hold several, separated by `;`).
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Schedule, String> {
        let periods: Vec<&str> = items
            .iter()
            .flat_map(|i| i.as_ref().split(';'))
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        if periods.is_empty() {
            return Err("is empty: write e.g. \"Mon-Fri 08:00-18:00\"".into());
        }
        let mut s = Schedule {
            text: periods.join("; "),
            intervals: Vec::new(),
        };
        let mut owners: Vec<&str> = Vec::new();
        for p in &periods {
            for iv in period(p)? {
                if let Some(i) = s.intervals.iter().position(|o| intersect(*o, iv)) {
                    return Err(if owners[i] == *p {
                        format!("`{p}` overlaps itself")
                    } else {
                        format!("`{}` and `{p}` overlap", owners[i])
                    });
                }
                s.intervals.push(iv);
                owners.push(p);
            }
        }
        Ok(s)
    }

    /// Whether the schedule is on at `week_secs` (seconds since Monday
    /// 00:00, local time).
    pub fn active_at(&self, week_secs: u32) -> bool {
        let t = week_secs % WEEK;
        self.intervals.iter().any(|(a, b)| (*a..*b).contains(&t))
    }

    /// Seconds from `week_secs` to the next moment [`Schedule::active_at`]
    /// changes, if it ever does.
    pub fn next_change(&self, week_secs: u32) -> Option<u32> {
        let t = week_secs % WEEK;
        let now = self.active_at(t);
        let mut ahead: Vec<u32> = self
            .intervals
            .iter()
            .flat_map(|(a, b)| [*a, *b % WEEK])
            .map(|b| (b + WEEK - t) % WEEK)
            .map(|d| if d == 0 { WEEK } else { d })
            .collect();
        ahead.sort_unstable();
        ahead
            .into_iter()
            .find(|d| self.active_at((t + d) % WEEK) != now)
    }

    /// Whether the two schedules are both on at some moment.
    pub fn overlaps(&self, other: &Schedule) -> bool {
        self.intervals
            .iter()
            .any(|a| other.intervals.iter().any(|b| intersect(*a, *b)))
    }
}

fn intersect(a: (u32, u32), b: (u32, u32)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// One period's intervals of the week.
fn period(p: &str) -> Result<Vec<(u32, u32)>, String> {
    let (days, times) = match p.split_once(char::is_whitespace) {
        Some((d, t)) => (d, t.trim()),
        None if p.starts_with(|c: char| c.is_ascii_digit()) => ("", p),
        None => (p, ""),
    };
    let days = if days.is_empty() {
        vec![0, 1, 2, 3, 4, 5, 6]
    } else {
        day_list(days).map_err(|e| format!("`{p}`: {e}"))?
    };
    let times = if times.is_empty() {
        vec![(0, DAY)]
    } else {
        times
            .split(',')
            .map(|r| time_range(r.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("`{p}`: {e}"))?
    };
    let mut out = Vec::new();
    for d in days {
        for (start, end) in &times {
            let a = u32::from(d) * DAY + start;
            let b = u32::from(d) * DAY + if end > start { *end } else { end + DAY };
            if b <= WEEK {
                out.push((a, b));
            } else {
                out.push((a, WEEK));
                out.push((0, b - WEEK));
            }
        }
    }
    Ok(out)
}

/// `Mon-Fri`, `Sat,Sun`, `Mon,Wed-Fri`, `Fri-Mon`.
fn day_list(s: &str) -> Result<Vec<u8>, String> {
    let day = |d: &str| {
        weekday_named(d.trim()).ok_or_else(|| {
            format!("`{d}` is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun, or a range such as Mon-Fri)")
        })
    };
    let mut days = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (day(a)?, day(b)?),
            None => {
                let d = day(part)?;
                (d, d)
            }
        };
        let mut d = a;
        loop {
            if days.contains(&d) {
                return Err(format!(
                    "{} is listed twice",
                    crate::clock::WEEKDAYS[d as usize]
                ));
            }
            days.push(d);
            if d == b {
                break;
            }
            d = (d + 1) % 7;
        }
    }
    Ok(days)
}

/// `08:00-18:00` as seconds since midnight; the end may be `24:00`.
fn time_range(r: &str) -> Result<(u32, u32), String> {
    let (a, b) = r
        .split_once('-')
        .ok_or_else(|| format!("`{r}` is not a time range such as 08:00-18:00"))?;
    let (start, end) = (clock_time(a.trim())?, clock_time(b.trim())?);
    if start == end {
        return Err(format!("`{r}` is empty"));
    }
    if start == DAY {
        return Err(format!("`{r}`: a period cannot start at 24:00"));
    }
    Ok((start, end))
}

/// `HH:MM`, `00:00` to `24:00`.
fn clock_time(t: &str) -> Result<u32, String> {
    let bad = || format!("`{t}` is not a time of day (HH:MM, 00:00 to 24:00)");
    let (h, m) = t.split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u32 = 3600;

    fn at(day: u32, h: u32, m: u32) -> u32 {
        day * DAY + h * H + m * 60
    }

    #[test]
    fn weekdays_office_hours() {
        let s = Schedule::parse(&["Mon-Fri 08:00-18:00"]).unwrap();
        assert!(!s.active_at(at(0, 7, 59)));
        assert!(s.active_at(at(0, 8, 0)));
        assert!(s.active_at(at(4, 17, 59)));
        assert!(!s.active_at(at(4, 18, 0)));
        assert!(!s.active_at(at(5, 12, 0)));
        assert_eq!(s.next_change(at(0, 7, 0)), Some(H));
        assert_eq!(s.next_change(at(0, 8, 0)), Some(10 * H));
        // Friday evening: Monday morning.
        assert_eq!(s.next_change(at(4, 18, 0)), Some(2 * DAY + 14 * H));
        assert_eq!(s.to_string(), "Mon-Fri 08:00-18:00");
    }

    #[test]
    fn periods_past_midnight_and_the_week_wrap() {
        let s = Schedule::parse(&["Sun 22:00-06:00"]).unwrap();
        assert!(s.active_at(at(6, 23, 0)));
        assert!(s.active_at(at(0, 5, 59)), "Monday morning, after the wrap");
        assert!(!s.active_at(at(0, 6, 0)));
        assert_eq!(s.next_change(at(6, 23, 0)), Some(7 * H));
        let night = Schedule::parse(&["22:00-06:00"]).unwrap();
        assert!((0..7).all(|d| night.active_at(at(d, 3, 0)) && !night.active_at(at(d, 12, 0))));
        // Adjacent nights form one long period: no change at midnight.
        assert_eq!(night.next_change(at(2, 23, 0)), Some(7 * H));
        let always = Schedule::parse(&["00:00-24:00"]).unwrap();
        assert!(always.active_at(at(3, 12, 0)));
        assert_eq!(always.next_change(at(3, 12, 0)), None);
        let weekend = Schedule::parse(&["Sat,Sun"]).unwrap();
        assert!(weekend.active_at(at(5, 0, 0)) && !weekend.active_at(at(0, 0, 0)));
        assert_eq!(weekend.next_change(at(6, 23, 0)), Some(H));
    }

    #[test]
    fn lists_and_several_periods() {
        let s =
            Schedule::parse(&["Mon,Wed-Fri 08:00-12:00,13:00-17:30", "Sat 09:00-13:00"]).unwrap();
        assert!(s.active_at(at(0, 9, 0)) && !s.active_at(at(1, 9, 0)));
        assert!(!s.active_at(at(2, 12, 30)) && s.active_at(at(2, 17, 29)));
        assert!(s.active_at(at(5, 10, 0)) && !s.active_at(at(6, 10, 0)));
        assert_eq!(
            s.to_string(),
            "Mon,Wed-Fri 08:00-12:00,13:00-17:30; Sat 09:00-13:00"
        );
        let split = Schedule::parse(&["Mon 08:00-09:00; Tue 08:00-09:00"]).unwrap();
        assert!(split.active_at(at(1, 8, 30)));
        let wrap = Schedule::parse(&["Fri-Mon 10:00-11:00"]).unwrap();
        assert!([4, 5, 6, 0].iter().all(|d| wrap.active_at(at(*d, 10, 30))));
        assert!(!wrap.active_at(at(1, 10, 30)));
    }

    #[test]
    fn bad_and_overlapping_schedules_are_refused() {
        for (text, want) in [
            ("Mon-Fri 08:00-25:00", "not a time of day"),
            ("Mon-Fri 8-18", "not a time of day"),
            ("Mon-Fry 08:00-18:00", "`Fry` is not a day"),
            ("Mon-Fri 08:00", "not a time range"),
            ("Mon 10:00-10:00", "is empty"),
            ("Mon 24:00-01:00", "cannot start at 24:00"),
            ("Mon,Mon", "listed twice"),
            ("", "is empty"),
        ] {
            let e = Schedule::parse(&[text]).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = Schedule::parse(&["Mon-Fri 08:00-18:00", "Wed 17:00-19:00"]).unwrap_err();
        assert!(
            e.contains("`Mon-Fri 08:00-18:00` and `Wed 17:00-19:00` overlap"),
            "{e}"
        );
        let e = Schedule::parse(&["Mon 08:00-12:00,11:00-13:00"]).unwrap_err();
        assert!(e.contains("overlaps itself"), "{e}");
        // Touching is not overlapping.
        assert!(Schedule::parse(&["Mon 08:00-12:00", "Mon 12:00-13:00"]).is_ok());
        let a = Schedule::parse(&["Mon-Fri 08:00-18:00"]).unwrap();
        let b = Schedule::parse(&["Fri 17:00-20:00"]).unwrap();
        let c = Schedule::parse(&["Sat,Sun"]).unwrap();
        assert!(a.overlaps(&b) && !a.overlaps(&c) && !b.overlaps(&c));
    }
}
