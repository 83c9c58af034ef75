//! Reading the resources to store from files: one FHIR resource, a JSON array of resources, a
//! Bundle (its `entry[].resource`), or NDJSON (one resource per line).
//!
//! Invariants: every resource keeps the exact bytes it has in the file (it is stored that way);
//! every error names the file and, where there is one, the line.

use serde_json::value::RawValue;

/// A resource read from a file, ready to become a store instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceResource {
    /// Where it came from: `FILE` for a file holding one resource, `FILE:LINE` otherwise. Used as
    /// the instruction's itemId, so that a failure reported by the server points into the input.
    pub label: String,
    pub resource_type: String,
    pub id: Option<String>,
    /// The resource exactly as written in the file.
    pub text: String,
}

/// Why a file's resources cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// Reads the resources of one file. `name` is how the file is called in labels and errors (the path
/// as given, or `standard input`); `ndjson` says the file is NDJSON by its extension, in which case
/// every JSON value in it is one resource, a Bundle or an array included.
pub fn read_resources(name: &str, bytes: &[u8], ndjson: bool) -> Result<Vec<SourceResource>, InputError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = line_at(&String::from_utf8_lossy(&bytes[..e.valid_up_to()]), e.valid_up_to());
        InputError(format!("{name} line {line}: the file is not UTF-8 text; save it as UTF-8 JSON"))
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let values = json_values(name, text)?;
    let resources = match values.as_slice() {
        [] => Vec::new(),
        [single] if !ndjson => document(name, text, single)?,
        many => many.iter().map(|value| resource(name, text, value, true)).collect::<Result<_, _>>()?,
    };
    if resources.is_empty() {
        return Err(InputError(format!("{name}: holds no resources")));
    }
    Ok(resources)
}

/// Every top-level JSON value of the text, in order, borrowed from it.
fn json_values<'a>(name: &str, text: &'a str) -> Result<Vec<&'a RawValue>, InputError> {
    let mut values = Vec::new();
    for value in serde_json::Deserializer::from_str(text).into_iter::<&RawValue>() {
        match value {
            Ok(value) => values.push(value),
            Err(e) => {
                let detail = e.to_string();
                let detail = detail.split(" at line ").next().unwrap_or(&detail);
                return Err(InputError(format!(
                    "{name} line {}: not valid JSON ({detail} at column {})",
                    e.line().max(1),
                    e.column()
                )));
            }
        }
    }
    Ok(values)
}

/// One JSON document: a resource, an array of resources, or a Bundle whose entries are taken.
fn document(name: &str, text: &str, value: &RawValue) -> Result<Vec<SourceResource>, InputError> {
    let at = |raw: &RawValue| line_at(text, offset_in(text, raw));
    if value.get().starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(value.get())
            .map_err(|e| InputError(format!("{name} line {}: not valid JSON ({e})", at(value))))?;
        return items.into_iter().map(|item| resource(name, text, item, true)).collect();
    }
    let read = resource(name, text, value, false)?;
    if read.resource_type != "Bundle" {
        return Ok(vec![read]);
    }
    #[derive(serde::Deserialize)]
    struct Bundle<'a> {
        #[serde(borrow, default)]
        entry: Option<Vec<&'a RawValue>>,
    }
    #[derive(serde::Deserialize)]
    struct Entry<'a> {
        #[serde(borrow, default)]
        resource: Option<&'a RawValue>,
    }
    let bundle: Bundle = serde_json::from_str(value.get())
        .map_err(|e| InputError(format!("{name}: the Bundle's `entry` must be an array of entries ({e})")))?;
    let mut resources = Vec::new();
    for (index, entry) in bundle.entry.unwrap_or_default().into_iter().enumerate() {
        let read: Entry = serde_json::from_str(entry.get()).map_err(|_| {
            InputError(format!("{name} line {}: Bundle entry {index} is not an object with a resource", at(entry)))
        })?;
        let Some(item) = read.resource.filter(|r| r.get() != "null") else {
            return Err(InputError(format!("{name} line {}: Bundle entry {index} has no resource", at(entry))));
        };
        resources.push(resource(name, text, item, true)?);
    }
    Ok(resources)
}

/// Reads one resource: a JSON object with a string `resourceType` (and usually an `id`).
fn resource(name: &str, text: &str, value: &RawValue, with_line: bool) -> Result<SourceResource, InputError> {
    let line = line_at(text, offset_in(text, value));
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(rename = "resourceType")]
        resource_type: Option<serde_json::Value>,
        id: Option<serde_json::Value>,
    }
    let not_resource =
        || InputError(format!("{name} line {line}: not a FHIR resource (expected a JSON object with a resourceType)"));
    if !value.get().starts_with('{') {
        return Err(not_resource());
    }
    let head: Head = serde_json::from_str(value.get()).map_err(|_| not_resource())?;
    let resource_type = match head.resource_type {
        Some(serde_json::Value::String(t)) if !t.trim().is_empty() => t,
        _ => return Err(not_resource()),
    };
    let id = match head.id {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(id)) => Some(id),
        Some(_) => return Err(InputError(format!("{name} line {line}: the resource's `id` must be a string"))),
    };
    Ok(SourceResource {
        label: if with_line { format!("{name}:{line}") } else { name.to_owned() },
        resource_type,
        id,
        text: value.get().to_owned(),
    })
}

/// Where a value borrowed from `text` starts in it.
fn offset_in(text: &str, value: &RawValue) -> usize {
    (value.get().as_ptr() as usize).saturating_sub(text.as_ptr() as usize).min(text.len())
}

/// The 1-based line of a byte offset.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENT: &str = "{\n  \"resourceType\": \"Patient\",\n  \"id\": \"p1\"\n}";

    #[test]
    fn one_resource_keeps_its_bytes_and_is_labelled_by_the_file() {
        let read = read_resources("p.json", format!("{PATIENT}\n").as_bytes(), false).unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].text, PATIENT);
        assert_eq!(read[0].label, "p.json");
        assert_eq!((read[0].resource_type.as_str(), read[0].id.as_deref()), ("Patient", Some("p1")));
    }

    #[test]
    fn arrays_bundles_and_ndjson_give_one_resource_each_with_its_line() {
        let array = format!("[\n{PATIENT},\n{{\"resourceType\":\"Organization\",\"id\":\"o1\"}}\n]");
        let read = read_resources("a.json", array.as_bytes(), false).unwrap();
        assert_eq!(read.iter().map(|r| r.label.as_str()).collect::<Vec<_>>(), ["a.json:2", "a.json:6"]);
        assert_eq!(read[0].text, PATIENT);

        let bundle = r#"{"resourceType":"Bundle","type":"collection","entry":[
            {"fullUrl":"x","resource":{"resourceType":"Patient","id":"b1"}},
            {"resource":{"resourceType":"Patient","id":"b2"}}]}"#;
        let read = read_resources("b.json", bundle.as_bytes(), false).unwrap();
        assert_eq!(read.iter().map(|r| r.id.as_deref().unwrap()).collect::<Vec<_>>(), ["b1", "b2"]);
        assert_eq!(read[1].text, r#"{"resourceType":"Patient","id":"b2"}"#);
        assert_eq!(read[1].label, "b.json:3");

        let ndjson = "{\"resourceType\":\"Patient\",\"id\":\"n1\"}\n\n{\"resourceType\":\"Bundle\",\"id\":\"n2\"}\n";
        let read = read_resources("c.txt", ndjson.as_bytes(), false).unwrap();
        assert_eq!(read.iter().map(|r| r.label.as_str()).collect::<Vec<_>>(), ["c.txt:1", "c.txt:3"]);
        // By extension, a lone Bundle line is a resource of its own.
        let read = read_resources("d.ndjson", b"{\"resourceType\":\"Bundle\",\"id\":\"n2\"}", true).unwrap();
        assert_eq!(read[0].resource_type, "Bundle");
    }

    #[test]
    fn errors_name_the_file_and_the_line() {
        let e = read_resources("bad.json", b"{\"resourceType\":\"Patient\"}\nnot json\n", false).unwrap_err();
        assert!(e.0.starts_with("bad.json line 2: not valid JSON"), "{e}");
        let e = read_resources("x.json", b"[1]", false).unwrap_err();
        assert!(e.0.contains("x.json line 1: not a FHIR resource"), "{e}");
        let e = read_resources("y.json", b"  \n", false).unwrap_err();
        assert_eq!(e.0, "y.json: holds no resources");
        let e = read_resources("z.json", b"{\"a\":\"\xff\"}", false).unwrap_err();
        assert!(e.0.contains("not UTF-8"), "{e}");
        let e = read_resources("e.json", br#"{"resourceType":"Bundle","entry":[{"request":{}}]}"#, false).unwrap_err();
        assert!(e.0.contains("Bundle entry 0 has no resource"), "{e}");
    }
}
