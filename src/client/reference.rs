//! Reading the references given to `retrieve`: `Type/id` or `Type/id/_history/vid`.
//!
//! Invariant: a reference is accepted only when its type, id and version follow FHIR's rules
//! (type `[A-Z][A-Za-z]*`, id and versionId `[A-Za-z0-9\-.]{1,64}`), so nothing malformed is sent.

use crate::contracts::ResourceReference;

/// Parses `Type/id` or `Type/id/_history/vid`.
pub fn parse_reference(text: &str) -> Result<ResourceReference, String> {
    let malformed = |why: &str| format!("`{text}` is not a reference ({why}); write Type/id or Type/id/_history/vid");
    let parts: Vec<&str> = text.split('/').collect();
    let (resource_type, resource_id, version) = match parts.as_slice() {
        [t, id] => (*t, *id, None),
        [t, id, "_history", vid] => (*t, *id, Some(*vid)),
        [_, _, _, _] => return Err(malformed("the third part must be _history")),
        _ => return Err(malformed("wrong number of parts")),
    };
    if !is_resource_type(resource_type) {
        return Err(malformed("the type must be a FHIR resource type such as Patient"));
    }
    if !is_fhir_id(resource_id) {
        return Err(malformed("the id must be 1 to 64 letters, digits, '-' or '.'"));
    }
    if let Some(vid) = version
        && !is_fhir_id(vid)
    {
        return Err(malformed("the version must be 1 to 64 letters, digits, '-' or '.'"));
    }
    Ok(ResourceReference {
        resource_type: resource_type.to_owned(),
        resource_id: resource_id.to_owned(),
        version: version.map(str::to_owned),
    })
}

/// `Type/id` or `Type/id/_history/vid`.
pub fn format_reference(reference: &ResourceReference) -> String {
    match &reference.version {
        Some(vid) => format!("{}/{}/_history/{vid}", reference.resource_type, reference.resource_id),
        None => format!("{}/{}", reference.resource_type, reference.resource_id),
    }
}

fn is_resource_type(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphabetic())
}

fn is_fhir_id(text: &str) -> bool {
    (1..=64).contains(&text.len()) && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_and_versioned_references() {
        let r = parse_reference("Patient/p-1.a").unwrap();
        assert_eq!((r.resource_type.as_str(), r.resource_id.as_str(), r.version), ("Patient", "p-1.a", None));
        let r = parse_reference("Observation/o1/_history/3").unwrap();
        assert_eq!(r.version.as_deref(), Some("3"));
        assert_eq!(format_reference(&r), "Observation/o1/_history/3");
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "Patient",
            "Patient/",
            "/p1",
            "patient/p1",
            "Patient/p 1",
            "Patient/p1/history/2",
            "Patient/p1/_history/",
            "Patient/p1/_history/2/x",
            &format!("Patient/{}", "a".repeat(65)),
        ] {
            assert!(parse_reference(bad).is_err(), "{bad}");
        }
        assert!(parse_reference("Patient").unwrap_err().contains("Type/id"));
    }
}
