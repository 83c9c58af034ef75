//! Value readers that accept what ASP.NET configuration accepts.
//!
//! ASP.NET flattens every setting to a string, so Firely accepts `"Port": "5672"` as well as
//! `"Port": 5672`, and an environment variable is always text. These readers take either form and
//! convert it to the setting's type; the messages they produce become `Key.Path: message`.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::Deserializer;
use serde::de::{self, Visitor};

/// An unsigned integer setting, with its bounds for messages.
pub trait Int: Copy + FromStr + TryFrom<u64> + fmt::Display {
    const MAX: u64;
}

macro_rules! int {
    ($($t:ty),+) => { $(impl Int for $t { const MAX: u64 = <$t>::MAX as u64; })+ };
}
int!(u16, u32, u64, usize);

struct IntVisitor<T>(PhantomData<T>);

impl<T: Int> IntVisitor<T> {
    fn range<E: de::Error>(found: impl fmt::Display) -> E {
        E::custom(format!("must be a whole number between 0 and {}, found {found}", T::MAX))
    }
}

impl<'de, T: Int> Visitor<'de> for IntVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a whole number between 0 and {}", T::MAX)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        T::try_from(v).map_err(|_| Self::range(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(Self::range(v)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        if v.fract() == 0.0 && v >= 0.0 && v <= T::MAX as f64 {
            // Exact: the value is integral and within range.
            self.visit_u64(v as u64)
        } else {
            Err(Self::range(v))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        let text = v.trim();
        match text.parse::<u64>() {
            Ok(n) => self.visit_u64(n),
            Err(_) => match text.parse::<i64>() {
                Ok(n) => Err(Self::range(n)),
                Err(_) => Err(E::custom(format!("must be a whole number, found `{v}`"))),
            },
        }
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        Err(E::custom(format!("must be a whole number, found {v}")))
    }
}

/// Reads an unsigned integer given as a number or as text.
pub fn int<'de, D: Deserializer<'de>, T: Int>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(IntVisitor(PhantomData))
}

struct BoolVisitor;

impl Visitor<'_> for BoolVisitor {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("true or false")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        match v.trim() {
            t if t.eq_ignore_ascii_case("true") => Ok(true),
            t if t.eq_ignore_ascii_case("false") => Ok(false),
            _ => Err(E::custom(format!("must be true or false, found `{v}`"))),
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        Err(E::custom(format!("must be true or false, found {v}")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        Err(E::custom(format!("must be true or false, found {v}")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        Err(E::custom(format!("must be true or false, found {v}")))
    }
}

/// Reads a boolean given as `true`/`false` or as that text in any case.
pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    d.deserialize_any(BoolVisitor)
}

struct StringVisitor;

impl Visitor<'_> for StringVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    // A password such as 1234 written without quotes is still meant as text.
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
}

/// Reads text; numbers and booleans are taken as their text.
pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_any(StringVisitor)
}

/// Reads optional text; an empty string counts as not set (Firely's templates carry `""`).
pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = string(d)?;
    Ok(if text.trim().is_empty() { None } else { Some(text) })
}

/// Reads an optional boolean.
pub fn opt_boolean<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    boolean(d).map(Some)
}

/// Reads a list of strings: a JSON array, or text holding a JSON array or a comma-separated list.
pub fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let value = serde_json::Value::deserialize_from(d)?;
    let value = match value {
        serde_json::Value::String(text) if text.trim_start().starts_with('[') => {
            serde_json::from_str(&text).map_err(|e| {
                <D::Error as de::Error>::custom(format!("must be a list of strings; the text is not a JSON array: {e}"))
            })?
        }
        serde_json::Value::String(text) => {
            return Ok(text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect());
        }
        other => other,
    };
    match value {
        serde_json::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                serde_json::Value::String(s) => Ok(s),
                other => {
                    Err(de::Error::custom(format!("must be a list of strings, item {i} is {}", super::kind(&other))))
                }
            })
            .collect(),
        other => Err(de::Error::custom(format!("must be a list of strings, found {}", super::kind(&other)))),
    }
}

/// Reads a JSON object: an object, or text holding one (as an environment variable gives it).
pub fn object<'de, D: Deserializer<'de>>(d: D) -> Result<serde_json::Map<String, serde_json::Value>, D::Error> {
    let value = serde_json::Value::deserialize_from(d)?;
    let value = match value {
        serde_json::Value::String(text) => serde_json::from_str(&text).map_err(|e| {
            <D::Error as de::Error>::custom(format!("must be an object; the text is not a JSON object: {e}"))
        })?,
        other => other,
    };
    match value {
        serde_json::Value::Object(map) => Ok(map),
        other => Err(de::Error::custom(format!("must be an object, found {}", super::kind(&other)))),
    }
}

/// Reads a socket address such as `127.0.0.1:8080` or `[::]:8080`.
pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = string(d)?;
    SocketAddr::from_str(text.trim()).map_err(|_| {
        de::Error::custom(format!("must be an IP address and port such as 127.0.0.1:8080 or [::]:8080, found `{text}`"))
    })
}

/// `serde_json::Value::deserialize` under a name that reads well above.
trait DeserializeFrom: Sized {
    fn deserialize_from<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
}

impl DeserializeFrom for serde_json::Value {
    fn deserialize_from<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <serde_json::Value as serde::Deserialize>::deserialize(d)
    }
}
