//! `/openapi.json`: the hand-written OpenAPI 3.0 description of the API, including every
//! problem answer. schemathesis checks the live server against it (`scripts/schemathesis.sh`).

use std::sync::LazyLock;

use serde_json::{json, Value};

static DOCUMENT: LazyLock<String> = LazyLock::new(|| build().to_string());

/// The document, serialized once.
pub fn document() -> &'static str {
    &DOCUMENT
}

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn resp(name: &str) -> Value {
    json!({"$ref": format!("#/components/responses/{name}")})
}

fn param(name: &str) -> Value {
    json!({"$ref": format!("#/components/parameters/{name}")})
}

fn u64_schema() -> Value {
    json!({"type": "integer", "minimum": 0, "maximum": 18_446_744_073_709_551_615u64})
}

/// An amount in a request: at least 1 micro (0 is `invalid-amount`).
fn amount_schema() -> Value {
    json!({"type": "integer", "minimum": 1, "maximum": 18_446_744_073_709_551_615u64})
}

fn nullable(mut schema: Value) -> Value {
    schema["nullable"] = Value::Bool(true);
    schema
}

/// The fields of a journal entry as `GET .../journal` shows it (the change feed adds
/// `agent_id`).
const JOURNAL_ENTRY_FIELDS: [&str; 19] = [
    "seq",
    "kind",
    "amount_micros",
    "balance_micros",
    "held_micros",
    "at",
    "idempotency_key",
    "task_type",
    "metadata",
    "hold_seq",
    "debit_seq",
    "period",
    "plan",
    "status",
    "api_key_prefix",
    "thresholds",
    "crossing",
    "grant_id",
    "promotional_micros",
];

fn object(required: &[&str], props: Value) -> Value {
    json!({"type": "object", "required": required, "properties": props, "additionalProperties": false})
}

fn ok_json(desc: &str, schema: Value, extra_headers: Value) -> Value {
    let mut r = json!({"description": desc, "content": {"application/json": {"schema": schema}}});
    if extra_headers.is_object() {
        r["headers"] = extra_headers;
    }
    r
}

fn body(schema: &str, required: bool) -> Value {
    json!({"required": required, "content": {"application/json": {"schema": r(schema)}}})
}

/// Errors every authenticated route can answer.
fn common_errors(responses: &mut Value) {
    for (code, name) in [
        ("400", "BadRequest"),
        ("401", "Unauthorized"),
        ("403", "Forbidden"),
        ("431", "HeadersTooLarge"),
        ("503", "Unavailable"),
    ] {
        responses[code] = resp(name);
    }
}

fn body_errors(responses: &mut Value) {
    responses["413"] = resp("TooLarge");
    responses["415"] = resp("UnsupportedMediaType");
}

fn operation(
    id: &str,
    summary: &str,
    params: Vec<Value>,
    request: Option<Value>,
    mut responses: Value,
) -> Value {
    common_errors(&mut responses);
    let mut op = json!({"operationId": id, "summary": summary, "parameters": params, "responses": responses});
    if let Some(b) = request {
        body_errors(&mut op["responses"]);
        op["requestBody"] = b;
    }
    op
}

fn replay_headers() -> Value {
    json!({
        "Idempotent-Replayed": {"description": "`true` when this is the stored answer to an earlier request with the same key.", "schema": {"type": "string", "enum": ["true"]}},
        "RateLimit-Policy": {"$ref": "#/components/headers/RateLimitPolicy"},
        "RateLimit": {"$ref": "#/components/headers/RateLimit"},
    })
}

fn spend_denials(responses: &mut Value) {
    responses["402"] = resp("PaymentRequired");
    responses["429"] = resp("TooManyRequests");
}

/// Forward-auth: authenticated by the agent's API key, not a tally token.
fn authorize_op(id: &str) -> Value {
    let header = |name: &str, desc: &str| json!({"name": name, "in": "header", "required": false, "description": desc, "schema": {"type": "string"}});
    let tally = |desc: &str| json!({"description": desc, "schema": {"type": "string"}});
    let mut responses = json!({
        "200": ok_json("Allowed and charged; copy the X-Tally-* headers upstream.", r("Authorized"), json!({
            "X-Tally-Agent": tally("The agent the key belongs to."),
            "X-Tally-Charged-Micros": tally("The price charged."),
            "X-Tally-Balance-Micros": tally("The balance after the charge."),
            "X-Tally-Receipt": tally("`<agent>~<seq>`: what POST /v1/receipts/{receipt}/refund takes."),
            "Idempotent-Replayed": {"description": "`true` for a retry that was not charged again.", "schema": {"type": "string", "enum": ["true"]}},
            "RateLimit-Policy": {"$ref": "#/components/headers/RateLimitPolicy"},
            "RateLimit": {"$ref": "#/components/headers/RateLimit"},
        })),
        "404": resp("NotFound"),
    });
    spend_denials(&mut responses);
    common_errors(&mut responses);
    json!({
        "operationId": id,
        "summary": "Forward-auth for gateways: price the original call from [[routes]] and debit the agent",
        "security": [{"agentKey": []}],
        "parameters": [
            header("X-Forwarded-Method", "The original method (Caddy, Traefik; set it for nginx)."),
            header("X-Forwarded-Uri", "The original path and query."),
            header("Idempotency-Key", "Charged once per key; else once per X-Request-Id."),
            header("X-Request-Id", "Used as the idempotency key when Idempotency-Key is absent."),
            json!({"name": "mode", "in": "query", "required": false, "description": "`nginx`: 402 → 401 and 429 (any other refusal) → 403, the real status in X-Tally-Status and the problem in X-Tally-Problem.", "schema": {"type": "string", "enum": ["nginx", "standard"]}}),
        ],
        "responses": responses,
    })
}

fn build() -> Value {
    let agent_ops = || vec![param("AgentId")];
    let keyed = |mut v: Vec<Value>| {
        v.push(param("IdempotencyKey"));
        v
    };
    let metadata = json!({
        "type": "object", "maxProperties": 16,
        "additionalProperties": {"type": "string", "maxLength": 256},
        "propertyNames": {"minLength": 1, "maxLength": 64},
    });
    let name =
        |max: u32| json!({"type": "string", "pattern": format!("^[A-Za-z0-9._:-]{{1,{max}}}$")});
    let time = json!({"type": "string", "format": "date-time"});
    let priority = json!({"type": "string", "enum": ["low", "normal", "critical"]});
    let status = json!({"type": "string", "enum": ["active", "suspended"]});
    let problem_fields = |extra: Value| {
        let mut props = json!({
            "type": {"type": "string"}, "title": {"type": "string"},
            "status": {"type": "integer"}, "detail": {"type": "string"},
        });
        if let Value::Object(m) = extra {
            for (k, v) in m {
                props[k] = v;
            }
        }
        json!({"type": "object", "required": ["type", "title", "status", "detail"], "properties": props, "additionalProperties": true})
    };
    let problem_resp = |desc: &str, schema: Value, headers: Value| {
        let mut r = json!({"description": desc, "content": {"application/problem+json": {"schema": schema}}});
        if headers.is_object() {
            r["headers"] = headers;
        }
        r
    };
    let retry_after = json!({"$ref": "#/components/headers/RetryAfter"});

    let batch_schema = object(
        &["items"],
        json!({"items": {"type": "array", "minItems": 1, "maxItems": crate::config::BATCH_ITEMS_MAX_CEILING,
        "description": "Each item: `op` (debit, credit, hold, capture, void, refund, check), `agent_id` (or `hold_id` for capture and void), `idempotency_key` (all but check), and the single route's body fields.",
        "items": {"type": "object", "required": ["op"], "properties": {
            "op": {"type": "string", "enum": ["debit", "credit", "hold", "capture", "void", "refund", "check"]},
            "agent_id": {"type": "string"}, "hold_id": {"type": "string"}, "idempotency_key": {"type": "string"},
        }}}}),
    );
    let batch_result = object(
        &["items"],
        json!({"items": {"type": "array", "items": {
        "type": "object", "required": ["status"], "additionalProperties": false,
        "properties": {
            "status": {"type": "integer", "description": "The status the item's single route would answer."},
            "replayed": {"type": "boolean"}, "receipt": r("Receipt"), "result": r("CheckResult"), "problem": r("Problem"),
        }}}}),
    );
    let journal_entry = json!({
        "seq": u64_schema(),
        "kind": {"type": "string", "enum": ["agent_created", "agent_updated", "credit", "debit", "hold", "capture", "void", "expire", "refund", "api_key_issued", "api_key_revoked", "payment_unsettled", "grant", "grant_expired", "thresholds_set", "threshold_crossed"]},
        "amount_micros": u64_schema(), "balance_micros": u64_schema(), "held_micros": u64_schema(), "at": time,
        "idempotency_key": nullable(json!({"type": "string"})), "task_type": nullable(json!({"type": "string"})),
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "hold_seq": nullable(u64_schema()), "debit_seq": nullable(u64_schema()),
        "period": nullable(json!({"type": "string"})), "plan": nullable(json!({"type": "string"})), "status": nullable(status.clone()),
        "api_key_prefix": nullable(json!({"type": "string"})),
        "thresholds": nullable(r("Thresholds")),
        "crossing": nullable(r("Crossing")),
        "grant_id": nullable(u64_schema()),
        "promotional_micros": nullable(json!({"type": "integer", "minimum": 0, "description": "Spends and refunds: the part of `amount_micros` drawn from (or returned to) promotional grants; null for other kinds."})),
    });
    let mut feed_event = journal_entry.clone();
    feed_event["agent_id"] = name(128);
    let mut feed_event_fields = JOURNAL_ENTRY_FIELDS.to_vec();
    feed_event_fields.push("agent_id");
    let mut schemas = json!({
        "Problem": problem_fields(json!({})),
        "InsufficientFunds": problem_fields(json!({
            "required_micros": u64_schema(), "available_micros": u64_schema(),
            "balance_micros": u64_schema(), "held_micros": u64_schema(),
            "retryable": {"type": "boolean"}, "retry_after_ms": u64_schema(),
            "top_up": {"type": "string"},
            "accepts": {"type": "array", "items": {"type": "object", "required": ["scheme", "network", "amount", "asset", "payTo", "maxTimeoutSeconds"], "properties": {
                "scheme": {"type": "string"}, "network": {"type": "string"}, "amount": {"type": "string", "pattern": "^[0-9]+$"},
                "asset": {"type": "string"}, "payTo": {"type": "string"}, "maxTimeoutSeconds": {"type": "integer"}, "extra": {"type": "object"}}}},
        })),
        "Limited": problem_fields(json!({
            "retry_after_ms": u64_schema(), "bucket": {"type": "string"},
            "cap_micros": u64_schema(), "limit_micros": u64_schema(), "spent_micros": u64_schema(),
            "held_micros": u64_schema(), "resets_at": time, "soft": {"type": "boolean"},
        })),
        "Hold": object(&["hold_id", "amount_micros", "expires_at"], json!({"hold_id": {"type": "string"}, "amount_micros": u64_schema(), "expires_at": time})),
        "Agent": object(
            &["id", "plan", "status", "balance_micros", "held_micros", "period", "period_spent_micros", "credited_total_micros", "debited_total_micros", "refunded_total_micros", "expired_total_micros", "debited_paid_total_micros", "debited_promotional_total_micros", "holds", "grants", "thresholds", "version", "created_at", "updated_at"],
            json!({
                "id": name(128), "plan": name(64), "status": status,
                "balance_micros": u64_schema(), "held_micros": u64_schema(),
                "period": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"}, "period_spent_micros": u64_schema(),
                "credited_total_micros": u64_schema(), "debited_total_micros": u64_schema(), "refunded_total_micros": u64_schema(),
                "expired_total_micros": u64_schema(), "debited_paid_total_micros": u64_schema(), "debited_promotional_total_micros": u64_schema(),
                "holds": {"type": "array", "items": r("Hold")},
                "thresholds": nullable(r("Thresholds")),
                "grants": {"type": "array", "items": r("Grant"), "description": "Live credit grants, in the order spends draw from them: priority, then earliest expiry (never last), then oldest."},
                "version": u64_schema(), "created_at": time, "updated_at": time,
            }),
        ),
        "AgentPage": object(&["agents", "next_after"], json!({"agents": {"type": "array", "items": r("Agent")}, "next_after": nullable(json!({"type": "string"}))})),
        "Receipt": object(
            &["agent_id", "seq", "kind", "amount_micros", "balance_micros", "held_micros", "at", "hold_id", "expires_at"],
            json!({
                "agent_id": name(128), "seq": u64_schema(),
                "kind": {"type": "string", "enum": ["credit", "grant", "debit", "hold", "capture", "void", "refund"]},
                "amount_micros": u64_schema(), "balance_micros": u64_schema(), "held_micros": u64_schema(),
                "at": time, "hold_id": nullable(json!({"type": "string"})), "expires_at": nullable(time.clone()),
            }),
        ),
        "CheckResult": object(&["allowed", "amount_micros", "balance_micros"], json!({"allowed": {"type": "boolean"}, "amount_micros": u64_schema(), "balance_micros": u64_schema()})),
        "JournalEntry": object(&JOURNAL_ENTRY_FIELDS, journal_entry),
        "JournalPage": object(&["entries", "next_after"], json!({"entries": {"type": "array", "items": r("JournalEntry")}, "next_after": nullable(u64_schema())})),
        "CategoryUsage": object(&["spent_micros", "refunded_micros", "credited_micros"], json!({"spent_micros": u64_schema(), "refunded_micros": u64_schema(), "credited_micros": u64_schema()})),
        "TaskUsage": object(&["spent_micros", "refunded_micros", "count"], json!({"spent_micros": u64_schema(), "refunded_micros": u64_schema(), "count": u64_schema()})),
        "Usage": object(
            &["period", "start_at", "end_at", "spent_micros", "refunded_micros", "credited_micros", "expired_micros", "debits", "by_category", "by_task_type"],
            json!({
                "period": {"type": "string"}, "start_at": time, "end_at": time,
                "spent_micros": u64_schema(), "refunded_micros": u64_schema(), "credited_micros": u64_schema(),
                "expired_micros": u64_schema(), "debits": u64_schema(),
                "by_category": object(&["paid", "promotional"], json!({"paid": r("CategoryUsage"), "promotional": r("CategoryUsage")})),
                "by_task_type": {"type": "object", "additionalProperties": r("TaskUsage")},
            }),
        ),
        "Plan": object(
            &["name", "buckets", "rate_limit_policy", "monthly_cap_micros", "soft_threshold_pct", "anchor_day", "pricing", "hold_ttl_max_ms", "thresholds"],
            json!({
                "name": {"type": "string"},
                "buckets": {"type": "array", "items": object(&["name", "quota", "window_ms", "burst"], json!({"name": {"type": "string"}, "quota": {"type": "integer"}, "window_ms": u64_schema(), "burst": {"type": "integer"}}))},
                "rate_limit_policy": nullable(json!({"type": "string"})),
                "monthly_cap_micros": nullable(u64_schema()), "soft_threshold_pct": nullable(json!({"type": "integer"})),
                "anchor_day": {"type": "integer", "minimum": 1, "maximum": 28},
                "pricing": object(&["margin_ppm", "min_micros", "max_micros"], json!({"margin_ppm": u64_schema(), "min_micros": u64_schema(), "max_micros": u64_schema()})),
                "hold_ttl_max_ms": u64_schema(),
                "thresholds": r("Thresholds"),
            }),
        ),
        "PlanList": object(&["plans", "default_plan"], json!({"plans": {"type": "array", "items": r("Plan")}, "default_plan": {"type": "string"}})),
        "Status": object(&["status"], json!({"status": {"type": "string"}})),
        "Ready": object(&["status", "idempotency"], json!({
            "status": {"type": "string"},
            "idempotency": object(&["keys_on_disk", "keys_max", "retention_s", "window_s", "window_cut", "filter_bytes"], json!({
                "keys_on_disk": u64_schema(), "keys_max": u64_schema(), "retention_s": u64_schema(),
                "window_s": u64_schema(), "window_cut": {"type": "boolean"}, "filter_bytes": u64_schema()})),
        })),
        "CreateAgent": object(&["id"], json!({"id": name(128), "plan": name(64), "status": status})),
        "PatchAgent": object(&[], json!({"plan": name(64), "status": status})),
        "Credit": object(&["amount_micros"], json!({"amount_micros": amount_schema(), "metadata": metadata})),
        "Debit": object(&["amount_micros"], json!({"amount_micros": amount_schema(), "task_type": name(64), "priority": priority, "metadata": metadata})),
        "HoldRequest": object(&["amount_micros", "ttl_ms"], json!({"amount_micros": amount_schema(), "ttl_ms": {"type": "integer", "minimum": 1, "maximum": 604_800_000u64}, "task_type": name(64), "priority": priority, "metadata": metadata})),
        "Capture": object(&["amount_micros"], json!({"amount_micros": u64_schema()})),
        "Void": object(&[], json!({})),
        "Refund": object(&["debit_seq", "amount_micros"], json!({"debit_seq": u64_schema(), "amount_micros": amount_schema()})),
        "ReceiptRefund": object(&[], json!({"amount_micros": amount_schema()})),
        "IssueApiKey": object(&[], json!({"name": {"type": "string", "minLength": 1, "maxLength": 64, "description": "Bytes, no control characters."}})),
        "ApiKey": object(&["agent_id", "prefix", "name", "created_at", "last_used_at"], json!({
            "agent_id": name(128), "prefix": {"type": "string"}, "name": nullable(json!({"type": "string"})),
            "created_at": nullable(time.clone()),
            "last_used_at": nullable(json!({"type": "string", "format": "date-time", "description": "In memory, since this process started: null after a restart until the key is used again."})),
        })),
        "IssuedApiKey": object(&["agent_id", "prefix", "name", "created_at", "last_used_at", "key"], json!({
            "agent_id": name(128), "prefix": {"type": "string"}, "name": nullable(json!({"type": "string"})),
            "created_at": nullable(time.clone()), "last_used_at": nullable(time.clone()),
            "key": nullable(json!({"type": "string", "description": "`tk_<prefix>_<secret>`, shown only in the first answer; null in a replay."})),
        })),
        "ApiKeyList": object(&["keys", "api_keys_max"], json!({"keys": {"type": "array", "items": r("ApiKey")}, "api_keys_max": {"type": "integer"}})),
        "Batch": batch_schema,
        "BatchResult": batch_result,
        "Authorized": object(&["allowed", "agent_id", "route", "charged_micros", "balance_micros", "receipt"], json!({
            "allowed": {"type": "boolean"}, "agent_id": name(128), "route": {"type": "string"},
            "charged_micros": u64_schema(), "balance_micros": u64_schema(), "receipt": {"type": "string"},
        })),
    });
    // Outside the `json!` above, which is at the macro's recursion limit.
    schemas["FeedEvent"] = object(&feed_event_fields, feed_event);
    schemas["Thresholds"] = object(
        &[
            "balance_below_micros",
            "cap_spend_percent",
            "grant_expiring_within_ms",
        ],
        json!({
            "balance_below_micros": nullable(u64_schema()),
            "cap_spend_percent": nullable(json!({"type": "integer", "minimum": 1, "maximum": 100})),
            "grant_expiring_within_ms": nullable(json!({"type": "integer", "minimum": 1, "maximum": 31_622_400_000u64})),
        }),
    );
    schemas["SetThresholds"] = object(
        &[],
        json!({
            "balance_below_micros": u64_schema(),
            "cap_spend_percent": {"type": "integer", "minimum": 1, "maximum": 100},
            "grant_expiring_within_ms": {"type": "integer", "minimum": 1, "maximum": 31_622_400_000u64},
        }),
    );
    schemas["Crossing"] = object(
        &["type"],
        json!({
            "type": {"type": "string", "enum": ["balance.low", "cap.threshold_reached", "grant.expiring"]},
            "threshold_micros": u64_schema(), "percent": {"type": "integer"}, "cap_micros": u64_schema(),
            "spent_micros": u64_schema(), "period": {"type": "string"},
            "grant_id": u64_schema(), "expires_at": {"type": "string", "format": "date-time"},
            "remaining_micros": u64_schema(), "within_ms": u64_schema(),
        }),
    );
    schemas["FeedPage"] = object(
        &["events", "next_cursor"],
        json!({
            "events": {"type": "array", "items": r("FeedEvent")},
            "next_cursor": {"type": "string", "description": "Opaque; pass as `after` for the next page. Also when the page is empty: it stays valid across restarts."},
        }),
    );

    let ratelimit_headers = json!({"RateLimit-Policy": {"$ref": "#/components/headers/RateLimitPolicy"}, "RateLimit": {"$ref": "#/components/headers/RateLimit"}, "Retry-After": retry_after});
    let responses = json!({
        "BadRequest": problem_resp("Malformed request, missing or invalid Idempotency-Key (`invalid-request`, `idempotency-key-missing`, `invalid-idempotency-key`).", r("Problem"), Value::Null),
        "Unauthorized": problem_resp("No or unknown bearer token, or for /v1/authorize no, an unknown or a revoked agent key; in nginx mode also a 402 (`unauthorized`, or the real problem: see X-Tally-Status).", r("Problem"), json!({"WWW-Authenticate": {"schema": {"type": "string"}}})),
        "Forbidden": problem_resp("The token's role may not do this (`forbidden`), or the agent is suspended (`agent-suspended`).", r("Problem"), Value::Null),
        "NotFound": problem_resp("Unknown agent, hold, receipt, API key or route; for /v1/authorize, no priced [[routes]] entry for the call (`not-found`).", r("Problem"), Value::Null),
        "Conflict": problem_resp("`agent-exists`, `hold-expired`, `api-key-exists`.", r("Problem"), Value::Null),
        "TooLarge": problem_resp("Body larger than `limits.body_bytes_max` (`body-too-large`).", r("Problem"), Value::Null),
        "HeadersTooLarge": problem_resp("Header fields (names and values) larger than 64 KiB (`headers-too-large`).", r("Problem"), Value::Null),
        "UnsupportedMediaType": problem_resp("Body not sent as application/json (`unsupported-media-type`).", r("Problem"), Value::Null),
        "Unprocessable": problem_resp("`idempotency-key-reused`, `unknown-plan`, `invalid-amount`, `amount-overflow`, `invalid-ttl`, `too-many-holds`, `capture-exceeds-hold`, `refund-exceeds-debit`, `unknown-debit`, `too-many-api-keys` (`api_keys_max`), `scan-too-large` (usage of a period more than `engine.usage_scan_entries_max` journal entries back).", r("Problem"), Value::Null),
        "PaymentRequired": problem_resp("Insufficient funds (`insufficient-funds`). `Retry-After` only when an expiring hold frees enough; x402 `accepts` and `PAYMENT-REQUIRED` when configured.", r("InsufficientFunds"), json!({"Retry-After": retry_after, "PAYMENT-REQUIRED": {"description": "base64 of the x402 v2 PaymentRequired JSON", "schema": {"type": "string"}}})),
        "TooManyRequests": problem_resp("Rate limit (`rate-limited`) or monthly cap (`monthly-cap-reached`).", r("Limited"), ratelimit_headers),
        "Unavailable": problem_resp("`overloaded`, `shutting-down`, `not-ready`, `timeout`, `storage-unavailable` (a Redis Cluster backend unreachable or failing over: a change answered so may or may not have been made; retry it with the same Idempotency-Key).", r("Problem"), json!({"Retry-After": retry_after})),
    });

    // Added apart: one more entry in the literal above passes json!'s recursion limit.
    schemas["Grant"] = object(
        &[
            "grant_id",
            "amount_micros",
            "remaining_micros",
            "expires_at",
            "priority",
            "category",
        ],
        json!({
            "grant_id": u64_schema(), "amount_micros": u64_schema(), "remaining_micros": u64_schema(),
            "expires_at": nullable(time.clone()), "priority": {"type": "integer", "minimum": 0, "maximum": u32::MAX},
            "category": {"type": "string", "enum": ["paid", "promotional"]},
        }),
    );
    schemas["GrantRequest"] = object(
        &["amount_micros"],
        json!({
            "amount_micros": amount_schema(),
            "expires_at": {"type": "string", "format": "date-time", "description": "When the rest of the grant leaves the balance (at exactly this time); omitted: never. Must be in the future."},
            "priority": {"type": "integer", "minimum": 0, "maximum": u32::MAX, "default": 100, "description": "Lower is drawn first."},
            "category": {"type": "string", "enum": ["paid", "promotional"], "default": "paid"},
            "metadata": metadata,
        }),
    );

    let receipt_ok = |code: &str, desc: &str| {
        let mut m = serde_json::Map::new();
        m.insert(code.into(), ok_json(desc, r("Receipt"), replay_headers()));
        Value::Object(m)
    };
    let with = |mut base: Value, extra: &[(&str, &str)]| {
        for (code, name) in extra {
            base[*code] = resp(name);
        }
        base
    };

    let mut credits = receipt_ok("201", "Credited.");
    credits = with(credits, &[("404", "NotFound"), ("422", "Unprocessable")]);
    let mut debits = with(
        receipt_ok("201", "Debited."),
        &[("404", "NotFound"), ("422", "Unprocessable")],
    );
    spend_denials(&mut debits);
    let mut holds = with(
        receipt_ok("201", "Hold placed."),
        &[("404", "NotFound"), ("422", "Unprocessable")],
    );
    spend_denials(&mut holds);
    holds["201"]["links"] = json!({
        "CaptureHold": {"operationId": "capture", "parameters": {"hold_id": "$response.body#/hold_id"}},
        "VoidHold": {"operationId": "void", "parameters": {"hold_id": "$response.body#/hold_id"}},
    });
    let mut check = with(
        json!({"200": ok_json("The debit would pass now.", r("CheckResult"), json!({"RateLimit-Policy": {"$ref": "#/components/headers/RateLimitPolicy"}, "RateLimit": {"$ref": "#/components/headers/RateLimit"}}))}),
        &[("404", "NotFound"), ("422", "Unprocessable")],
    );
    spend_denials(&mut check);

    // What a client does next with an agent it created: the stateful tests follow these.
    let mut created = with(
        json!({"201": ok_json("Created.", r("Agent"), replay_headers())}),
        &[("409", "Conflict"), ("422", "Unprocessable")],
    );
    let agent_link =
        |op: &str| json!({"operationId": op, "parameters": {"id": "$response.body#/id"}});
    created["201"]["links"] = json!({
        "GetAgent": agent_link("getAgent"),
        "Credit": agent_link("credit"),
        "Debit": agent_link("debit"),
        "Hold": agent_link("hold"),
        "Check": agent_link("check"),
        "Journal": agent_link("journal"),
        "Usage": agent_link("usage"),
        "IssueApiKey": agent_link("issueApiKey"),
    });

    let paths = json!({
        "/v1/agents": {
            "post": operation("createAgent", "Create an agent", keyed(vec![]), Some(body("CreateAgent", true)), created),
            "get": operation("listAgents", "List agents, paged by id", vec![
                    json!({"name": "after", "in": "query", "required": false, "schema": name(128)}),
                    param("Limit"),
                ], None, json!({"200": ok_json("A page of agents.", r("AgentPage"), Value::Null)})),
        },
        "/v1/agents/{id}": {
            "get": operation("getAgent", "Get an agent", agent_ops(), None, with(json!({"200": ok_json("The agent.", r("Agent"), Value::Null)}), &[("404", "NotFound")])),
            "patch": operation("patchAgent", "Change an agent's plan or status", keyed(agent_ops()), Some(body("PatchAgent", true)),
                with(json!({"200": ok_json("The agent.", r("Agent"), replay_headers())}), &[("404", "NotFound"), ("422", "Unprocessable")])),
        },
        "/v1/agents/{id}/thresholds": {
            "put": operation("setThresholds", "Give the agent its own notification thresholds (replacing its plan's)", keyed(agent_ops()), Some(body("SetThresholds", true)),
                with(json!({"200": ok_json("The agent.", r("Agent"), replay_headers())}), &[("404", "NotFound"), ("422", "Unprocessable")])),
            "delete": operation("clearThresholds", "Back to the plan's notification thresholds", keyed(agent_ops()), None,
                with(json!({"200": ok_json("The agent.", r("Agent"), replay_headers())}), &[("404", "NotFound"), ("422", "Unprocessable")])),
        },
                "/v1/agents/{id}/credits": {"post": operation("credit", "Top up", keyed(agent_ops()), Some(body("Credit", true)), credits.clone())},
        "/v1/agents/{id}/grants": {"post": operation("issueGrant", "Issue a credit grant (expiry, priority, category); the receipt's seq is its id", keyed(agent_ops()), Some(body("GrantRequest", true)), credits)},
        "/v1/agents/{id}/debits": {"post": operation("debit", "Debit", keyed(agent_ops()), Some(body("Debit", true)), debits)},
        "/v1/agents/{id}/check": {"post": operation("check", "Would this debit pass? Changes nothing", agent_ops(), Some(body("Debit", true)), check)},
        "/v1/agents/{id}/holds": {"post": operation("hold", "Authorize up to an amount for a TTL", keyed(agent_ops()), Some(body("HoldRequest", true)), holds)},
        "/v1/agents/{id}/refunds": {"post": operation("refund", "Refund part or all of a debit", keyed(agent_ops()), Some(body("Refund", true)),
            with(receipt_ok("201", "Refunded."), &[("404", "NotFound"), ("422", "Unprocessable")]))},
        "/v1/agents/{id}/journal": {"get": operation("journal", "The agent's journal, paged by sequence", vec![
                param("AgentId"),
                json!({"name": "after", "in": "query", "required": false, "schema": u64_schema()}),
                param("Limit"),
            ], None, with(json!({"200": ok_json("Entries with seq > after.", r("JournalPage"), Value::Null)}), &[("404", "NotFound")]))},
        "/v1/events": {"get": operation("events", "The change feed: every agent's durable events in commit order", vec![
                json!({"name": "after", "in": "query", "required": false, "description": "A `next_cursor` from an earlier page; from the start when absent.", "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]*$"}}),
                param("Limit"),
                json!({"name": "wait_ms", "in": "query", "required": false, "description": "With nothing after the cursor yet, wait up to this long for an event (a long poll).", "schema": {"type": "integer", "minimum": 0, "maximum": crate::routes::EVENTS_WAIT_MS_MAX}}),
            ], None, json!({
                "200": ok_json("Events after the cursor, at most `limit`.", r("FeedPage"), Value::Null),
                "501": problem_resp("`not-supported`: the storage backend (a Redis Cluster) keeps no change feed.", r("Problem"), Value::Null),
            }))},
        "/v1/agents/{id}/usage": {"get": operation("usage", "Spend and counts by task type in a period", vec![
                param("AgentId"),
                json!({"name": "period", "in": "query", "required": false, "schema": {"type": "string", "pattern": "^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])$"}}),
            ], None, with(json!({"200": ok_json("Usage.", r("Usage"), Value::Null)}), &[("404", "NotFound"), ("422", "Unprocessable")]))},
        "/v1/holds/{hold_id}/capture": {"post": operation("capture", "Settle a hold (the rest is released)", keyed(vec![param("HoldId")]), Some(body("Capture", true)),
            with(receipt_ok("200", "Captured."), &[("404", "NotFound"), ("409", "Conflict"), ("422", "Unprocessable")]))},
        "/v1/holds/{hold_id}/void": {"post": operation("void", "Release a hold", keyed(vec![param("HoldId")]), Some(body("Void", false)),
            with(receipt_ok("200", "Voided."), &[("404", "NotFound"), ("422", "Unprocessable")]))},
        "/v1/agents/{id}/keys": {
            "post": operation("issueApiKey", "Issue an API key for the agent (shown once)", keyed(agent_ops()), Some(body("IssueApiKey", false)),
                with(json!({"201": ok_json("Issued; `key` is shown only here.", r("IssuedApiKey"), replay_headers())}), &[("404", "NotFound"), ("409", "Conflict"), ("422", "Unprocessable")])),
            "get": operation("listApiKeys", "The agent's API keys (never the keys themselves)", agent_ops(), None,
                with(json!({"200": ok_json("Keys by prefix.", r("ApiKeyList"), Value::Null)}), &[("404", "NotFound")])),
        },
        "/v1/agents/{id}/keys/{prefix}": {
            "delete": operation("revokeApiKey", "Revoke an API key", keyed(vec![param("AgentId"), json!({"name": "prefix", "in": "path", "required": true, "schema": {"type": "string"}})]), None,
                with(json!({"204": {"description": "Revoked (a replay of the same request answers 204 again; a new request for a revoked key 404).", "headers": replay_headers()}}), &[("404", "NotFound"), ("422", "Unprocessable")])),
        },
        "/v1/receipts/{receipt}/refund": {"post": operation("refundReceipt", "Refund the debit a receipt (X-Tally-Receipt) names: all of it, or amount_micros", keyed(vec![param("Receipt")]), Some(body("ReceiptRefund", false)),
            with(receipt_ok("201", "Refunded."), &[("404", "NotFound"), ("422", "Unprocessable")]))},
        "/v1/authorize": {
            "get": authorize_op("authorize"),
            "post": authorize_op("authorizePost"),
        },
        "/v1/batch": {"post": operation("batch", "Up to limits.batch_items_max money commands, each with its own idempotency key, answered item by item in order", vec![], Some(body("Batch", true)),
            json!({"200": ok_json("Every item's own answer, in order (an item's denial or error is its own).", r("BatchResult"), Value::Null)}))},
        "/v1/plans": {"get": operation("plans", "Plans in force", vec![], None, json!({"200": ok_json("Plans.", r("PlanList"), Value::Null)}))},
        "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness", "security": [], "responses": {"200": ok_json("Alive.", r("Status"), Value::Null)}}},
        "/readyz": {"get": {"operationId": "readyz", "summary": "Readiness (recovery done)", "security": [], "responses": {
            "200": ok_json("Ready; `idempotency.window_cut` is true when the disk bound on keys shortened the retention window.", r("Ready"), Value::Null), "503": resp("Unavailable")}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics", "security": [], "responses": {
            "200": {"description": "Text exposition format.", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document", "security": [], "responses": {
            "200": {"description": "OpenAPI 3.0.", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
    });

    json!({
        "openapi": "3.0.3",
        "info": {"title": "tally", "version": env!("CARGO_PKG_VERSION"),
            "description": "Usage metering and quota ledger: prepaid balances, rate limits, monthly caps, idempotent debits. Money is integer micros. Errors are RFC 9457 problem+json."},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "agentKey": {"type": "http", "scheme": "bearer", "description": "An agent API key `tk_<prefix>_<secret>` (or the `[forward_auth] key_header`)."},
            },
            "schemas": schemas,
            "responses": responses,
            "parameters": {
                "AgentId": {"name": "id", "in": "path", "required": true, "schema": name(128),
                    "examples": {"rate-limited": {"value": "a1"}, "broke": {"value": "broke-1"}, "funded": {"value": "a2"}, "capped": {"value": "capped-1"}}},
                "HoldId": {"name": "hold_id", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}~[0-9]{1,19}$"}},
                "Receipt": {"name": "receipt", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}~[0-9]{1,19}$"}},
                "IdempotencyKey": {"name": "Idempotency-Key", "in": "header", "required": true, "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"}},
                "Limit": {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": crate::config::PAGE_LIMIT_MAX_DEFAULT}},
            },
            "headers": {
                "RetryAfter": {"description": "Whole seconds, rounded up, at least 1.", "schema": {"type": "integer", "minimum": 1}},
                "RateLimitPolicy": {"description": "IETF draft, e.g. `\"default\";q=100;w=60`.", "schema": {"type": "string"}},
                "RateLimit": {"description": "IETF draft, e.g. `\"default\";r=0;t=3`.", "schema": {"type": "string"}},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ref_resolves() {
        let doc: Value = serde_json::from_str(document()).expect("valid JSON");
        fn walk(v: &Value, doc: &Value) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        let ptr = r.trim_start_matches('#');
                        assert!(doc.pointer(ptr).is_some(), "dangling {r}");
                    }
                    m.values().for_each(|x| walk(x, doc));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, doc)),
                _ => {}
            }
        }
        walk(&doc, &doc);
        assert_eq!(doc["paths"].as_object().map(|p| p.len()), Some(24));
    }
}
