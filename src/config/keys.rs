//! Case-insensitive key matching and environment overrides, on the raw settings tree.
//!
//! The known keys come from the serialized default settings, so the key tree can never disagree
//! with the structs: every object member of the defaults is a section, everything else (and the
//! free-form maps listed in [`FREE_FORM`]) is a leaf whose value is passed to the struct as given.

use serde_json::{Map, Value};

use super::ConfigError;

/// Settings whose value is an object with keys of the user's choosing (kept as written).
pub const FREE_FORM: &[&str] = &["PubSub.MessageBroker.QueueArguments"];

/// Keys Firely documents in another place than ours, accepted there and moved to ours:
/// (Firely's path, our path).
pub const ALIASES: &[(&str, &str)] = &[("PubSub.MessageBroker.RabbitMQ.Port", "PubSub.MessageBroker.Port")];

/// The known keys, as a tree of canonical names.
#[derive(Debug)]
pub struct KeyTree {
    root: Node,
}

#[derive(Debug)]
enum Node {
    Section(Vec<(String, Node)>),
    Leaf,
}

impl KeyTree {
    /// Builds the tree from the serialized defaults.
    pub fn from_defaults(defaults: &Value) -> KeyTree {
        let mut root = build(defaults, "");
        for (alias, _) in ALIASES {
            insert_leaf(&mut root, alias);
        }
        KeyTree { root }
    }

    /// Rewrites every key of `input` to its canonical case, drops nulls (ASP.NET reads a null as
    /// "not set"), and refuses unknown keys and keys given twice in different case.
    pub fn canonicalize(&self, input: Value) -> Result<Value, ConfigError> {
        canonicalize(&self.root, input, "")
    }

    /// Resolves an environment variable's key path (segments in any case) to canonical names.
    /// Under a free-form map the remaining segments are kept as written, joined by `:`.
    pub fn resolve(&self, segments: &[&str]) -> Option<(Vec<String>, bool)> {
        let mut node = &self.root;
        let mut path: Vec<String> = Vec::new();
        for (i, segment) in segments.iter().enumerate() {
            match node {
                Node::Section(children) => {
                    let (name, child) = children.iter().find(|(name, _)| name.eq_ignore_ascii_case(segment))?;
                    path.push(name.clone());
                    node = child;
                }
                Node::Leaf => {
                    let joined = path.join(".");
                    if FREE_FORM.contains(&joined.as_str()) && i == segments.len() - 1 && !segment.is_empty() {
                        path.push((*segment).to_owned());
                        return Some((path, true));
                    }
                    return None;
                }
            }
        }
        match node {
            Node::Leaf => Some((path, false)),
            Node::Section(_) => None,
        }
    }
}

fn build(value: &Value, path: &str) -> Node {
    match value {
        Value::Object(map) if !FREE_FORM.contains(&path) => {
            Node::Section(map.iter().map(|(k, v)| (k.clone(), build(v, &join(path, k)))).collect())
        }
        _ => Node::Leaf,
    }
}

fn insert_leaf(root: &mut Node, path: &str) {
    let mut node = root;
    for segment in path.split('.') {
        let Node::Section(children) = node else { return };
        let index = match children.iter().position(|(name, _)| name == segment) {
            Some(i) => i,
            None => {
                children.push((segment.to_owned(), Node::Section(Vec::new())));
                children.len() - 1
            }
        };
        node = &mut children[index].1;
    }
    *node = Node::Leaf;
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

fn canonicalize(node: &Node, input: Value, path: &str) -> Result<Value, ConfigError> {
    let children = match node {
        Node::Leaf => return Ok(input),
        Node::Section(children) => children,
    };
    let map = match input {
        Value::Object(map) => map,
        other => {
            return Err(ConfigError::invalid(
                if path.is_empty() { "(top level)" } else { path },
                format!("must be a section (an object of settings), found {}", super::kind(&other)),
            ));
        }
    };
    let mut out = Map::new();
    for (key, value) in map {
        let Some((name, child)) = children.iter().find(|(name, _)| name.eq_ignore_ascii_case(&key)) else {
            let known: Vec<&str> = children.iter().map(|(n, _)| n.as_str()).collect();
            return Err(ConfigError::UnknownKey { key: join(path, &key), known: known.join(", ") });
        };
        if value.is_null() {
            continue;
        }
        let full = join(path, name);
        let value = canonicalize(child, value, &full)?;
        match out.get_mut(name) {
            None => {
                out.insert(name.clone(), value);
            }
            // `[pubsub.messagebroker]` and `[PubSub.ClaimCheck]` in one TOML file are one section,
            // as ASP.NET would merge them; only a setting given twice is ambiguous.
            Some(existing) => merge_section(existing, value, &full)?,
        }
    }
    Ok(Value::Object(out))
}

fn merge_section(into: &mut Value, from: Value, path: &str) -> Result<(), ConfigError> {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) if !FREE_FORM.contains(&path) => {
            for (key, value) in from {
                let full = join(path, &key);
                match into.get_mut(&key) {
                    None => {
                        into.insert(key, value);
                    }
                    Some(existing) => merge_section(existing, value, &full)?,
                }
            }
            Ok(())
        }
        _ => Err(ConfigError::invalid(path, "is given twice (keys are compared without regard to case)")),
    }
}

/// Sets `value` at `path` in `tree`, creating sections on the way.
pub fn set(tree: &mut Value, path: &[String], value: Value) {
    let mut node = tree;
    for segment in path {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        let Value::Object(map) = node else { return };
        // Keys under a free-form map may differ in case from one already in the file.
        let existing = map.keys().find(|k| k.eq_ignore_ascii_case(segment)).cloned();
        let key = existing.unwrap_or_else(|| segment.clone());
        node = map.entry(key).or_insert(Value::Null);
    }
    *node = value;
}

/// Removes and returns the value at `path`, if any.
pub fn take(tree: &mut Value, path: &str) -> Option<Value> {
    let mut segments: Vec<&str> = path.split('.').collect();
    let last = segments.pop()?;
    let mut node = tree;
    for segment in segments {
        node = node.as_object_mut()?.get_mut(segment)?;
    }
    node.as_object_mut()?.remove(last)
}

/// The value at `path`, if any.
pub fn get<'a>(tree: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(tree, |node, segment| node.as_object()?.get(segment))
}
