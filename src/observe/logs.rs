//! Logging: one line per significant event on stderr, as `key=value` text (logfmt) or as JSON
//! objects, at the level `RUST_LOG` selects.
//!
//! Invariant: no configured secret reaches the log. Once the settings are loaded,
//! [`hide_secrets`] gives the writer every secret value, and each line is searched for them just
//! before it is written, so a password is hidden even inside an error text that a database or broker
//! library built from a connection URL. The places that print a URL also redact it themselves.

use std::fmt::{self, Write as _};
use std::io;
use std::sync::{PoisonError, RwLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::config::Scrubber;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `ts=… level=info target=… msg="…" key=value …`
    Text,
    /// One JSON object per line, fields at the top level.
    Json,
}

/// The secrets hidden in every line written from now on.
static SECRETS: RwLock<Option<Scrubber>> = RwLock::new(None);

/// Sets up the global logger on stderr. `default_filter` applies when `RUST_LOG` is not set.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(ScrubbedStderr);
    let _ = match format {
        LogFormat::Text => builder.event_format(KeyValue).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init(),
    };
}

/// Hides these secrets in every line logged from now on (and in [`scrub`]).
pub fn hide_secrets(scrubber: Scrubber) {
    *SECRETS.write().unwrap_or_else(PoisonError::into_inner) = Some(scrubber);
}

/// `text` with the secrets given to [`hide_secrets`] replaced by `***`: for text printed outside
/// the logger (the last error on stderr).
pub fn scrub(text: &str) -> String {
    match SECRETS.read().unwrap_or_else(PoisonError::into_inner).as_ref() {
        Some(scrubber) => scrubber.hide(text).into_owned(),
        None => text.to_owned(),
    }
}

/// Stderr, with the known secrets hidden in each line.
struct ScrubbedStderr;

impl<'a> MakeWriter<'a> for ScrubbedStderr {
    type Writer = ScrubbedLine;
    fn make_writer(&'a self) -> Self::Writer {
        ScrubbedLine
    }
}

/// Writes one formatted event: the logger hands over a whole line per `write` call, so a secret is
/// never split between two calls.
struct ScrubbedLine;

impl io::Write for ScrubbedLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let guard = SECRETS.read().unwrap_or_else(PoisonError::into_inner);
        match (guard.as_ref(), std::str::from_utf8(buf)) {
            (Some(scrubber), Ok(text)) if !scrubber.is_empty() => {
                io::stderr().lock().write_all(scrubber.hide(text).as_bytes())?
            }
            (Some(scrubber), Err(_)) if !scrubber.is_empty() => {
                let text = String::from_utf8_lossy(buf);
                io::stderr().lock().write_all(scrubber.hide(&text).as_bytes())?
            }
            _ => io::stderr().lock().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// logfmt: `ts=2024-05-01T10:00:00.123456Z level=info target=fhir_pubsub::bridge msg="store plan handled" changes=1`.
struct KeyValue;

impl<S, N> FormatEvent<S, N> for KeyValue
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let level = meta.level().as_str().to_ascii_lowercase();
        write!(writer, "ts={ts} level={level} target={}", meta.target())?;
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let Some(message) = &fields.message {
            write!(writer, " msg={}", logfmt_value(message))?;
        }
        writer.write_str(&fields.rest)?;
        writeln!(writer)
    }
}

/// The fields of one event: the message apart, the others as ` key=value`.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    rest: String,
}

impl Fields {
    fn push(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_owned());
        } else {
            let _ = write!(self.rest, " {}={}", field.name(), logfmt_value(value));
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push(field, &format!("{value:?}"));
    }
}

/// A value as logfmt writes it: bare when it is one plain word, else quoted with `"` and `\` escaped.
fn logfmt_value(value: &str) -> String {
    let plain =
        !value.is_empty() && value.chars().all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '=');
    if plain {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(quoted, "\\u{{{:04x}}}", c as u32);
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logfmt_values_are_bare_or_quoted() {
        assert_eq!(logfmt_value("rabbitmq://h/Q"), "rabbitmq://h/Q");
        assert_eq!(logfmt_value("store plan handled"), "\"store plan handled\"");
        assert_eq!(logfmt_value(""), "\"\"");
        assert_eq!(logfmt_value("a=b"), "\"a=b\"");
        assert_eq!(logfmt_value("say \"hi\"\nnow"), r#""say \"hi\"\nnow""#);
    }
}
