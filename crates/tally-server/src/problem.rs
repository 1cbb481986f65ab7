//! RFC 9457 problem details: every error the API answers is one of these, with a stable
//! `type` (`urn:tally:problem:<kind>`) and extra fields per kind.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

/// The media type of every error body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// One problem answer: status, kind, human text, extra fields and headers.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub fields: Map<String, Value>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            title,
            detail: detail.into(),
            fields: Map::new(),
            headers: Vec::new(),
        }
    }

    /// Adds a body field.
    pub fn field(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(name.to_owned(), value.into());
        self
    }

    /// Adds a header; values we build are always visible ASCII.
    pub fn header(mut self, name: HeaderName, value: impl AsRef<str>) -> Self {
        if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
            self.headers.push((name, v));
        }
        self
    }

    /// `Retry-After` in whole seconds, rounded up and never 0, plus the exact
    /// `retry_after_ms` body field.
    pub fn retry_after_ms(self, retry_after_ms: u64) -> Self {
        self.header(
            header::RETRY_AFTER,
            retry_after_secs(retry_after_ms).to_string(),
        )
        .field("retry_after_ms", retry_after_ms)
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid-request",
            "Invalid request",
            detail,
        )
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 401 for a request without a bearer token: a plain challenge, no error code
    /// (RFC 6750 §3.1).
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail,
        )
        .header(header::WWW_AUTHENTICATE, "Bearer realm=\"tally\"")
    }

    /// 401 for a bearer token that was presented but is not valid here: the challenge
    /// says `error="invalid_token"` (RFC 6750 §3), so a client knows to get another token
    /// rather than to add one.
    pub fn invalid_token(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail,
        )
        .header(
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"tally\", error=\"invalid_token\"",
        )
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "Not ready",
            "the engine is still recovering; retry shortly",
        )
        .retry_after_ms(1_000)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            "this route does not accept that method",
        )
    }

    pub fn to_json(&self) -> Value {
        let mut body = Map::new();
        body.insert(
            "type".into(),
            Value::String(format!("urn:tally:problem:{}", self.kind)),
        );
        body.insert("title".into(), Value::String(self.title.into()));
        body.insert("status".into(), Value::from(self.status.as_u16()));
        body.insert("detail".into(), Value::String(self.detail.clone()));
        for (k, v) in &self.fields {
            body.insert(k.clone(), v.clone());
        }
        Value::Object(body)
    }
}

/// Whole seconds for `Retry-After`: rounded up, at least 1 (a 0 invites a hot loop).
pub fn retry_after_secs(retry_after_ms: u64) -> u64 {
    retry_after_ms.div_ceil(1_000).max(1)
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.to_json()).unwrap_or_default();
        let mut resp = (self.status, body).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(999), 1);
        assert_eq!(retry_after_secs(1_000), 1);
        assert_eq!(retry_after_secs(1_001), 2);
        assert_eq!(retry_after_secs(2_500), 3);
        assert_eq!(retry_after_secs(u64::MAX), u64::MAX.div_ceil(1_000));
    }

    #[test]
    fn body_has_the_rfc_9457_members_and_fields() {
        let p = Problem::invalid("bad").field("x", 1);
        let v = p.to_json();
        assert_eq!(v["type"], "urn:tally:problem:invalid-request");
        assert_eq!(v["status"], 400);
        assert_eq!(v["title"], "Invalid request");
        assert_eq!(v["detail"], "bad");
        assert_eq!(v["x"], 1);
    }
}
