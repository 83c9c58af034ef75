//! GUIDs and timestamps as MassTransit reads and writes them.
//!
//! Reading accepts every form .NET's `Guid.TryParse` accepts (D, N, B, P and X, any case, with
//! surrounding whitespace), whatever the version bits say, so MassTransit-JS's non-RFC ids read.
//! Writing always gives the lowercase D form. Times are written as System.Text.Json writes a UTC
//! `DateTime`: at most 7 fractional digits (100 ns ticks), trailing zeros trimmed, `Z` suffix; the
//! times we create are truncated to 100 ns so that what we write reads back equal.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Timelike, Utc};
use uuid::Uuid;

/// Parses a GUID in any form `Guid.TryParse` accepts; `None` if the text is not a GUID.
///
/// Empty text is not a GUID here: callers decide whether empty means "absent".
pub fn parse_guid(text: &str) -> Option<Uuid> {
    let text = text.trim();
    let bytes = text.as_bytes();
    let inner = match (bytes.first(), bytes.last()) {
        (Some(b'{'), Some(b'}')) if text.contains(',') => return parse_x_form(text),
        (Some(b'{'), Some(b'}')) | (Some(b'('), Some(b')')) if text.len() == 38 => &text[1..37],
        _ => text,
    };
    match inner.len() {
        32 if inner.bytes().all(|b| b.is_ascii_hexdigit()) => Uuid::parse_str(inner).ok(),
        36 => parse_d_form(inner),
        _ => None,
    }
}

fn parse_d_form(text: &str) -> Option<Uuid> {
    let bytes = text.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    for (i, b) in bytes.iter().enumerate() {
        let ok = if matches!(i, 8 | 13 | 18 | 23) { *b == b'-' } else { b.is_ascii_hexdigit() };
        if !ok {
            return None;
        }
    }
    Uuid::parse_str(text).ok()
}

/// `{0xdddddddd,0xdddd,0xdddd,{0xdd,0xdd,0xdd,0xdd,0xdd,0xdd,0xdd,0xdd}}`, whitespace allowed.
fn parse_x_form(text: &str) -> Option<Uuid> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let body = compact.strip_prefix('{')?.strip_suffix("}}")?;
    let (head, tail) = body.split_once(",{")?;
    let head: Vec<&str> = head.split(',').collect();
    let tail: Vec<&str> = tail.split(',').collect();
    if head.len() != 3 || tail.len() != 8 {
        return None;
    }
    fn hex(part: &str, max_digits: usize) -> Option<u32> {
        let digits = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X"))?;
        if digits.is_empty() || digits.len() > max_digits || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(digits, 16).ok()
    }
    let d1 = hex(head[0], 8)?;
    let d2 = u16::try_from(hex(head[1], 4)?).ok()?;
    let d3 = u16::try_from(hex(head[2], 4)?).ok()?;
    let mut d4 = [0u8; 8];
    for (slot, part) in d4.iter_mut().zip(&tail) {
        *slot = u8::try_from(hex(part, 2)?).ok()?;
    }
    Some(Uuid::from_fields(d1, d2, d3, &d4))
}

/// A new id for a message we write: a UUID v7 (time-ordered, like MassTransit's NewId).
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

/// The "N" form (32 lowercase hex digits) that Service Bus uses for MessageId and CorrelationId.
pub fn n_form(id: Uuid) -> String {
    id.simple().to_string()
}

/// Now, truncated to .NET's 100 ns resolution.
pub fn now() -> DateTime<Utc> {
    truncate_to_ticks(Utc::now())
}

/// Drops precision below 100 ns, which .NET cannot carry.
pub fn truncate_to_ticks(time: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = time.nanosecond();
    // Leap-second nanos (>= 1e9) are kept in range by the same arithmetic.
    time.with_nanosecond(nanos - nanos % 100).unwrap_or(time)
}

/// Writes a UTC time as System.Text.Json does: `2023-01-12T21:55:53.715882Z`.
pub fn format_time(time: &DateTime<Utc>) -> String {
    let base = time.to_rfc3339_opts(SecondsFormat::Secs, true);
    let ticks = (time.nanosecond() % 1_000_000_000) / 100;
    if ticks == 0 {
        return base;
    }
    let fraction = format!("{ticks:07}");
    let fraction = fraction.trim_end_matches('0');
    let stem = base.strip_suffix('Z').unwrap_or(&base);
    format!("{stem}.{fraction}Z")
}

/// Reads a time as .NET's `DateTime` reader would: RFC 3339 with any offset, or without offset
/// (taken as UTC), with any number of fractional digits. `None` if it is not a time.
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dotnet_guid_form_reads_to_the_same_value() {
        let d = "3cf65151-7bd0-87c0-0744-bb81150028d5";
        let expected = Uuid::parse_str(d).unwrap();
        for form in [
            d.to_owned(),
            d.to_uppercase(),
            format!("  {d} "),
            d.replace('-', ""),
            format!("{{{d}}}"),
            format!("({d})"),
            "{0x3cf65151,0x7bd0,0x87c0,{0x07,0x44,0xbb,0x81,0x15,0x00,0x28,0xd5}}".to_owned(),
            "{ 0x3CF65151, 0x7bd0, 0x87c0, { 0x7, 0x44, 0xbb, 0x81, 0x15, 0x0, 0x28, 0xd5 } }".to_owned(),
        ] {
            assert_eq!(parse_guid(&form), Some(expected), "{form}");
        }
        for bad in [
            "",
            "  ",
            "not-a-guid",
            "3cf65151-7bd0-87c0-0744-bb81150028d",
            "{3cf65151-7bd0-87c0-0744-bb81150028d5",
            "3cf65151_7bd0_87c0_0744_bb81150028d5",
            "urn:uuid:3cf65151-7bd0-87c0-0744-bb81150028d5",
            "12345",
        ] {
            assert_eq!(parse_guid(bad), None, "{bad}");
        }
        assert_eq!(expected.to_string(), d, "written in lowercase D form");
        assert_eq!(n_form(expected), d.replace('-', ""));
    }

    #[test]
    fn times_are_written_like_system_text_json() {
        let t = parse_time("2023-01-12T21:55:53.7158820Z").unwrap();
        assert_eq!(format_time(&t), "2023-01-12T21:55:53.715882Z");
        let whole = parse_time("2023-01-12T22:55:53+01:00").unwrap();
        assert_eq!(format_time(&whole), "2023-01-12T21:55:53Z");
        let fine = parse_time("2023-01-12T21:55:53.123456789Z").unwrap();
        assert_eq!(format_time(&truncate_to_ticks(fine)), "2023-01-12T21:55:53.1234567Z");
        assert_eq!(format_time(&parse_time("2023-01-12T21:55:53.5").unwrap()), "2023-01-12T21:55:53.5Z");
        assert_eq!(parse_time("yesterday"), None);
        let now = now();
        assert_eq!(parse_time(&format_time(&now)), Some(now));
    }
}
