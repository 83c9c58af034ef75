//! Lenient JSON reading shared by the envelope and the contracts.
//!
//! MassTransit's reader (System.Text.Json with case-insensitive names, comments skipped and trailing
//! commas allowed) is what Firely clients are written against, so we read the same way:
//! - [`parse_lenient`] tries a strict parse first and, only when that fails, strips `//` and `/* */`
//!   comments and trailing commas and tries again;
//! - [`Object`] gives case-insensitive access to the members of a JSON object while keeping every
//!   member as raw text, so a value we pass on (a FHIR resource) keeps the exact bytes it was sent with.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

/// Why a piece of JSON could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// The bytes are not UTF-8.
    #[error("the body is not valid UTF-8 (first bad byte at offset {0})")]
    InvalidUtf8(usize),
    /// The text is not JSON, even once comments and trailing commas are removed.
    #[error("the body is not valid JSON: {0}")]
    Syntax(String),
    /// A member has the wrong JSON type.
    #[error("`{field}` {problem}")]
    Field { field: String, problem: String },
}

impl JsonError {
    pub fn field(field: impl Into<String>, problem: impl Into<String>) -> Self {
        JsonError::Field { field: field.into(), problem: problem.into() }
    }

    /// `what` should be an object but is `kind` (a word of [`kind_of`]).
    pub fn not_an_object(what: impl Into<String>, kind: &str) -> Self {
        JsonError::field(what, format!("must be a JSON object, found {kind}"))
    }

    /// `what` should be an array but is `kind` (a word of [`kind_of`]).
    pub fn not_an_array(what: impl Into<String>, kind: &str) -> Self {
        JsonError::field(what, format!("must be a JSON array, found {kind}"))
    }
}

/// Decodes UTF-8, saying where it breaks.
pub fn utf8(bytes: &[u8]) -> Result<&str, JsonError> {
    std::str::from_utf8(bytes).map_err(|e| JsonError::InvalidUtf8(e.valid_up_to()))
}

/// Returns text that is strict JSON: the input itself when it already is, otherwise the input with
/// comments and trailing commas removed. Syntax errors are reported against the original text.
pub fn strict_text(text: &str) -> Result<Cow<'_, str>, JsonError> {
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Ok(_) => Ok(Cow::Borrowed(text)),
        Err(strict_error) => {
            let mut stripped = text.to_owned();
            if json_strip_comments::strip(&mut stripped).is_err() {
                return Err(JsonError::Syntax(strict_error.to_string()));
            }
            match serde_json::from_str::<serde::de::IgnoredAny>(&stripped) {
                Ok(_) => Ok(Cow::Owned(stripped)),
                Err(_) => Err(JsonError::Syntax(strict_error.to_string())),
            }
        }
    }
}

/// Parses lenient JSON text into an owned raw value (whitespace and member order kept). Strict JSON,
/// the usual case, is read in one pass; only text that fails it goes through [`strict_text`].
pub fn parse_lenient(text: &str) -> Result<Box<RawValue>, JsonError> {
    if let Ok(raw) = serde_json::from_str::<Box<RawValue>>(text) {
        return Ok(raw);
    }
    let strict = strict_text(text)?;
    serde_json::from_str::<Box<RawValue>>(&strict).map_err(|e| JsonError::Syntax(e.to_string()))
}

/// Whether `bytes`, read as lenient JSON, nests arrays and objects more than `max` deep. A linear
/// scan without allocation, so that a body nested a million deep is refused before any parser (or
/// any recursive drop) sees it. Brackets inside strings and comments do not count; bytes that are
/// not JSON are scanned all the same and left for the parser to refuse.
pub fn nesting_exceeds(bytes: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 1;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// Whether JSON `text` escapes half of a UTF-16 surrogate pair alone (`"\\ud800"`). The grammar lets it
/// through, but no UTF-8 text and no .NET string reader can hold it: a resource with one would be
/// stored as sent and then fail every reader.
pub fn has_lone_surrogate(text: &str) -> bool {
    let bytes = text.as_bytes();
    let hex = |at: usize| -> Option<u16> {
        let digits = bytes.get(at..at + 4)?;
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        if bytes.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        match hex(i + 2) {
            Some(0xD800..=0xDBFF) => {
                let low = if bytes.get(i + 6..i + 8) == Some(b"\\u") { hex(i + 8) } else { None };
                if !matches!(low, Some(0xDC00..=0xDFFF)) {
                    return true;
                }
                i += 12;
            }
            Some(0xDC00..=0xDFFF) => return true,
            _ => i += 6,
        }
    }
    false
}

/// The members of one JSON object, looked up by name without regard to ASCII case.
///
/// When a name occurs more than once (in any case), the first occurrence wins, as MassTransit's
/// Kafka header reader does; System.Text.Json would take the last, but a sender that relies on
/// either is already broken.
#[derive(Debug)]
pub struct Object<'a> {
    /// Names are borrowed from the text unless they hold escapes.
    members: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> Object<'a> {
    /// Reads `raw` as an object; `what` names it in the error ("the envelope", "instruction 2").
    pub fn parse(raw: &'a RawValue, what: &str) -> Result<Self, JsonError> {
        serde_json::from_str::<Object<'a>>(raw.get()).map_err(|_| JsonError::not_an_object(what, kind_of(raw)))
    }

    /// Reads strict JSON `text` that is an object, in one pass; `None` for anything else (text that
    /// is no JSON, lenient JSON, or JSON of another type), which the caller reads the slow way.
    pub fn parse_strict(text: &'a str) -> Option<Self> {
        serde_json::from_str::<Object<'a>>(text).ok()
    }

    /// The raw member, if present (a JSON `null` is returned as present; see [`Object::get_non_null`]).
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.members.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }

    /// The raw member, treating an explicit `null` as absent (MassTransit v7 omits nulls, v8 writes them).
    pub fn get_non_null(&self, name: &str) -> Option<&'a RawValue> {
        self.get(name).filter(|v| v.get() != "null")
    }

    /// Deserializes a member into `T`; absent and `null` give `None`.
    pub fn field<T: DeserializeOwned>(&self, name: &str, expected: &str) -> Result<Option<T>, JsonError> {
        match self.get_non_null(name) {
            None => Ok(None),
            Some(raw) => serde_json::from_str::<T>(raw.get())
                .map(Some)
                .map_err(|_| JsonError::field(name, format!("must be {expected}, found {}", kind_of(raw)))),
        }
    }

    /// A member that must be a string when present. Numbers and booleans are accepted and written
    /// as their JSON text, because loosely typed senders (JavaScript, Python) send `"itemId": 1`.
    pub fn string(&self, name: &str) -> Result<Option<String>, JsonError> {
        match self.get_non_null(name) {
            None => Ok(None),
            Some(raw) => {
                let text = raw.get();
                match text.as_bytes().first() {
                    Some(b'"') => serde_json::from_str::<String>(text)
                        .map(Some)
                        .map_err(|e| JsonError::field(name, e.to_string())),
                    Some(b'-' | b'0'..=b'9' | b't' | b'f') => Ok(Some(text.to_owned())),
                    _ => Err(JsonError::field(name, format!("must be a string, found {}", kind_of(raw)))),
                }
            }
        }
    }

    /// Every member name, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|(k, _)| k.as_ref())
    }

    /// Every member, in order.
    pub fn members(&self) -> impl Iterator<Item = (&str, &'a RawValue)> {
        self.members.iter().map(|(k, v)| (k.as_ref(), *v))
    }
}

/// A JSON array of raw elements, or an error naming `what`.
pub fn array<'a>(raw: &'a RawValue, what: &str) -> Result<Vec<&'a RawValue>, JsonError> {
    serde_json::from_str::<Vec<&'a RawValue>>(raw.get()).map_err(|_| JsonError::not_an_array(what, kind_of(raw)))
}

/// A word for the JSON type of a raw value, for error messages.
pub fn kind_of(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// An object is read as an ordered list of (name, raw value) pairs, keeping duplicates; anything
/// else is a type error. Usable inside other `Deserialize` impls, so that one pass over the text
/// can read nested objects.
impl<'de: 'a, 'a> serde::Deserialize<'de> for Object<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Object<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((Name(k), v)) = map.next_entry::<Name<'de>, &'de RawValue>()? {
                    members.push((k, v));
                }
                Ok(Object { members })
            }
        }
        deserializer.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// A member name, borrowed from the text when it has no escapes (serde's own `Cow` always copies).
pub struct Name<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Name<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Name<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Visit(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_trailing_commas_are_accepted_but_strict_json_is_untouched() {
        let strict = r#"{"a": 1}"#;
        assert!(matches!(strict_text(strict).unwrap(), Cow::Borrowed(_)));
        let loose = "{\n \"a\": 1, // one\n \"b\": [1,2,],\n}";
        let raw = parse_lenient(loose).unwrap();
        let v: serde_json::Value = serde_json::from_str(raw.get()).unwrap();
        assert_eq!(v, serde_json::json!({"a": 1, "b": [1, 2]}));
    }

    #[test]
    fn nesting_is_counted_outside_strings_and_comments_only() {
        assert!(!nesting_exceeds(br#"{"a": [1, {"b": []}]}"#, 4));
        assert!(nesting_exceeds(br#"{"a": [1, {"b": []}]}"#, 3));
        assert!(!nesting_exceeds(br#"{"a": "[[[[{{{{\"[[["}"#, 1), "brackets in strings, escaped quotes");
        assert!(!nesting_exceeds(b"{\"a\": 1 // [[[[\n, /* {{{{ */ \"b\": 2}", 1), "brackets in comments");
        let deep = format!("{}{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
        assert!(nesting_exceeds(deep.as_bytes(), 128));
        assert!(!nesting_exceeds(deep.as_bytes(), 1_000_000));
        // Unbalanced and truncated input is scanned without panicking.
        assert!(!nesting_exceeds(b"]]]}}\"\\", 1));
        assert!(!nesting_exceeds(b"/*", 1));
    }

    #[test]
    fn lone_surrogates_are_found_and_pairs_and_escaped_backslashes_are_not() {
        assert!(has_lone_surrogate(r#"{"a": "x\ud800"}"#));
        assert!(has_lone_surrogate(r#"{"a": "\udc00"}"#));
        assert!(has_lone_surrogate(r#"{"a": "\ud800\u0041"}"#));
        assert!(has_lone_surrogate(r#""\ud800"#), "truncated");
        assert!(!has_lone_surrogate(r#"{"a": "\ud83d\ude00 \u00fc \n"}"#), "a pair, a BMP escape");
        assert!(!has_lone_surrogate(r#"{"a": "\\ud800"}"#), "an escaped backslash before ud800");
    }

    #[test]
    fn broken_json_reports_the_strict_error() {
        let err = parse_lenient("{\"a\": ").unwrap_err();
        assert!(matches!(err, JsonError::Syntax(_)), "{err:?}");
    }

    #[test]
    fn object_lookup_ignores_case_and_keeps_raw_bytes() {
        let raw = parse_lenient(r#"{"ItemId": 7, "Resource": {"b" : 1,  "a":2}}"#).unwrap();
        let obj = Object::parse(&raw, "x").unwrap();
        assert_eq!(obj.string("itemid").unwrap().as_deref(), Some("7"));
        assert_eq!(obj.get("resource").unwrap().get(), r#"{"b" : 1,  "a":2}"#);
        assert!(Object::parse(obj.get("itemId").unwrap(), "itemId").is_err());
    }
}
