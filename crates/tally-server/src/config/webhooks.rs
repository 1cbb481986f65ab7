//! `[[webhooks]]`: where threshold notifications go, validated into
//! [`crate::webhooks::Endpoint`]s.

use std::ops::Range;

use serde::Deserialize;

use super::{in_range, ConfigError, Lines};
use crate::webhooks::{
    Endpoint, Secret, WEBHOOK_BACKOFF_FIRST_MS_DEFAULT, WEBHOOK_BACKOFF_MS_MAX,
    WEBHOOK_ENDPOINTS_MAX, WEBHOOK_RETRY_FOR_MS_DEFAULT, WEBHOOK_RETRY_FOR_MS_MAX,
    WEBHOOK_SECRETS_MAX, WEBHOOK_TIMEOUT_MS_DEFAULT, WEBHOOK_TIMEOUT_MS_MAX, WEBHOOK_TYPES,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    name: String,
    url: String,
    /// `whsec_…` secrets; every one signs, so a receiver can move to a new one first.
    #[serde(default)]
    secrets: Vec<String>,
    /// The name of an environment variable holding the secret(s), space-separated.
    secrets_env: Option<String>,
    types: Option<Vec<String>>,
    timeout_ms: Option<u64>,
    retry_for_ms: Option<u64>,
    backoff_first_ms: Option<u64>,
}

pub(super) fn endpoints(
    lines: &Lines<'_>,
    raw: Vec<toml::Spanned<RawWebhook>>,
) -> Result<Vec<Endpoint>, ConfigError> {
    let mut out: Vec<Endpoint> = Vec::new();
    if raw.len() > WEBHOOK_ENDPOINTS_MAX {
        let span = raw[WEBHOOK_ENDPOINTS_MAX].span();
        return Err(lines.err(
            "webhooks",
            &span,
            format!("at most {WEBHOOK_ENDPOINTS_MAX} endpoints"),
        ));
    }
    for (i, w) in raw.into_iter().enumerate() {
        let span = w.span();
        let w = w.into_inner();
        let key = format!("webhooks[{i}]");
        out.push(endpoint(lines, &key, &span, w, &out)?);
    }
    Ok(out)
}

fn endpoint(
    lines: &Lines<'_>,
    key: &str,
    span: &Range<usize>,
    w: RawWebhook,
    before: &[Endpoint],
) -> Result<Endpoint, ConfigError> {
    let err = |field: &str, reason: String| lines.err(&format!("{key}.{field}"), span, reason);
    // The name is a file name (the endpoint's cursor) and a metric label.
    if w.name.is_empty()
        || w.name.len() > 64
        || !w
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(err("name", "1-64 characters of [A-Za-z0-9_-]".into()));
    }
    if before.iter().any(|e| e.name == w.name) {
        return Err(err("name", format!("{:?} used twice", w.name)));
    }
    let url = reqwest::Url::parse(&w.url).map_err(|e| err("url", format!("{:?}: {e}", w.url)))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(err("url", "must be an http:// or https:// URL".into()));
    }
    let mut texts = w.secrets;
    if let Some(var) = &w.secrets_env {
        let value = std::env::var(var).map_err(|_| {
            err(
                "secrets_env",
                format!("environment variable {var} is not set"),
            )
        })?;
        texts.extend(value.split_whitespace().map(str::to_owned));
    }
    if texts.is_empty() {
        return Err(err(
            "secrets",
            "at least one whsec_ secret (or secrets_env) is needed: webhooks are signed".into(),
        ));
    }
    if texts.len() > WEBHOOK_SECRETS_MAX {
        return Err(err(
            "secrets",
            format!("at most {WEBHOOK_SECRETS_MAX} secrets"),
        ));
    }
    let secrets = texts
        .iter()
        .map(|t| Secret::parse(t).map_err(|e| err("secrets", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let types = match w.types {
        None => None,
        Some(types) => {
            if let Some(t) = types.iter().find(|t| !WEBHOOK_TYPES.contains(&t.as_str())) {
                return Err(err(
                    "types",
                    format!("{t:?} is not one of {}", WEBHOOK_TYPES.join(", ")),
                ));
            }
            Some(types)
        }
    };
    let timeout_ms = in_range(
        lines,
        &format!("{key}.timeout_ms"),
        span,
        w.timeout_ms,
        WEBHOOK_TIMEOUT_MS_DEFAULT,
        1,
        WEBHOOK_TIMEOUT_MS_MAX,
    )?;
    let retry_for_ms = in_range(
        lines,
        &format!("{key}.retry_for_ms"),
        span,
        w.retry_for_ms,
        WEBHOOK_RETRY_FOR_MS_DEFAULT,
        0,
        WEBHOOK_RETRY_FOR_MS_MAX,
    )?;
    let backoff_first_ms = in_range(
        lines,
        &format!("{key}.backoff_first_ms"),
        span,
        w.backoff_first_ms,
        WEBHOOK_BACKOFF_FIRST_MS_DEFAULT,
        1,
        WEBHOOK_BACKOFF_MS_MAX,
    )?;
    Ok(Endpoint {
        name: w.name,
        url: url.to_string(),
        secrets,
        types,
        timeout_ms,
        retry_for_ms,
        backoff_first_ms,
    })
}
