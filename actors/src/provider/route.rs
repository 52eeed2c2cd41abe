//! Which provider serves a model name: explicit `provider/model`, aliases, and bare model names
//! a provider lists; and the fallback chain a call follows from there.
//!
//! Pure: a table built once from the providers' specs and the configured aliases.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::spec::{ProviderSpec, Target};

/// Longest model name accepted (longer ones are refused before any lookup).
pub const MAX_MODEL_NAME: usize = 256;

/// At most this many names are listed in an error.
const LISTED_IN_ERRORS: usize = 50;

/// Where a model name leads: the provider it names first, then the fallback chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The name as the caller gave it.
    pub requested: String,
    /// The providers to try, in order; never empty.
    pub hops: Vec<Hop>,
}

/// One provider of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// Index of the provider in the routing table (configuration order).
    pub provider: usize,
    /// The provider and the model it is asked for.
    pub target: Target,
}

/// A model that can be asked for, for `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    /// What to send as `model`.
    pub id: String,
    /// The provider serving it (for an alias: the one it points at).
    pub provider: String,
}

/// A model name that leads nowhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No provider serves this name.
    #[error(
        "model {requested:?} is not served by this node; use PROVIDER/MODEL or one of: {}",
        listed(available)
    )]
    UnknownModel {
        /// The name asked for (cut to a readable length).
        requested: String,
        /// What can be asked for.
        available: Vec<String>,
    },
    /// The provider exists but does not list the model.
    #[error(
        "provider {provider:?} does not serve {model:?}; it serves: {}; add it to the \
         provider's `models` to route it",
        listed(served)
    )]
    NotServed {
        /// The provider.
        provider: String,
        /// The model asked for.
        model: String,
        /// What it serves.
        served: Vec<String>,
    },
    /// The name is empty or too long.
    #[error("model names must be 1 to {MAX_MODEL_NAME} bytes")]
    BadName,
}

fn listed(names: &[String]) -> String {
    if names.is_empty() {
        return "(none configured)".to_owned();
    }
    let mut text = names
        .iter()
        .take(LISTED_IN_ERRORS)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LISTED_IN_ERRORS {
        text.push_str(&format!(" and {} more", names.len() - LISTED_IN_ERRORS));
    }
    text
}

/// A routing table that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRoutes {
    /// An alias points at something that is not `provider/model` of a configured provider.
    #[error("gateway alias {alias:?} = {target:?}: {reason}")]
    Alias {
        /// The alias.
        alias: String,
        /// Its target as configured.
        target: String,
        /// What is wrong.
        reason: String,
    },
    /// A fallback names a provider that is not configured.
    #[error("provider {provider:?} falls back to {target}, but no provider is named {missing:?}")]
    Fallback {
        /// The provider whose chain is wrong.
        provider: String,
        /// The fallback.
        target: Target,
        /// The missing provider.
        missing: String,
    },
    /// Two providers share a name.
    #[error("two providers are named {0:?}")]
    Duplicate(String),
}

/// The routing table.
#[derive(Debug, Clone)]
pub struct Routes {
    providers: Vec<Arc<ProviderSpec>>,
    by_name: HashMap<String, usize>,
    aliases: BTreeMap<String, Target>,
}

impl Routes {
    /// Builds the table; aliases map a name to `provider/model`.
    pub fn new(
        providers: Vec<Arc<ProviderSpec>>,
        aliases: &BTreeMap<String, String>,
    ) -> Result<Self, InvalidRoutes> {
        let mut by_name = HashMap::new();
        for (index, spec) in providers.iter().enumerate() {
            if by_name.insert(spec.name.clone(), index).is_some() {
                return Err(InvalidRoutes::Duplicate(spec.name.clone()));
            }
        }
        for spec in &providers {
            for target in &spec.fallback {
                if !by_name.contains_key(&target.provider) {
                    return Err(InvalidRoutes::Fallback {
                        provider: spec.name.clone(),
                        target: target.clone(),
                        missing: target.provider.clone(),
                    });
                }
            }
        }
        let mut table = Self {
            providers,
            by_name,
            aliases: BTreeMap::new(),
        };
        for (alias, target) in aliases {
            let invalid = |reason: String| InvalidRoutes::Alias {
                alias: alias.clone(),
                target: target.clone(),
                reason,
            };
            let parsed: Target = target.parse().map_err(|e| invalid(format!("{e}")))?;
            table
                .explicit(&parsed)
                .map_err(|e| invalid(e.to_string()))?;
            table.aliases.insert(alias.clone(), parsed);
        }
        Ok(table)
    }

    /// The providers, in configuration order.
    pub fn providers(&self) -> &[Arc<ProviderSpec>] {
        &self.providers
    }

    /// Where `requested` leads. First match wins: an alias; `provider/model` for a configured
    /// provider (which must list the model, unless it lists none); a bare name listed by a
    /// provider (the first in configuration order). The chain then follows the first provider's
    /// `fallback`, skipping targets already on it.
    pub fn resolve(&self, requested: &str) -> Result<Route, RouteError> {
        if requested.is_empty() || requested.len() > MAX_MODEL_NAME {
            return Err(RouteError::BadName);
        }
        let first = if let Some(target) = self.aliases.get(requested) {
            self.explicit(target)?
        } else if let Some(target) = requested
            .parse::<Target>()
            .ok()
            .filter(|target| self.by_name.contains_key(&target.provider))
        {
            self.explicit(&target)?
        } else {
            self.bare(requested)?
        };
        let mut hops = vec![first];
        let spec = &self.providers[hops[0].provider];
        for target in &spec.fallback {
            if hops.iter().any(|hop| &hop.target == target) {
                continue;
            }
            if let Some(&provider) = self.by_name.get(&target.provider) {
                hops.push(Hop {
                    provider,
                    target: target.clone(),
                });
            }
        }
        Ok(Route {
            requested: requested.to_owned(),
            hops,
        })
    }

    /// Every name that can be asked for: `provider/model` for each listed model, then aliases.
    pub fn models(&self) -> Vec<ModelEntry> {
        let mut models: Vec<ModelEntry> = self
            .providers
            .iter()
            .flat_map(|spec| {
                spec.models.iter().map(|model| ModelEntry {
                    id: Target::new(spec.name.clone(), model.clone()).to_string(),
                    provider: spec.name.clone(),
                })
            })
            .collect();
        models.extend(self.aliases.iter().map(|(alias, target)| ModelEntry {
            id: alias.clone(),
            provider: target.provider.clone(),
        }));
        models
    }

    fn explicit(&self, target: &Target) -> Result<Hop, RouteError> {
        let Some(&provider) = self.by_name.get(&target.provider) else {
            return Err(self.unknown(&target.to_string()));
        };
        let spec = &self.providers[provider];
        if !spec.serves(&target.model) {
            return Err(RouteError::NotServed {
                provider: spec.name.clone(),
                model: target.model.clone(),
                served: spec.models.clone(),
            });
        }
        Ok(Hop {
            provider,
            target: target.clone(),
        })
    }

    fn bare(&self, model: &str) -> Result<Hop, RouteError> {
        self.providers
            .iter()
            .position(|spec| spec.models.iter().any(|served| served == model))
            .map(|provider| Hop {
                provider,
                target: Target::new(self.providers[provider].name.clone(), model),
            })
            .ok_or_else(|| self.unknown(model))
    }

    fn unknown(&self, requested: &str) -> RouteError {
        let mut available: Vec<String> = self.models().into_iter().map(|model| model.id).collect();
        available.extend(
            self.providers
                .iter()
                .filter(|spec| spec.models.is_empty())
                .map(|spec| format!("{}/<any model>", spec.name)),
        );
        RouteError::UnknownModel {
            requested: requested.chars().take(80).collect(),
            available,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(name: &str, models: &[&str], fallback: &[&str]) -> Arc<ProviderSpec> {
        let mut spec = ProviderSpec::new(name);
        spec.models = models.iter().map(|m| (*m).to_owned()).collect();
        spec.fallback = fallback.iter().map(|f| f.parse().unwrap()).collect();
        Arc::new(spec)
    }

    fn table() -> Routes {
        let aliases = BTreeMap::from([("fast".to_owned(), "openai/gpt-4o-mini".to_owned())]);
        Routes::new(
            vec![
                provider(
                    "openai",
                    &["gpt-4o", "gpt-4o-mini"],
                    &["anthropic/claude-sonnet-4-5", "openai/gpt-4o-mini"],
                ),
                provider("anthropic", &["claude-sonnet-4-5"], &[]),
                provider("local", &[], &[]),
                provider("mirror", &["gpt-4o"], &[]),
            ],
            &aliases,
        )
        .unwrap()
    }

    fn targets(route: &Route) -> Vec<String> {
        route.hops.iter().map(|h| h.target.to_string()).collect()
    }

    #[test]
    fn explicit_names_aliases_and_bare_names_route_with_their_fallbacks() {
        let routes = table();
        let route = routes.resolve("openai/gpt-4o").unwrap();
        assert_eq!(
            targets(&route),
            [
                "openai/gpt-4o",
                "anthropic/claude-sonnet-4-5",
                "openai/gpt-4o-mini"
            ]
        );
        assert_eq!(route.hops[1].provider, 1);
        assert_eq!(
            targets(&routes.resolve("fast").unwrap()),
            ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4-5"],
            "a fallback already on the route is skipped"
        );
        assert_eq!(
            targets(&routes.resolve("gpt-4o").unwrap())[0],
            "openai/gpt-4o",
            "a bare name goes to the first provider listing it"
        );
        assert_eq!(
            targets(&routes.resolve("local/any/model:7b").unwrap()),
            ["local/any/model:7b"],
            "a provider listing no models serves any name"
        );
    }

    #[test]
    fn names_that_lead_nowhere_say_what_exists() {
        let routes = table();
        let unknown = routes.resolve("gpt-5").unwrap_err();
        assert!(matches!(unknown, RouteError::UnknownModel { .. }));
        let text = unknown.to_string();
        assert!(
            text.contains("openai/gpt-4o") && text.contains("fast"),
            "{text}"
        );
        assert!(text.contains("local/<any model>"), "{text}");
        assert!(matches!(
            routes.resolve("anthropic/claude-2"),
            Err(RouteError::NotServed { .. })
        ));
        assert!(matches!(
            routes.resolve("nobody/m"),
            Err(RouteError::UnknownModel { .. })
        ));
        assert_eq!(routes.resolve(""), Err(RouteError::BadName));
        assert_eq!(
            routes.resolve(&"m".repeat(MAX_MODEL_NAME + 1)),
            Err(RouteError::BadName)
        );
    }

    #[test]
    fn bad_tables_are_refused() {
        let alias = |target: &str| BTreeMap::from([("a".to_owned(), target.to_owned())]);
        let one = || vec![provider("openai", &["gpt-4o"], &[])];
        assert!(matches!(
            Routes::new(one(), &alias("gpt-4o")),
            Err(InvalidRoutes::Alias { .. })
        ));
        assert!(matches!(
            Routes::new(one(), &alias("openai/gpt-5")),
            Err(InvalidRoutes::Alias { .. })
        ));
        assert!(matches!(
            Routes::new(vec![provider("a", &[], &["b/m"])], &BTreeMap::new()),
            Err(InvalidRoutes::Fallback { .. })
        ));
        assert!(matches!(
            Routes::new(
                vec![provider("a", &[], &[]), provider("a", &[], &[])],
                &BTreeMap::new()
            ),
            Err(InvalidRoutes::Duplicate(_))
        ));
    }

    #[test]
    fn models_lists_provider_models_then_aliases() {
        let ids: Vec<String> = table().models().into_iter().map(|m| m.id).collect();
        assert_eq!(
            ids,
            [
                "openai/gpt-4o",
                "openai/gpt-4o-mini",
                "anthropic/claude-sonnet-4-5",
                "mirror/gpt-4o",
                "fast"
            ]
        );
    }
}
