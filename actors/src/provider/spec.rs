//! What a ProviderActor is configured with: its name, models, fallback chain, policy settings and
//! concurrency limits, as the node reads them from a `[[providers]]` table.

use std::fmt;
use std::str::FromStr;

use super::ProviderPolicyConfig;

/// A model at a provider: `provider/model` (the model part may itself contain `/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// The provider's configured name.
    pub provider: String,
    /// The model as the provider names it.
    pub model: String,
}

impl Target {
    /// Builds a target.
    pub fn new(provider: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            provider: provider.into(),
            model: model.into(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

/// A string that is not `provider/model`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not PROVIDER/MODEL (e.g. \"openai/gpt-4o-mini\")")]
pub struct InvalidTarget(pub String);

impl FromStr for Target {
    type Err = InvalidTarget;

    /// Splits at the first `/`: `openrouter/anthropic/claude` is the model `anthropic/claude` at
    /// the provider `openrouter`. Both parts must be non-empty.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.split_once('/') {
            Some((provider, model)) if !provider.is_empty() && !model.is_empty() => {
                Ok(Self::new(provider, model))
            }
            _ => Err(InvalidTarget(value.chars().take(200).collect())),
        }
    }
}

/// Everything a ProviderActor needs to know about its provider. Built once by the node from the
/// configuration; shared (read-only) by every instance of the actor and by callers.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSpec {
    /// The configured name (`[[providers]] name`), used in routes, events and actor paths.
    pub name: String,
    /// Models it serves; empty means "any model asked for by `name/model`".
    pub models: Vec<String>,
    /// Where a call goes, in order, when this provider cannot serve it.
    pub fallback: Vec<Target>,
    /// Budget, breaker and retry settings.
    pub policy: ProviderPolicyConfig,
    /// Calls in flight at once (at least 1).
    pub max_concurrency: usize,
    /// Calls waiting for budget or a free slot, at most; past it a call is refused at once.
    pub max_queue: usize,
}

impl ProviderSpec {
    /// A spec with default policy, no models, no fallback, 64 calls at once and 1024 waiting.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            models: Vec::new(),
            fallback: Vec::new(),
            policy: ProviderPolicyConfig::default(),
            max_concurrency: 64,
            max_queue: 1024,
        }
    }

    /// True when `model` may be asked of this provider: it is listed, or nothing is listed.
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|served| served == model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_at_the_first_slash() {
        let target: Target = "openrouter/anthropic/claude".parse().unwrap();
        assert_eq!(target, Target::new("openrouter", "anthropic/claude"));
        assert_eq!(target.to_string(), "openrouter/anthropic/claude");
        for bad in ["", "gpt-4o", "/m", "p/", "/"] {
            assert!(bad.parse::<Target>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_empty_model_list_serves_anything() {
        let mut spec = ProviderSpec::new("p");
        assert!(spec.serves("anything"));
        spec.models = vec!["a".into()];
        assert!(spec.serves("a"));
        assert!(!spec.serves("b"));
    }
}
