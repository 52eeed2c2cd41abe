//! The `TROUPE_*` environment as a configuration source: `TROUPE_<SECTION>__<KEY>` and the
//! top-level `TROUPE_NODE_ID` / `TROUPE_DATA_DIR`.
//!
//! Values are parsed like TOML values (`4`, `true`, `["localhost"]`), as figment's `Env` does,
//! except for keys whose values are strings, which are taken as written: parsed, `TROUPE_NODE_ID=7`
//! was the number 7, which a string key refuses ("invalid type: found unsigned int"). Names are
//! only read here; which ones are misspelled is `misspelled_env_keys`'s business.

use figment::providers::Env;
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

/// Top-level keys that may be set without a section (`TROUPE_NODE_ID`, `TROUPE_DATA_DIR`).
const TOP_LEVEL_ENV_KEYS: [&str; 2] = ["node_id", "data_dir"];

/// Keys whose values are strings (ids, paths, filters, addresses, enum names): their variables
/// are taken as written. A test checks that every key whose default is a string is here.
const STRING_KEYS: [&str; 10] = [
    "node_id",
    "data_dir",
    "http.listen",
    "log.level",
    "log.format",
    "cluster.listen",
    "cluster.profile",
    "cluster.ca",
    "cluster.cert",
    "cluster.key",
];

/// Tables whose entries are strings (`TROUPE_CLUSTER__LABELS__RACK=3` is the label "3").
const STRING_TABLES: [&str; 2] = ["cluster.labels", "gateway.aliases"];

/// The `TROUPE_*` configuration variables, string keys kept as strings.
pub(super) struct TroupeEnv {
    env: Env,
}

impl TroupeEnv {
    /// The variables of the process's environment.
    pub(super) fn new() -> Self {
        Self {
            env: Env::prefixed("TROUPE_")
                .filter(|key| {
                    key.as_str().contains("__")
                        || TOP_LEVEL_ENV_KEYS
                            .iter()
                            .any(|top| key.as_str().eq_ignore_ascii_case(top))
                })
                .split("__"),
        }
    }
}

/// Whether the value of `key` (lowercase, dotted: `cluster.labels.rack`) is taken as written.
fn takes_a_string(key: &str) -> bool {
    STRING_KEYS.contains(&key)
        || STRING_TABLES.iter().any(|table| {
            key.strip_prefix(table)
                .is_some_and(|rest| rest.starts_with('.'))
        })
}

/// Puts `value` at the dotted `key` inside `dict`, making the tables on the way.
fn insert(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

impl Provider for TroupeEnv {
    fn metadata(&self) -> Metadata {
        // Errors then name the variable (`TROUPE_NODE_ID`), as with figment's own `Env`.
        self.env.metadata()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, written) in self.env.iter() {
            let value = if takes_a_string(key.as_str()) {
                Value::from(written)
            } else {
                written.parse().unwrap_or_else(|never| match never {})
            };
            insert(&mut dict, key.as_str(), value);
        }
        Ok(self.env.profile.collect(dict))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adding a string-valued key without listing it would bring back numbers refused for it.
    #[test]
    fn every_key_whose_default_is_a_string_is_taken_as_written() {
        fn walk(prefix: &str, value: &serde_json::Value, found: &mut Vec<String>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (key, value) in map {
                        let path = if prefix.is_empty() {
                            key.clone()
                        } else {
                            format!("{prefix}.{key}")
                        };
                        walk(&path, value, found);
                    }
                }
                serde_json::Value::String(_) => found.push(prefix.to_owned()),
                _ => {}
            }
        }
        // The top-level keys are strings too; unset, they are not in the defaults.
        let config = super::super::Config {
            node_id: Some(troupe_actors::ids::NodeId::new("n").unwrap()),
            data_dir: Some("/d".into()),
            ..Default::default()
        };
        let mut strings = Vec::new();
        walk("", &serde_json::to_value(&config).unwrap(), &mut strings);
        assert!(strings.len() >= 10, "{strings:?}");
        for key in strings {
            assert!(takes_a_string(&key), "{key} is a string key");
        }
        assert!(takes_a_string("cluster.labels.rack"));
        assert!(!takes_a_string("cluster.labels"));
        assert!(!takes_a_string("sessions.max_concurrent"));
    }
}
