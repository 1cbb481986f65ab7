//! x402 v2 (coinbase/x402 `specs/`): the payment requirements a 402 offers
//! (`PAYMENT-REQUIRED`), reading a payment (`PAYMENT-SIGNATURE`; v1's `X-PAYMENT` is
//! refused with a clear reason), checking it pays what was asked, its identity (one
//! payment buys or credits once), and the facilitator client (`POST /verify`,
//! `POST /settle` with bounded retries of the same payload, `GET /supported`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, StatusCode};
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::X402;
use crate::problem::Problem;
use crate::respond::PAYMENT_REQUIRED;

pub const PAYMENT_SIGNATURE: HeaderName = HeaderName::from_static("payment-signature");
/// x402 v1's payment header.
pub const X_PAYMENT: HeaderName = HeaderName::from_static("x-payment");
pub const PAYMENT_RESPONSE: HeaderName = HeaderName::from_static("payment-response");
/// The largest payment header read (an EVM `exact` payload is under 2 KiB encoded).
pub const PAYMENT_HEADER_BYTES_MAX: usize = 16 * 1024;
/// A facilitator answer longer than this is refused as malformed.
const FACILITATOR_ANSWER_BYTES_MAX: usize = 64 * 1024;
/// Pause between `/settle` attempts.
const SETTLE_RETRY_PAUSE_MS: u64 = 200;

/// One entry of `accepts`: what a payment must be to buy `amount_micros` (atomic units of
/// the asset; USDC's 6 decimals make them micros).
pub fn requirement(x: &X402, amount_micros: u64) -> Value {
    let mut offer = json!({
        "scheme": x.scheme, "network": x.network, "amount": amount_micros.to_string(),
        "asset": x.asset, "payTo": x.pay_to, "maxTimeoutSeconds": x.max_timeout_seconds,
    });
    // x402 v2: `extra` is an optional object; absent, never null.
    if let (Some(extra), Some(o)) = (&x.extra, offer.as_object_mut()) {
        o.insert("extra".into(), extra.clone().into());
    }
    offer
}

/// The `upto` scheme's name: the client signs a maximum, the server settles what the call
/// cost (≤ the maximum, 0 allowed).
pub const UPTO: &str = "upto";

/// One entry of `accepts` for a variable price: scheme `upto` with the maximum, paid with
/// Permit2 (`extra.assetTransferMethod`), bound to the facilitator that will settle it
/// (`extra.facilitatorAddress`, which the client's signature covers).
pub fn requirement_upto(x: &X402, max_micros: u64, facilitator_address: &str) -> Value {
    let mut offer = requirement(x, max_micros);
    offer["scheme"] = json!(UPTO);
    let mut extra = x.extra.clone().unwrap_or_default();
    extra.insert("assetTransferMethod".into(), json!("permit2"));
    extra.insert("facilitatorAddress".into(), json!(facilitator_address));
    offer["extra"] = Value::Object(extra);
    offer
}

/// `want` with `amount` replaced: what an `upto` payment is settled with (the official
/// server's settlement override does the same).
pub fn settling(want: &Value, amount_micros: u64) -> Value {
    let mut want = want.clone();
    want["amount"] = json!(amount_micros.to_string());
    want
}

/// The `PaymentRequired` object (`x402Version: 2`) and its base64 for the header.
pub fn payment_required(
    error: &str,
    resource_url: &str,
    description: &str,
    accepts: &Value,
) -> (Value, String) {
    let required = json!({
        "x402Version": 2,
        "error": error,
        "resource": {"url": resource_url, "description": description, "mimeType": "application/json"},
        "accepts": accepts,
    });
    let encoded = base64::engine::general_purpose::STANDARD.encode(required.to_string());
    (required, encoded)
}

/// A 402 asking for `requirement` at `resource_url`, with `error` saying why.
pub fn payment_problem(x: &X402, error: &str, resource_url: &str, requirement: Value) -> Problem {
    let accepts = json!([requirement]);
    let (_, encoded) = payment_required(error, resource_url, &x.description, &accepts);
    Problem::new(
        StatusCode::PAYMENT_REQUIRED,
        "payment-required",
        "Payment required",
        error.to_owned(),
    )
    .field("x402Version", 2)
    .field("accepts", accepts)
    .header(PAYMENT_REQUIRED, encoded)
}

/// A payment as a client sent it.
#[derive(Debug, Clone)]
pub struct Payment {
    /// The whole `PaymentPayload`, as sent on to the facilitator.
    pub payload: Value,
    /// The requirements the client says it pays (`accepted`).
    pub accepted: Value,
    /// `x402:<network>:<nonce>` (EVM authorizations) or `x402:<network>:sha256:<hex>`:
    /// the idempotency key that makes one payment buy or credit once.
    pub id: String,
    /// The authorization's amount, in atomic units, when the scheme carries one (for
    /// `upto`, the signed maximum).
    pub value: Option<u64>,
}

/// An EVM payload's authorization: `exact`'s EIP-3009 `authorization` (value, to), or a
/// Permit2 `permit2Authorization` (`upto`, and `exact` by Permit2: permitted.amount,
/// witness.to).
struct Authorization<'a> {
    nonce: Option<&'a str>,
    value: Option<u64>,
    to: Option<&'a str>,
    from: Option<&'a str>,
}

fn text<'a>(v: &'a Value, path: &str) -> Option<&'a str> {
    v.pointer(path).and_then(Value::as_str)
}

fn authorization(inner: &Value) -> Option<Authorization<'_>> {
    let number = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.parse::<u64>().ok(),
        Some(Value::Number(n)) => n.as_u64(),
        _ => None,
    };
    if let Some(a) = inner.get("authorization").filter(|a| a.is_object()) {
        return Some(Authorization {
            nonce: text(a, "/nonce"),
            value: number(a.get("value")),
            to: text(a, "/to"),
            from: text(a, "/from"),
        });
    }
    let a = inner
        .get("permit2Authorization")
        .filter(|a| a.is_object())?;
    Some(Authorization {
        nonce: text(a, "/nonce"),
        value: number(a.pointer("/permitted/amount")),
        to: text(a, "/witness/to"),
        from: text(a, "/from"),
    })
}

/// The payer's address a payload names (`authorization.from` or
/// `permit2Authorization.from`), for when the facilitator's verdict does not say.
pub fn payer_of(payload: &Value) -> Option<String> {
    let inner = payload.get("payload")?;
    authorization(inner)?.from.map(str::to_owned)
}

/// Why a payment header cannot be used, in words for the 402's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    #[error("x402 v1 payments (X-PAYMENT) are not accepted: send an x402Version 2 PaymentPayload in PAYMENT-SIGNATURE")]
    V1NotAccepted,
    #[error("the PAYMENT-SIGNATURE header is not valid: {0}")]
    Malformed(String),
    #[error("the payment does not match what was asked: {0}")]
    Mismatch(String),
}

/// The payment a request carries: `None` without one.
pub fn read_payment(headers: &HeaderMap) -> Result<Option<Payment>, PaymentError> {
    let Some(raw) = headers.get(PAYMENT_SIGNATURE) else {
        return match headers.get(X_PAYMENT) {
            Some(_) => Err(PaymentError::V1NotAccepted),
            None => Ok(None),
        };
    };
    let bad = |why: &str| PaymentError::Malformed(why.to_owned());
    if headers.get_all(PAYMENT_SIGNATURE).iter().count() > 1 {
        return Err(bad("more than one PAYMENT-SIGNATURE header"));
    }
    if raw.len() > PAYMENT_HEADER_BYTES_MAX {
        return Err(bad("longer than 16 KiB"));
    }
    let text = raw.to_str().map_err(|_| bad("not ASCII"))?.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text))
        .map_err(|_| bad("not base64"))?;
    let payload: Value = serde_json::from_slice(&bytes).map_err(|_| bad("not JSON"))?;
    match payload.get("x402Version").and_then(Value::as_u64) {
        Some(2) => {}
        Some(1) => return Err(PaymentError::V1NotAccepted),
        _ => return Err(bad("x402Version must be 2")),
    }
    let accepted = payload
        .get("accepted")
        .filter(|a| a.is_object())
        .cloned()
        .ok_or_else(|| bad("no accepted object"))?;
    let inner = payload
        .get("payload")
        .filter(|p| p.is_object())
        .ok_or_else(|| bad("no payload object"))?;
    let network = accepted
        .get("network")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("accepted.network missing"))?;
    let auth = authorization(inner);
    let nonce = auth
        .as_ref()
        .and_then(|a| a.nonce)
        .filter(|n| n.len() <= 130 && n.bytes().all(|b| b.is_ascii_alphanumeric()));
    let id = match nonce {
        Some(n) => format!("x402:{network}:{}", n.to_ascii_lowercase()),
        None => format!(
            "x402:{network}:sha256:{}",
            hex::encode(Sha256::digest(inner.to_string()))
        ),
    };
    if id.len() > tally_core::id::IDEMPOTENCY_KEY_LEN_MAX
        || !id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad("accepted.network is too long or not visible ASCII"));
    }
    let value = auth.as_ref().and_then(|a| a.value);
    Ok(Some(Payment {
        payload,
        accepted,
        id,
        value,
    }))
}

impl Payment {
    /// Checks that the payment pays `want` (one entry of our `accepts`): the same scheme,
    /// network, asset and payee, an amount of at least the price, and for an EVM
    /// authorization, a transfer to the payee of at least the price.
    pub fn check(&self, want: &Value) -> Result<(), PaymentError> {
        let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        for (k, case_blind) in [
            ("scheme", false),
            ("network", false),
            ("asset", true),
            ("payTo", true),
        ] {
            let (got, asked) = (field(&self.accepted, k), field(want, k));
            let same = match (&got, &asked) {
                (Some(g), Some(a)) if case_blind => g.eq_ignore_ascii_case(a),
                (Some(g), Some(a)) => g == a,
                _ => false,
            };
            if !same {
                return Err(PaymentError::Mismatch(format!(
                    "{k} is {got:?}, {asked:?} was asked"
                )));
            }
        }
        let amount = |v: &Value| field(v, "amount").and_then(|a| a.parse::<u64>().ok());
        let asked = amount(want).unwrap_or(u64::MAX);
        if amount(&self.accepted).is_none_or(|a| a < asked) {
            return Err(PaymentError::Mismatch(format!(
                "accepted.amount is below the {asked} asked"
            )));
        }
        if let Some(auth) = self.payload.get("payload").and_then(authorization) {
            if self.value.is_none_or(|v| v < asked) {
                return Err(PaymentError::Mismatch(format!(
                    "the authorization's value is below the {asked} asked"
                )));
            }
            let to = auth.to.unwrap_or("");
            if !field(want, "payTo").is_some_and(|p| p.eq_ignore_ascii_case(to)) {
                return Err(PaymentError::Mismatch(
                    "the authorization pays someone else".into(),
                ));
            }
        }
        Ok(())
    }

    /// What this payment moves, in micros: the authorization's value, else what was asked.
    pub fn amount_micros(&self, want: &Value) -> u64 {
        self.value.unwrap_or_else(|| {
            want.get("amount")
                .and_then(Value::as_str)
                .and_then(|a| a.parse().ok())
                .unwrap_or(0)
        })
    }
}

/// What the facilitator said of a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    /// `invalidReason` / `errorReason` when not ok.
    pub reason: Option<String>,
    /// The payer's address.
    pub payer: Option<String>,
    /// The whole answer (a settlement's becomes `PAYMENT-RESPONSE`).
    pub raw: Value,
}

/// A facilitator that could not give an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the x402 facilitator {0}")]
pub struct FacilitatorError(pub String);

impl FacilitatorError {
    /// 502 `facilitator-unavailable`: no money moved.
    pub fn problem(&self) -> Problem {
        Problem::new(
            StatusCode::BAD_GATEWAY,
            "facilitator-unavailable",
            "Payment facilitator unavailable",
            format!("{self}; no money moved, the payment may be sent again"),
        )
        .retry_after_ms(1_000)
    }
}

/// The client of the configured facilitator.
#[derive(Debug, Clone)]
pub struct Facilitator {
    http: reqwest::Client,
    url: String,
    settle_attempts_max: u32,
}

impl Facilitator {
    /// `None` when `[x402]` names no facilitator.
    pub fn new(x: &X402) -> Result<Option<Self>, reqwest::Error> {
        let Some(url) = &x.facilitator_url else {
            return Ok(None);
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(x.facilitator_timeout_ms))
            .build()?;
        Ok(Some(Self {
            http,
            url: url.clone(),
            settle_attempts_max: x.settle_attempts_max,
        }))
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, FacilitatorError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .map_err(|e| FacilitatorError(format!("could not be reached at {path} ({e})")))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| FacilitatorError(format!("answer to {path} broke off ({e})")))?;
        if status.is_server_error() {
            return Err(FacilitatorError(format!("answered {path} with {status}")));
        }
        if bytes.len() > FACILITATOR_ANSWER_BYTES_MAX {
            return Err(FacilitatorError(format!("answer to {path} is too long")));
        }
        // A 4xx with a JSON verdict (isValid: false) is still a verdict.
        serde_json::from_slice(&bytes)
            .map_err(|_| FacilitatorError(format!("answered {path} with {status} and no JSON")))
    }

    fn request(payload: &Value, requirement: &Value) -> Value {
        json!({
            "x402Version": 2,
            "paymentPayload": payload,
            "paymentRequirements": requirement,
        })
    }

    /// `POST /verify`.
    pub async fn verify(
        &self,
        payment: &Payment,
        requirement: &Value,
    ) -> Result<Verdict, FacilitatorError> {
        let answer = self
            .post("/verify", &Self::request(&payment.payload, requirement))
            .await?;
        let ok = answer
            .get("isValid")
            .and_then(Value::as_bool)
            .ok_or_else(|| FacilitatorError("answered /verify without isValid".into()))?;
        Ok(verdict(ok, "invalidReason", answer))
    }

    /// `POST /settle`, sent again (the same payload) while the facilitator cannot be
    /// reached or answers 5xx, at most `settle_attempts_max` times in all.
    pub async fn settle(
        &self,
        payload: &Value,
        requirement: &Value,
    ) -> Result<Verdict, FacilitatorError> {
        let body = Self::request(payload, requirement);
        let mut last = FacilitatorError("was not asked".into());
        for attempt in 0..self.settle_attempts_max {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(SETTLE_RETRY_PAUSE_MS)).await;
            }
            match self.post("/settle", &body).await {
                Ok(answer) => {
                    let ok = answer
                        .get("success")
                        .and_then(Value::as_bool)
                        .ok_or_else(|| {
                            FacilitatorError("answered /settle without success".into())
                        })?;
                    return Ok(verdict(ok, "errorReason", answer));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// `GET /supported`: the kinds the facilitator lists (`{x402Version, scheme, network,
    /// extra?}`).
    pub async fn kinds(&self) -> Result<Vec<Value>, FacilitatorError> {
        let resp = self
            .http
            .get(format!("{}/supported", self.url))
            .send()
            .await
            .map_err(|e| FacilitatorError(format!("could not be reached at /supported ({e})")))?;
        let answer: Value = resp
            .json()
            .await
            .map_err(|_| FacilitatorError("answered /supported without JSON".into()))?;
        Ok(answer
            .get("kinds")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }
}

/// Whether `kinds` (from `/supported`) list `scheme` on `network`.
pub fn lists(kinds: &[Value], scheme: &str, network: &str) -> bool {
    kinds.iter().any(|k| {
        k.get("scheme").and_then(Value::as_str) == Some(scheme)
            && k.get("network").and_then(Value::as_str) == Some(network)
    })
}

/// The facilitator's address for `upto` on `network`, from its `/supported` kinds
/// (`extra.facilitatorAddress`), when it lists one.
pub fn upto_address(kinds: &[Value], network: &str) -> Option<String> {
    kinds
        .iter()
        .filter(|k| {
            k.get("scheme").and_then(Value::as_str) == Some(UPTO)
                && k.get("network").and_then(Value::as_str) == Some(network)
        })
        .find_map(|k| {
            k.pointer("/extra/facilitatorAddress")
                .and_then(Value::as_str)
        })
        .filter(|a| crate::config::is_evm_address(a))
        .map(str::to_owned)
}

fn verdict(ok: bool, reason_field: &str, answer: Value) -> Verdict {
    let text = |k: &str| answer.get(k).and_then(Value::as_str).map(str::to_owned);
    Verdict {
        ok,
        reason: if ok { None } else { text(reason_field) },
        payer: text("payer"),
        raw: answer,
    }
}

/// Payments being used by a request now: the same payment sent twice at once buys or
/// credits once (afterwards the facilitator knows it is spent).
pub type InUseSet = Arc<Mutex<HashSet<String>>>;

/// A payment claimed by one request, released when the request is done with it.
#[derive(Debug)]
pub struct InUse {
    set: InUseSet,
    id: String,
}

impl InUse {
    /// `None` when another request holds the payment.
    pub fn claim(set: &InUseSet, id: &str) -> Option<Self> {
        let fresh = set
            .lock()
            .map(|mut s| s.insert(id.to_owned()))
            .unwrap_or(false);
        fresh.then(|| Self {
            set: set.clone(),
            id: id.to_owned(),
        })
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.id);
        }
    }
}

/// The agent a wallet payer becomes: `x402:<network>:<address>` (lower case), or `None`
/// when that is not a valid agent id.
pub fn payer_agent(network: &str, payer: &str) -> Option<tally_core::AgentId> {
    tally_core::AgentId::new(format!("x402:{network}:{}", payer.to_ascii_lowercase())).ok()
}

/// `PAYMENT-RESPONSE`: the settlement's answer, base64 JSON.
pub fn payment_response(settled: &Verdict) -> String {
    base64::engine::general_purpose::STANDARD.encode(settled.raw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x402() -> X402 {
        X402 {
            scheme: "exact".into(),
            network: "eip155:84532".into(),
            asset: "0xAsset".into(),
            pay_to: "0xPayee".into(),
            max_timeout_seconds: 60,
            description: "d".into(),
            extra: None,
            facilitator_url: None,
            facilitator_timeout_ms: 1_000,
            settle_attempts_max: 1,
            payer_plan: None,
            facilitator_address: None,
        }
    }

    fn header(v: &Value) -> HeaderMap {
        let mut h = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode(v.to_string());
        h.insert(PAYMENT_SIGNATURE, encoded.parse().expect("header"));
        h
    }

    fn paying(want: &Value, value: &str, to: &str) -> Value {
        json!({"x402Version": 2, "accepted": want, "payload": {
            "signature": "0x00",
            "authorization": {"from": "0xPayer", "to": to, "value": value, "validAfter": "0", "validBefore": "9", "nonce": "0xABCD"},
        }})
    }

    #[test]
    fn a_payment_is_read_identified_and_checked_against_what_was_asked() {
        let want = requirement(&x402(), 500);
        let p = read_payment(&header(&paying(&want, "500", "0xpayee")))
            .expect("reads")
            .expect("a payment");
        assert_eq!(p.id, "x402:eip155:84532:0xabcd");
        assert_eq!(p.value, Some(500));
        p.check(&want).expect("pays what was asked");
        let dearer = requirement(&x402(), 501);
        assert!(matches!(p.check(&dearer), Err(PaymentError::Mismatch(_))));
        let elsewhere = read_payment(&header(&paying(&want, "500", "0xSomeoneElse")))
            .expect("reads")
            .expect("a payment");
        assert!(matches!(
            elsewhere.check(&want),
            Err(PaymentError::Mismatch(_))
        ));
        let mut other_asset = want.clone();
        other_asset["asset"] = json!("0xOther");
        assert!(matches!(
            p.check(&other_asset),
            Err(PaymentError::Mismatch(_))
        ));
    }

    #[test]
    fn v1_and_malformed_headers_are_refused_with_a_reason() {
        let mut h = HeaderMap::new();
        assert!(read_payment(&h).expect("reads").is_none(), "no payment");
        h.insert(X_PAYMENT, "e30=".parse().expect("header"));
        assert_eq!(
            read_payment(&h).map(|_| ()),
            Err(PaymentError::V1NotAccepted)
        );
        let v1 =
            json!({"x402Version": 1, "scheme": "exact", "network": "base-sepolia", "payload": {}});
        assert_eq!(
            read_payment(&header(&v1)).map(|_| ()),
            Err(PaymentError::V1NotAccepted)
        );
        let mut h = HeaderMap::new();
        h.insert(PAYMENT_SIGNATURE, "%%%".parse().expect("header"));
        assert!(matches!(read_payment(&h), Err(PaymentError::Malformed(_))));
        let no_accepted = json!({"x402Version": 2, "payload": {}});
        assert!(matches!(
            read_payment(&header(&no_accepted)),
            Err(PaymentError::Malformed(_))
        ));
    }

    #[test]
    fn payment_required_decodes_to_the_v2_shape() {
        let x = x402();
        let (_, encoded) =
            payment_required("need", "http://h/r", "desc", &json!([requirement(&x, 7)]));
        let decoded: Value = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .expect("base64"),
        )
        .expect("json");
        assert_eq!(decoded["x402Version"], 2);
        assert_eq!(decoded["resource"]["url"], "http://h/r");
        let offer = &decoded["accepts"][0];
        for k in ["scheme", "network", "amount", "asset", "payTo"] {
            assert!(offer[k].is_string(), "{k}");
        }
        assert_eq!(offer["amount"], "7", "atomic units as a string");
        assert!(offer["maxTimeoutSeconds"].is_u64());
        assert!(offer.get("extra").is_none(), "absent, never null");
    }

    #[test]
    fn an_upto_requirement_names_the_maximum_permit2_and_the_facilitator() {
        let mut x = x402();
        x.extra = Some(
            json!({"name": "USDC", "version": "2"})
                .as_object()
                .cloned()
                .expect("map"),
        );
        let fac = "0x00000000000000000000000000000000000fac11";
        let want = requirement_upto(&x, 5_000, fac);
        assert_eq!(want["scheme"], "upto");
        assert_eq!(want["amount"], "5000", "the maximum");
        assert_eq!(want["extra"]["assetTransferMethod"], "permit2");
        assert_eq!(want["extra"]["facilitatorAddress"], fac);
        assert_eq!(want["extra"]["name"], "USDC", "the configured extra stays");
        assert_eq!(settling(&want, 1_234)["amount"], "1234");
        let kinds = [
            json!({"x402Version": 2, "scheme": "exact", "network": "eip155:84532"}),
            json!({"x402Version": 2, "scheme": "upto", "network": "eip155:1", "extra": {"facilitatorAddress": "0x1111111111111111111111111111111111111111"}}),
            json!({"x402Version": 2, "scheme": "upto", "network": "eip155:84532", "extra": {"facilitatorAddress": fac}}),
        ];
        assert_eq!(upto_address(&kinds, "eip155:84532").as_deref(), Some(fac));
        assert_eq!(
            upto_address(&kinds[..2], "eip155:84532"),
            None,
            "other network only"
        );
        assert!(lists(&kinds, "exact", "eip155:84532"));
        assert!(!lists(&kinds, "exact", "eip155:1"));
    }

    #[test]
    fn a_permit2_payment_is_identified_by_its_nonce_and_checked_by_its_witness() {
        let want = requirement_upto(&x402(), 5_000, "0x00000000000000000000000000000000000fac11");
        let paying = |amount: &str, to: &str| {
            json!({"x402Version": 2, "accepted": want, "payload": {
                "signature": "0x00",
                "permit2Authorization": {
                    "from": "0xPayer", "permitted": {"token": "0xAsset", "amount": amount},
                    "spender": "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002", "nonce": "123456789",
                    "deadline": "9", "witness": {"to": to, "facilitator": "0xF", "validAfter": "0"},
                },
            }})
        };
        let p = read_payment(&header(&paying("5000", "0xPAYEE")))
            .expect("reads")
            .expect("a payment");
        assert_eq!(p.id, "x402:eip155:84532:123456789");
        assert_eq!(p.value, Some(5_000), "the signed maximum");
        assert_eq!(payer_of(&p.payload).as_deref(), Some("0xPayer"));
        p.check(&want).expect("pays what was asked");
        let short = read_payment(&header(&paying("4999", "0xpayee")))
            .expect("reads")
            .expect("a payment");
        assert!(matches!(short.check(&want), Err(PaymentError::Mismatch(_))));
        let elsewhere = read_payment(&header(&paying("5000", "0xSomeoneElse")))
            .expect("reads")
            .expect("a payment");
        assert!(matches!(
            elsewhere.check(&want),
            Err(PaymentError::Mismatch(_))
        ));
    }
}
