//! Budget periods on the UTC calendar: a day starts at 00:00 UTC, a week on
//! Monday 00:00 UTC (ISO), a month on the 1st 00:00 UTC; `every N` counts
//! fixed lengths from the Unix epoch.

use time::{Date, Duration, Month, OffsetDateTime, Time};

use crate::ir::BudgetPeriod;

/// The period containing `now_ms`: `(start, end)` in Unix ms, end exclusive.
pub fn bounds(p: BudgetPeriod, now_ms: i64) -> (i64, i64) {
    let now = OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let day = now.date();
    let ms = |d: Date| {
        (d.with_time(Time::MIDNIGHT)
            .assume_utc()
            .unix_timestamp_nanos()
            / 1_000_000) as i64
    };
    match p {
        BudgetPeriod::Daily => {
            let next = day.next_day().unwrap_or(day);
            (ms(day), ms(next))
        }
        BudgetPeriod::Weekly => {
            let back = i64::from(day.weekday().number_days_from_monday());
            let start = day.checked_sub(Duration::days(back)).unwrap_or(day);
            let end = start.checked_add(Duration::days(7)).unwrap_or(start);
            (ms(start), ms(end))
        }
        BudgetPeriod::Monthly => {
            let start = Date::from_calendar_date(day.year(), day.month(), 1).unwrap_or(day);
            let (y, m) = match day.month() {
                Month::December => (day.year() + 1, Month::January),
                m => (day.year(), m.next()),
            };
            let end = Date::from_calendar_date(y, m, 1).unwrap_or(start);
            (ms(start), ms(end))
        }
        BudgetPeriod::Every(len) => {
            let len = i64::try_from(len.max(1)).unwrap_or(i64::MAX);
            let start = now_ms.div_euclid(len) * len;
            (start, start.saturating_add(len))
        }
    }
}

/// `2026-12-01 00:00 UTC`, for messages.
pub fn format_utc(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

/// Parse `YYYY-MM-DD` (UTC midnight) to Unix ms.
pub fn parse_date(s: &str) -> Option<i64> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let d = Date::parse(s.trim(), &fmt).ok()?;
    Some(
        (d.with_time(Time::MIDNIGHT)
            .assume_utc()
            .unix_timestamp_nanos()
            / 1_000_000) as i64,
    )
}

/// `YYYY-MM-DD` of a Unix ms time.
pub fn format_date(ms: i64) -> String {
    format_utc(ms).chars().take(10).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]");
        let t = time::PrimitiveDateTime::parse(s, &fmt)
            .unwrap()
            .assume_utc();
        (t.unix_timestamp_nanos() / 1_000_000) as i64
    }

    fn check(p: BudgetPeriod, now: &str, start: &str, end: &str) {
        assert_eq!(bounds(p, at(now)), (at(start), at(end)), "{p:?} at {now}");
    }

    #[test]
    fn periods_follow_the_utc_calendar() {
        use BudgetPeriod::*;
        check(
            Daily,
            "2026-11-25 21:30",
            "2026-11-25 00:00",
            "2026-11-26 00:00",
        );
        check(
            Daily,
            "2026-11-25 00:00",
            "2026-11-25 00:00",
            "2026-11-26 00:00",
        );
        check(
            Daily,
            "2026-12-31 23:59",
            "2026-12-31 00:00",
            "2027-01-01 00:00",
        );
        // 2026-11-25 is a Wednesday.
        check(
            Weekly,
            "2026-11-25 12:00",
            "2026-11-23 00:00",
            "2026-11-30 00:00",
        );
        check(
            Weekly,
            "2026-11-23 00:00",
            "2026-11-23 00:00",
            "2026-11-30 00:00",
        );
        check(
            Weekly,
            "2026-11-29 23:59",
            "2026-11-23 00:00",
            "2026-11-30 00:00",
        );
        check(
            Monthly,
            "2026-11-25 12:00",
            "2026-11-01 00:00",
            "2026-12-01 00:00",
        );
        check(
            Monthly,
            "2026-12-31 23:59",
            "2026-12-01 00:00",
            "2027-01-01 00:00",
        );
        check(
            Monthly,
            "2028-02-29 10:00",
            "2028-02-01 00:00",
            "2028-03-01 00:00",
        );
        check(
            Monthly,
            "2027-03-01 00:00",
            "2027-03-01 00:00",
            "2027-04-01 00:00",
        );
        // every 14d from the epoch (1970-01-01 was a Thursday).
        let d14: i64 = 14 * 86_400_000;
        let (s, e) = bounds(Every(d14 as u64), at("2026-11-25 12:00"));
        assert_eq!(s % d14, 0);
        assert_eq!(e - s, d14);
        assert!(s <= at("2026-11-25 12:00") && at("2026-11-25 12:00") < e);
    }

    #[test]
    fn dates_parse_and_format() {
        assert_eq!(parse_date("2026-11-01"), Some(at("2026-11-01 00:00")));
        assert_eq!(parse_date("2026-13-01"), None);
        assert_eq!(format_utc(at("2026-12-01 00:00")), "2026-12-01 00:00 UTC");
        assert_eq!(format_date(at("2026-12-01 05:00")), "2026-12-01");
    }
}
