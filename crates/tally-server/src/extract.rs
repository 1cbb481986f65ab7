//! Extractors that answer problem+json instead of axum's plain-text rejections: the JSON
//! body (content type, size, depth, shape), the `Idempotency-Key` header, path ids and
//! query strings.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use tally_core::{AgentId, IdempotencyKey};

use crate::app::AppState;
use crate::problem::Problem;

/// The header that makes a state-changing request safe to retry.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

fn unsupported_media_type(detail: &str) -> Problem {
    Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        "Unsupported media type",
        detail,
    )
}

pub(crate) fn too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body-too-large",
        "Body too large",
        format!("request bodies are limited to {limit} bytes"),
    )
    .field("body_bytes_max", limit)
}

/// Whether the request says its body is JSON (`application/json`, optionally with
/// parameters, or a `+json` type).
pub(crate) fn check_json_content_type(headers: &HeaderMap) -> Result<(), Problem> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let Some(value) = values.next() else {
        return Err(unsupported_media_type(
            "the body must be sent with Content-Type: application/json",
        ));
    };
    if values.next().is_some() {
        return Err(Problem::invalid("more than one Content-Type header"));
    }
    let mime = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let ok =
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"));
    if ok {
        Ok(())
    } else {
        Err(unsupported_media_type(
            "the body must be sent with Content-Type: application/json",
        ))
    }
}

/// The deepest nesting of arrays and objects in `bytes`, stopping early past `max`.
/// Strings are skipped so brackets inside them do not count.
pub fn json_depth_exceeds(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

async fn read_body(req: Request, st: &AppState) -> Result<(HeaderMap, Bytes), Problem> {
    let limit = st.limits().body_bytes_max;
    let headers = req.headers().clone();
    let bytes = Bytes::from_request(req, st).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(limit)
        } else {
            Problem::invalid(format!("could not read the body: {}", r.body_text()))
        }
    })?;
    Ok((headers, bytes))
}

pub(crate) fn parse_json<'a, T: serde::Deserialize<'a>>(
    st: &AppState,
    bytes: &'a [u8],
) -> Result<T, Problem> {
    let depth_max = st.limits().json_depth_max;
    if json_depth_exceeds(bytes, depth_max) {
        return Err(Problem::invalid(format!(
            "JSON nested deeper than {depth_max} levels"
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| Problem::invalid(format!("invalid JSON body: {e}")))
}

/// A JSON body: 415 without a JSON content type, 413 past the size limit, 400 when it
/// does not parse, nests too deep or has the wrong shape.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, Problem> {
        check_json_content_type(req.headers())?;
        let (_, bytes) = read_body(req, st).await?;
        parse_json(st, &bytes).map(ApiJson)
    }
}

/// Like [`ApiJson`], but an empty body (with any or no content type) is `T::default()`.
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<AppState> for OptionalJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, Problem> {
        let (headers, bytes) = read_body(req, st).await?;
        if bytes.is_empty() {
            return Ok(OptionalJson(T::default()));
        }
        check_json_content_type(&headers)?;
        parse_json(st, &bytes).map(OptionalJson)
    }
}

/// The request's `Idempotency-Key`: 400 when missing, repeated or not 1–N visible ASCII.
#[derive(Debug, Clone)]
pub struct IdemKey(pub IdempotencyKey);

impl FromRequestParts<AppState> for IdemKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Problem> {
        let mut values = parts.headers.get_all(IDEMPOTENCY_KEY).iter();
        let Some(value) = values.next() else {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "idempotency-key-missing",
                "Idempotency-Key missing",
                "state-changing requests need an Idempotency-Key header",
            ));
        };
        if values.next().is_some() {
            return Err(invalid_key("more than one Idempotency-Key header".into()));
        }
        let text = value
            .to_str()
            .map_err(|_| invalid_key("Idempotency-Key must be visible ASCII".into()))?;
        idempotency_key(text, st.limits().idempotency_key_len_max).map(IdemKey)
    }
}

fn invalid_key(detail: String) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-idempotency-key",
        "Invalid Idempotency-Key",
        detail,
    )
}

/// An idempotency key as the header or a batch item gives it: 400 unless it is 1 to
/// `len_max` visible ASCII characters.
pub fn idempotency_key(text: &str, len_max: usize) -> Result<IdempotencyKey, Problem> {
    if text.len() > len_max {
        return Err(invalid_key(format!(
            "Idempotency-Key must be 1..={len_max} visible ASCII characters"
        )));
    }
    IdempotencyKey::new(text).map_err(|e| invalid_key(e.to_string()))
}

/// The `{id}` of an agent route, validated (400 when it cannot be an agent id).
#[derive(Debug, Clone)]
pub struct AgentPath(pub AgentId);

impl<S: Send + Sync> FromRequestParts<S> for AgentPath {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, Problem> {
        let Path(raw) = Path::<String>::from_request_parts(parts, st)
            .await
            .map_err(|e| Problem::invalid(format!("bad path: {}", e.body_text())))?;
        AgentId::new(raw)
            .map(AgentPath)
            .map_err(|e| Problem::invalid(e.to_string()))
    }
}

/// The raw `{hold_id}` of a hold route; parsed by the handler (404 when malformed).
#[derive(Debug, Clone)]
pub struct HoldPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for HoldPath {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, Problem> {
        let Path(raw) = Path::<String>::from_request_parts(parts, st)
            .await
            .map_err(|e| Problem::invalid(format!("bad path: {}", e.body_text())))?;
        Ok(HoldPath(raw))
    }
}

/// A query string, 400 when it does not parse.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, Problem> {
        Query::<T>::from_request_parts(parts, st)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| Problem::invalid(format!("bad query string: {}", e.body_text())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_nesting_outside_strings() {
        assert!(!json_depth_exceeds(br#"{"a":1}"#, 1));
        assert!(json_depth_exceeds(br#"{"a":{"b":1}}"#, 1));
        assert!(!json_depth_exceeds(br#"{"a":"[[[[{{{{"}"#, 1));
        assert!(!json_depth_exceeds(br#"{"a":"\"[[[["}"#, 1));
        let deep = "[".repeat(10_000);
        assert!(json_depth_exceeds(deep.as_bytes(), 32));
        let exactly = format!("{}{}", "[".repeat(32), "]".repeat(32));
        assert!(!json_depth_exceeds(exactly.as_bytes(), 32));
        let one_more = format!("{}{}", "[".repeat(33), "]".repeat(33));
        assert!(json_depth_exceeds(one_more.as_bytes(), 32));
    }

    #[test]
    fn json_content_types() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, v.parse().expect("ascii"));
            check_json_content_type(&h).map_err(|p| p.status.as_u16())
        };
        assert_eq!(with("application/json"), Ok(()));
        assert_eq!(with("application/json; charset=utf-8"), Ok(()));
        assert_eq!(with("Application/JSON"), Ok(()));
        assert_eq!(with("application/merge-patch+json"), Ok(()));
        assert_eq!(with("text/plain"), Err(415));
        assert_eq!(with("application/x-www-form-urlencoded"), Err(415));
        assert_eq!(
            check_json_content_type(&HeaderMap::new()).map_err(|p| p.status.as_u16()),
            Err(415)
        );
    }
}
