//! x402 pay-per-call through the metering proxy, against the mock facilitator of
//! `common::x402` (it recovers EIP-712 / EIP-3009 signatures): a caller with no agent key
//! is asked (402 + `PAYMENT-REQUIRED` valid against the v2 rules), pays, and is served and
//! settled once even when it sends the same payment three times; a payment for too little,
//! to someone else, expired or signed by another key gets 402 and the upstream sees
//! nothing; a facilitator that is down gets 502 and no money moves; an upstream 500 is not
//! settled; a v1 `X-PAYMENT` is refused with a reason; the payer is an agent whose rate
//! limits apply and whose journal shows the payment and the call.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use common::x402::{self as kit, Facilitator, Wallet};
use common::*;
use serde_json::Value;
use tally_core::{AgentId, Command, CommandKind, IdempotencyKey, Metadata};
use tally_server::outbox::{Outbox, Settlement};

const PRICE: u64 = 10_000;
/// The most a call on the variable-price (`upto`) route costs.
const MAX: u64 = 5_000;

struct Paid {
    s: TestServer,
    fac: Facilitator,
    hits: Arc<AtomicUsize>,
    /// The server's config, for restarts.
    text: String,
}

async fn upstream() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = Router::new().fallback(move |uri: axum::http::Uri| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            match uri.path() {
                "/broken" | "/metered/broken" => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()
                }
                // A metered answer reports its cost in the usage header (none for "none").
                p if p.starts_with("/metered/") => {
                    let cost = p.trim_start_matches("/metered/").to_owned();
                    let mut resp = "the metered answer".into_response();
                    if let Ok(v) = cost.parse::<axum::http::HeaderValue>() {
                        if cost != "none" {
                            resp.headers_mut().insert("x-usage-cost-micros", v);
                        }
                    }
                    resp
                }
                _ => "the paid answer".into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, hits)
}

async fn paid(extra_x402: &str) -> Paid {
    let fac = Facilitator::start().await;
    let (up, hits) = upstream().await;
    let text = format!(
        "{X402}facilitator_url = \"{}\"\n{extra_x402}\n\
         [[routes]]\nname = \"paid\"\npath = \"/paid\"\nupstream = \"{up}\"\nprice_micros = {PRICE}\nx402 = true\n\
         [[routes]]\nname = \"broken\"\npath = \"/broken\"\nupstream = \"{up}\"\nprice_micros = {PRICE}\nx402 = true\n\
         [[routes]]\nname = \"metered\"\npath = \"/metered/*\"\nupstream = \"{up}\"\nvariable = {{ max_micros = {MAX} }}\nx402 = true\n",
        fac.url
    );
    let s = TestServer::start_with(config(&text)).await;
    Paid { s, fac, hits, text }
}

impl Paid {
    async fn get(&self, path: &str, header: Option<(&str, String)>) -> Resp {
        let mut req = self.s.http.get(self.s.proxy_url(path));
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        self.s.send(req).await
    }

    /// The 402 for `path`, its decoded `PAYMENT-REQUIRED` checked against the v2 rules.
    async fn asked(&self, path: &str) -> Value {
        let r = self.get(path, None).await;
        r.assert_problem(402, "payment-required");
        let required = kit::decode_header(r.header("payment-required").expect("PAYMENT-REQUIRED"));
        assert_eq!(
            kit::payment_required_errors(&required),
            Vec::<String>::new()
        );
        if !path.starts_with("/metered") {
            assert_eq!(required["accepts"][0]["amount"], PRICE.to_string());
        }
        required
    }

    /// Restarts the server on the same data directory and config.
    async fn restart(&mut self) {
        self.s.restart(config(&self.text)).await;
    }

    async fn pay(&self, path: &str, payment: &Value) -> Resp {
        self.get(path, Some(("payment-signature", kit::header(payment))))
            .await
    }
}

fn payer_agent(w: &Wallet) -> String {
    format!("x402:{}:{}", kit::NETWORK, w.address().to_ascii_lowercase())
}

/// The (kind, amount) of every entry in the agent's journal.
async fn journal_kinds(s: &TestServer, agent: &str) -> Vec<(String, u64)> {
    journal(s, agent)
        .await
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or("").to_owned(),
                e["amount_micros"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

async fn journal(s: &TestServer, agent: &str) -> Vec<Value> {
    let journal = s.get(&format!("/v1/agents/{agent}/journal")).await;
    assert_eq!(journal.status, 200, "{}", journal.text);
    journal.body["entries"].as_array().expect("entries").clone()
}

#[tokio::test]
async fn a_payment_buys_one_call_settled_once_even_sent_three_times() {
    let p = paid("").await;
    let required = p.asked("/paid").await;
    assert_eq!(p.hits.load(Ordering::SeqCst), 0, "asking reaches nobody");
    let wallet = Wallet::from_seed(1);
    let payment = wallet.pay(
        &required["resource"],
        &required["accepts"][0],
        kit::now_s() + 60,
        kit::nonce(1),
    );
    let r = p.pay("/paid", &payment).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.text, "the paid answer");
    let settled = kit::decode_header(r.header("payment-response").expect("PAYMENT-RESPONSE"));
    assert_eq!(
        kit::settlement_response_errors(&settled),
        Vec::<String>::new()
    );
    assert_eq!(settled["success"], true);
    let agent = payer_agent(&wallet);
    assert_eq!(r.header("x-tally-agent"), Some(agent.as_str()));
    for _ in 0..2 {
        let again = p.pay("/paid", &payment).await;
        again.assert_problem(402, "payment-required");
    }
    assert_eq!(p.hits.load(Ordering::SeqCst), 1, "served once");
    assert_eq!(p.fac.settle_calls(), 1, "settled once");
    // The payer is an agent: the payment in, the call out, keyed by the payment.
    let kinds = journal_kinds(&p.s, &agent).await;
    assert_eq!(
        kinds,
        vec![
            ("agent_created".to_owned(), 0),
            ("credit".to_owned(), PRICE),
            ("debit".to_owned(), PRICE)
        ]
    );
    assert_eq!(p.s.balance(&agent).await, 0);
    let metrics = p.s.get("/metrics").await.text;
    assert!(
        metrics.contains("tally_x402_payments_total{outcome=\"settled\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("tally_x402_settled_micros_total {PRICE}")));
}

#[tokio::test]
async fn payments_for_too_little_to_another_expired_or_forged_get_402_and_reach_nobody() {
    let p = paid("").await;
    let required = p.asked("/paid").await;
    let (resource, want) = (&required["resource"], &required["accepts"][0]);
    let wallet = Wallet::from_seed(2);
    let mut cheap = want.clone();
    cheap["amount"] = Value::from((PRICE - 1).to_string());
    let mut elsewhere = want.clone();
    elsewhere["payTo"] = Value::from(Wallet::from_seed(9).address());
    let expired = wallet.pay(resource, want, kit::now_s() - 1, kit::nonce(3));
    let mut forged = wallet.pay(resource, want, kit::now_s() + 60, kit::nonce(4));
    forged["payload"]["authorization"]["from"] = Value::from(Wallet::from_seed(3).address());
    let cases = [
        (
            "too little",
            wallet.pay(resource, &cheap, kit::now_s() + 60, kit::nonce(1)),
        ),
        (
            "to another",
            wallet.pay(resource, &elsewhere, kit::now_s() + 60, kit::nonce(2)),
        ),
        ("expired", expired),
        ("forged", forged),
    ];
    for (what, payment) in cases {
        let r = p.pay("/paid", &payment).await;
        r.assert_problem(402, "payment-required");
        assert!(
            r.header("payment-required").is_some(),
            "{what}: asked again"
        );
        assert!(
            r.body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}"
        );
    }
    assert_eq!(p.hits.load(Ordering::SeqCst), 0, "the upstream saw nothing");
    assert_eq!(p.fac.settle_calls(), 0, "nothing settled");
}

#[tokio::test]
async fn a_facilitator_that_is_down_gets_502_and_moves_no_money() {
    let p = paid("facilitator_timeout_ms = 2000").await;
    let required = p.asked("/paid").await;
    let wallet = Wallet::from_seed(4);
    let payment = wallet.pay(
        &required["resource"],
        &required["accepts"][0],
        kit::now_s() + 60,
        kit::nonce(1),
    );
    p.fac.set_down(true);
    let r = p.pay("/paid", &payment).await;
    r.assert_problem(502, "facilitator-unavailable");
    assert_eq!(p.hits.load(Ordering::SeqCst), 0);
    let agent =
        p.s.get(&format!("/v1/agents/{}", payer_agent(&wallet)))
            .await;
    assert_eq!(agent.status, 404, "no agent, no credit: {}", agent.text);
    // Back up: the same payment now buys the call.
    p.fac.set_down(false);
    let r = p.pay("/paid", &payment).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn an_upstream_failure_or_a_failed_settlement_is_not_paid_for() {
    let p = paid("").await;
    let required = p.asked("/broken").await;
    let wallet = Wallet::from_seed(5);
    let payment = wallet.pay(
        &required["resource"],
        &required["accepts"][0],
        kit::now_s() + 60,
        kit::nonce(1),
    );
    let r = p.pay("/broken", &payment).await;
    r.assert_problem(502, "upstream-error");
    assert_eq!(p.fac.settle_calls(), 0, "not settled");
    assert_eq!(
        p.s.balance(&payer_agent(&wallet)).await,
        0,
        "nothing credited"
    );

    // Served, but the settlement fails (twice, the same payment): the answer is withheld,
    // counted, and the unpaid call journaled once.
    let required = p.asked("/paid").await;
    let payment = wallet.pay(
        &required["resource"],
        &required["accepts"][0],
        kit::now_s() + 60,
        kit::nonce(2),
    );
    for _ in 0..2 {
        p.fac.fail_next_settle();
        let r = p.pay("/paid", &payment).await;
        r.assert_problem(402, "payment-required");
        assert!(r.text.contains("could not be settled"), "{}", r.text);
    }
    let metrics = p.s.get("/metrics").await.text;
    assert!(
        metrics.contains("tally_x402_payments_total{outcome=\"settle_failed\"} 2"),
        "{metrics}"
    );
    let agent = payer_agent(&wallet);
    assert_eq!(p.s.balance(&agent).await, 0);
    let entries = journal(&p.s, &agent).await;
    let unsettled: Vec<&Value> = entries
        .iter()
        .filter(|e| e["kind"] == "payment_unsettled")
        .collect();
    assert_eq!(unsettled.len(), 1, "{entries:?}");
    assert_eq!(unsettled[0]["amount_micros"], PRICE);
    assert_eq!(unsettled[0]["balance_micros"], 0);
    assert_eq!(unsettled[0]["metadata"]["route"], "paid");
    let id = unsettled[0]["metadata"]["x402_payment"]
        .as_str()
        .unwrap_or("");
    assert!(!id.is_empty(), "{:?}", unsettled[0]);
    assert!(
        unsettled[0]["metadata"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{:?}",
        unsettled[0]
    );
    // The payment was not spent: sent again, it settles and buys the call.
    let r = p.pay("/paid", &payment).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        journal_kinds(&p.s, &agent).await,
        vec![
            ("agent_created".to_owned(), 0),
            ("payment_unsettled".to_owned(), PRICE),
            ("credit".to_owned(), PRICE),
            ("debit".to_owned(), PRICE)
        ]
    );
}

#[tokio::test]
async fn a_v1_x_payment_is_refused_with_a_reason() {
    let p = paid("").await;
    let wallet = Wallet::from_seed(6);
    let v1 = wallet.pay_v1(
        &kit::requirements_v1(&PRICE.to_string(), "http://x/paid"),
        kit::now_s() + 60,
        kit::nonce(1),
    );
    let r = p.get("/paid", Some(("x-payment", kit::header(&v1)))).await;
    r.assert_problem(402, "payment-required");
    assert!(r.text.contains("v1"), "{}", r.text);
    assert!(
        r.header("payment-required").is_some(),
        "asked for v2 instead"
    );
    assert_eq!(p.hits.load(Ordering::SeqCst), 0);
    assert_eq!(p.fac.verify_calls(), 0);
}

#[tokio::test]
async fn a_payer_is_an_agent_on_the_payer_plan_whose_rate_limit_applies() {
    let p = paid("payer_plan = \"limited\"").await;
    let required = p.asked("/paid").await;
    let wallet = Wallet::from_seed(7);
    let pay = |n: u64| {
        wallet.pay(
            &required["resource"],
            &required["accepts"][0],
            kit::now_s() + 60,
            kit::nonce(n),
        )
    };
    for n in 1..=2 {
        let r = p.pay("/paid", &pay(n)).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let r = p.pay("/paid", &pay(3)).await;
    r.assert_problem(429, "rate-limited");
    assert!(r.header("retry-after").is_some());
    assert_eq!(p.hits.load(Ordering::SeqCst), 2);
    assert_eq!(
        p.fac.settle_calls(),
        2,
        "the refused call's payment is not taken"
    );
    let agent =
        p.s.get(&format!("/v1/agents/{}", payer_agent(&wallet)))
            .await;
    assert_eq!(agent.body["plan"], "limited");
}

/// A top-up `POST /v1/agents/a1/credits` of `amount` with `token`, paid with `payment`.
async fn top_up(s: &TestServer, token: &str, amount: u64, payment: Option<&Value>) -> Resp {
    let mut req = s
        .http
        .post(s.url("/v1/agents/a1/credits"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "amount_micros": amount }));
    if let Some(p) = payment {
        req = req.header("payment-signature", kit::header(p));
    }
    s.send(req).await
}

#[tokio::test]
async fn a_top_up_paid_with_x402_credits_once_across_retries_and_a_restart() {
    let mut p = paid("").await;
    p.s.agent("a1", "default", 0).await;
    let (key, _) = p.s.issue_key("a1", "wallet-key").await;
    // Asked: the agent's own key, no payment, gets the 402 for the amount it wants.
    let asked = top_up(&p.s, &key, 5_000, None).await;
    asked.assert_problem(402, "payment-required");
    let required = kit::decode_header(asked.header("payment-required").expect("asked"));
    assert_eq!(
        kit::payment_required_errors(&required),
        Vec::<String>::new()
    );
    assert_eq!(required["accepts"][0]["amount"], "5000");
    let wallet = Wallet::from_seed(8);
    let payment = wallet.pay(
        &required["resource"],
        &required["accepts"][0],
        kit::now_s() + 60,
        kit::nonce(1),
    );
    let r = top_up(&p.s, &key, 5_000, Some(&payment)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["kind"], "credit");
    assert_eq!(r.body["balance_micros"], 5_000);
    let settled = kit::decode_header(r.header("payment-response").expect("PAYMENT-RESPONSE"));
    assert_eq!(settled["success"], true);
    // The same payment again, by the agent or a service: the same receipt, no new money,
    // and the facilitator is not asked again.
    for token in [key.as_str(), SERVICE] {
        let again = top_up(&p.s, token, 5_000, Some(&payment)).await;
        assert_eq!(again.status, 201, "{}", again.text);
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        assert_eq!(again.body["seq"], r.body["seq"]);
    }
    assert_eq!(p.fac.settle_calls(), 1);
    p.restart().await;
    let after = top_up(&p.s, &key, 5_000, Some(&payment)).await;
    assert_eq!(after.status, 201, "{}", after.text);
    assert_eq!(after.header("idempotent-replayed"), Some("true"));
    assert_eq!(p.s.balance("a1").await, 5_000, "credited once");
    assert_eq!(p.fac.settle_calls(), 1);
}

#[tokio::test]
async fn top_ups_refuse_readers_bad_payments_and_a_facilitator_that_is_down() {
    let p = paid("").await;
    p.s.agent("a1", "default", 0).await;
    top_up(&p.s, READER, 5_000, None)
        .await
        .assert_problem(403, "forbidden");
    top_up(&p.s, "no-such-token", 5_000, None)
        .await
        .assert_problem(401, "unauthorized");
    let required = top_up(&p.s, SERVICE, 5_000, None).await;
    required.assert_problem(402, "payment-required");
    let required = kit::decode_header(required.header("payment-required").expect("asked"));
    let wallet = Wallet::from_seed(10);
    let payment = wallet.pay(
        &required["resource"],
        &required["accepts"][0],
        kit::now_s() + 60,
        kit::nonce(1),
    );
    top_up(&p.s, SERVICE, 0, Some(&payment))
        .await
        .assert_problem(422, "invalid-amount");
    // No such agent: refused before the facilitator is asked, so no money can be lost.
    let r =
        p.s.send(
            p.s.http
                .post(p.s.url("/v1/agents/ghost/credits"))
                .bearer_auth(SERVICE)
                .header("payment-signature", kit::header(&payment))
                .json(&serde_json::json!({ "amount_micros": 5_000 })),
        )
        .await;
    r.assert_problem(404, "not-found");
    assert_eq!(p.fac.verify_calls(), 0);
    assert_eq!(p.fac.settle_calls(), 0);
    // Paying for 5,000 and asking to be credited 6,000: not what was paid.
    top_up(&p.s, SERVICE, 6_000, Some(&payment))
        .await
        .assert_problem(402, "payment-required");
    p.fac.set_down(true);
    top_up(&p.s, SERVICE, 5_000, Some(&payment))
        .await
        .assert_problem(502, "facilitator-unavailable");
    assert_eq!(p.s.balance("a1").await, 0, "no money moved");
    p.fac.set_down(false);
    let r = top_up(&p.s, SERVICE, 5_000, Some(&payment)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // An admin's plain credit is as before.
    let r =
        p.s.post(
            "/v1/agents/a1/credits",
            "admin-credit",
            serde_json::json!({"amount_micros": 1}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(p.s.balance("a1").await, 5_001);
}

/// The official x402 Python client (PyPI `x402`, installed by
/// scripts/x402-client-setup.sh; the test skips without it unless X402_CLIENT_REQUIRED=1,
/// as in CI) against tally itself: it gets the proxy's 402, pays, and receives the
/// upstream's answer; then tops up an agent's balance through the credits route, once.
#[tokio::test]
async fn the_official_x402_client_buys_a_call_through_the_proxy_and_tops_up_once() {
    let Some(python) = kit::client_python() else {
        return;
    };
    let p = paid("").await;
    let wallet = Wallet::from_seed(11);
    let key = wallet.private_key_hex();

    let url = p.s.proxy_url("/paid");
    let (out, code) = kit::run_client(&python, &key, &[&url]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["body"], "the paid answer", "{out}");
    assert_eq!(out["payment_response"]["success"], true, "{out}");
    assert_eq!(p.hits.load(Ordering::SeqCst), 1);
    assert_eq!(p.fac.settle_calls(), 1);
    let agent = payer_agent(&wallet);
    assert_eq!(p.s.balance(&agent).await, 0, "paid in, spent on the call");

    p.s.agent("a1", "default", 0).await;
    let (agent_key, _) = p.s.issue_key("a1", "python-wallet").await;
    let credits = p.s.url("/v1/agents/a1/credits");
    let auth = format!("Authorization: Bearer {agent_key}");
    let args = [
        credits.as_str(),
        "--method",
        "POST",
        "--json",
        "{\"amount_micros\": 25000}",
        "-H",
        auth.as_str(),
    ];
    let (out, code) = kit::run_client(&python, &key, &args).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["status"], 201, "{out}");
    assert_eq!(p.s.balance("a1").await, 25_000);
    // The client's payment, sent again by hand: replayed, not credited twice.
    let signed = out["payment_signature"].clone();
    assert!(signed.is_object(), "the client reports what it sent: {out}");
    let again = top_up(&p.s, &agent_key, 25_000, Some(&signed)).await;
    assert_eq!(again.status, 201, "{}", again.text);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(p.s.balance("a1").await, 25_000, "credited exactly once");
    assert_eq!(p.fac.settle_calls(), 2);
}

/// Forward-auth on an `x402 = true` route: a caller with no agent key is asked, pays, and
/// the gateway is told to allow (200) once the payment is settled (forward-auth never
/// sees the upstream, so it settles before the call); the same payment again is refused;
/// in nginx mode the 402 becomes a 401 that still carries `PAYMENT-REQUIRED`.
#[tokio::test]
async fn forward_auth_sells_a_call_for_a_payment_settled_before_it_is_allowed() {
    let p = paid("").await;
    let authorize = |payment: Option<&Value>, query: &str| {
        let mut req =
            p.s.http
                .get(p.s.url(&format!("/v1/authorize{query}")))
                .header("x-forwarded-method", "GET")
                .header("x-forwarded-uri", "/paid")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "api.example.com");
        if let Some(pm) = payment {
            req = req.header("payment-signature", kit::header(pm));
        }
        p.s.send(req)
    };
    let asked = authorize(None, "").await;
    asked.assert_problem(402, "payment-required");
    let required = kit::decode_header(asked.header("payment-required").expect("asked"));
    assert_eq!(
        kit::payment_required_errors(&required),
        Vec::<String>::new()
    );
    assert_eq!(required["resource"]["url"], "https://api.example.com/paid");
    let nginx = authorize(None, "?mode=nginx").await;
    assert_eq!(nginx.status, 401, "{}", nginx.text);
    assert!(nginx.header("payment-required").is_some());
    assert_eq!(nginx.header("x-tally-status"), Some("402"));

    let wallet = Wallet::from_seed(12);
    let payment = wallet.pay(
        &required["resource"],
        &required["accepts"][0],
        kit::now_s() + 60,
        kit::nonce(1),
    );
    let allowed = authorize(Some(&payment), "").await;
    assert_eq!(allowed.status, 200, "{}", allowed.text);
    let agent = payer_agent(&wallet);
    assert_eq!(allowed.header("x-tally-agent"), Some(agent.as_str()));
    assert_eq!(allowed.header("x-tally-charged-micros"), Some("10000"));
    assert!(allowed.header("payment-response").is_some());
    assert_eq!(p.fac.settle_calls(), 1);
    authorize(Some(&payment), "")
        .await
        .assert_problem(402, "payment-required");
    assert_eq!(p.fac.settle_calls(), 1, "one payment, one call");
    assert_eq!(
        p.hits.load(Ordering::SeqCst),
        0,
        "forward-auth never calls the upstream"
    );
    assert_eq!(p.s.balance(&agent).await, 0);
}

/// A variable-price route sells calls for `upto` payments: the 402 asks for the maximum
/// (Permit2, bound to the facilitator), and the payment is settled for what the upstream
/// reported (capped at the maximum; the maximum when it reported nothing; 0 settles
/// nothing and journals nothing), after the upstream answered, never when it failed.
#[tokio::test]
async fn an_upto_payment_settles_what_the_upstream_reported_and_no_more() {
    let p = paid("").await;
    let required = p.asked("/metered/1234").await;
    assert_eq!(
        kit::payment_required_errors(&required),
        Vec::<String>::new()
    );
    let offer = &required["accepts"][0];
    assert_eq!(offer["scheme"], "upto");
    assert_eq!(offer["amount"], MAX.to_string());
    assert_eq!(offer["extra"]["assetTransferMethod"], "permit2");
    assert_eq!(
        offer["extra"]["facilitatorAddress"],
        kit::FACILITATOR_SIGNER
    );
    assert_eq!(
        p.fac.supported_calls(),
        1,
        "the address came from /supported"
    );
    let wallet = Wallet::from_seed(21);
    let agent = payer_agent(&wallet);
    let pay = |path: &'static str, n: u64| {
        let payment = wallet.pay_upto(
            &required["resource"],
            offer,
            kit::now_s() + 60,
            kit::nonce(100 + n),
        );
        let p = &p;
        async move { p.pay(path, &payment).await }
    };
    let mut expect_settled: Vec<String> = Vec::new();
    for (n, path, charged) in [
        (1, "/metered/1234", 1_234),
        (2, "/metered/99999", MAX),
        (3, "/metered/none", MAX),
    ] {
        let r = pay(path, n).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        assert_eq!(r.text, "the metered answer");
        assert_eq!(
            r.header("x-tally-charged-micros"),
            Some(charged.to_string().as_str()),
            "{path}"
        );
        let settled = kit::decode_header(r.header("payment-response").expect("PAYMENT-RESPONSE"));
        assert_eq!(settled["success"], true, "{settled}");
        expect_settled.push(charged.to_string());
        assert_eq!(p.fac.settled_amounts(), expect_settled, "{path}");
    }
    assert_eq!(
        journal_kinds(&p.s, &agent).await,
        vec![
            ("agent_created".to_owned(), 0),
            ("credit".to_owned(), 1_234),
            ("debit".to_owned(), 1_234),
            ("credit".to_owned(), MAX),
            ("debit".to_owned(), MAX),
            ("credit".to_owned(), MAX),
            ("debit".to_owned(), MAX),
        ]
    );
    // A call that cost nothing: settled for 0, nothing journaled.
    let r = pay("/metered/0", 4).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-tally-charged-micros"), Some("0"));
    assert_eq!(journal_kinds(&p.s, &agent).await.len(), 7);
    let outbox = Outbox::open(p.s.data_dir()).expect("opens");
    assert!(
        outbox.is_empty(),
        "every settlement is finished, the 0 one too"
    );
    // An upstream failure: not settled, nothing journaled.
    let settles = p.fac.settle_calls();
    pay("/metered/broken", 5)
        .await
        .assert_problem(502, "upstream-error");
    assert_eq!(p.fac.settle_calls(), settles, "not settled");
    assert_eq!(p.s.balance(&agent).await, 0);
    // Forward-auth cannot see the usage: it does not sell upto calls.
    let payment = wallet.pay_upto(
        &required["resource"],
        offer,
        kit::now_s() + 60,
        kit::nonce(106),
    );
    let r =
        p.s.send(
            p.s.http
                .get(p.s.url("/v1/authorize"))
                .header("x-forwarded-method", "GET")
                .header("x-forwarded-uri", "/metered/10")
                .header("payment-signature", kit::header(&payment)),
        )
        .await;
    r.assert_problem(404, "not-found");
}

/// The official Python client pays an `upto` 402 through the proxy.
#[tokio::test]
async fn the_official_x402_client_pays_an_upto_call() {
    let Some(python) = kit::client_python() else {
        return;
    };
    let p = paid("").await;
    let wallet = Wallet::from_seed(22);
    let url = p.s.proxy_url("/metered/2500");
    let (out, code) = kit::run_client(&python, &wallet.private_key_hex(), &[&url]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["body"], "the metered answer", "{out}");
    assert_eq!(p.fac.settled_amounts(), vec!["2500".to_owned()]);
    assert_eq!(
        journal_kinds(&p.s, &payer_agent(&wallet)).await[1..],
        [("credit".to_owned(), 2_500), ("debit".to_owned(), 2_500)]
    );
}

/// Polls until `done` says yes (the server finishes settlements in the background after
/// a start), at most 10 s.
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if done().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn payment_id(payment: &Value) -> String {
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        "payment-signature",
        kit::header(payment).parse().expect("a header"),
    );
    tally_server::x402::read_payment(&headers)
        .expect("reads")
        .expect("a payment")
        .id
}

fn keyed(agent: &str, kind: CommandKind, key: &str) -> Command {
    Command::new(AgentId::new(agent).expect("id"), kind)
        .with_key(IdempotencyKey::new(key).expect("key"))
}

/// The settlement file a top-up of `amount` to `agent` leaves when the process dies
/// between `/settle` and the credit.
fn top_up_settlement(agent: &str, amount: u64, payment: &Value, want: &Value) -> Settlement {
    let id = payment_id(payment);
    let mut credit = keyed(
        agent,
        CommandKind::Credit {
            amount_micros: amount,
        },
        &id,
    );
    credit.metadata = Metadata::new(
        [("x402_payment".to_owned(), id.clone())]
            .into_iter()
            .collect(),
    )
    .expect("metadata");
    Settlement {
        payment_id: id,
        payload: payment.clone(),
        requirements: want.clone(),
        credit,
        debit: None,
        unsettled: None,
        credit_transaction: false,
    }
}

/// A crash between the facilitator's settlement and the credit loses no money: the next
/// start finds the settlement on disk, settles it (once) and credits it (once); the
/// client's retry of the same payment replays that credit.
#[tokio::test]
async fn a_top_up_cut_off_by_a_crash_is_finished_at_the_next_start_once() {
    let mut p = paid("").await;
    p.s.agent("a1", "default", 0).await;
    let (key, _) = p.s.issue_key("a1", "wallet-key").await;
    let asked = top_up(&p.s, &key, 7_000, None).await;
    let required = kit::decode_header(asked.header("payment-required").expect("asked"));
    let want = required["accepts"][0].clone();
    let payment = Wallet::from_seed(23).pay(
        &required["resource"],
        &want,
        kit::now_s() + 60,
        kit::nonce(7),
    );
    p.s.shut_down().await;
    let outbox = Outbox::open(p.s.data_dir()).expect("opens");
    outbox
        .put(&top_up_settlement("a1", 7_000, &payment, &want))
        .expect("put");
    p.restart().await;
    eventually("the credit", || async { p.s.balance("a1").await == 7_000 }).await;
    eventually("the file to go", || async { outbox.is_empty() }).await;
    assert_eq!(p.fac.settle_calls(), 1);
    assert!(p
        .s
        .metrics()
        .await
        .contains("tally_x402_payments_total{outcome=\"recovered\"} 1"));
    let again = top_up(&p.s, &key, 7_000, Some(&payment)).await;
    assert_eq!(again.status, 201, "{}", again.text);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    p.restart().await;
    assert_eq!(p.s.balance("a1").await, 7_000, "credited once");
    assert_eq!(p.fac.settle_calls(), 1, "settled once");
}

/// A crash after the journal had the call (only the file's removal was lost): the next
/// start finds the credit, completes nothing twice, asks the facilitator nothing, and
/// forgets the file.
#[tokio::test]
async fn a_settlement_already_journaled_is_only_forgotten_at_the_next_start() {
    let mut p = paid("").await;
    let required = p.asked("/paid").await;
    let wallet = Wallet::from_seed(24);
    let want = required["accepts"][0].clone();
    let payment = wallet.pay(
        &required["resource"],
        &want,
        kit::now_s() + 60,
        kit::nonce(8),
    );
    assert_eq!(p.pay("/paid", &payment).await.status, 200);
    let agent = payer_agent(&wallet);
    let before = journal_kinds(&p.s, &agent).await;
    p.s.shut_down().await;
    let id = payment_id(&payment);
    let mut s = top_up_settlement(&agent, PRICE, &payment, &want);
    s.debit = Some(keyed(
        &agent,
        CommandKind::Debit {
            amount_micros: PRICE,
        },
        &format!("{id}:call"),
    ));
    let outbox = Outbox::open(p.s.data_dir()).expect("opens");
    outbox.put(&s).expect("put");
    p.restart().await;
    eventually("the file to go", || async { outbox.is_empty() }).await;
    assert_eq!(
        p.fac.settle_calls(),
        1,
        "the facilitator is not asked again"
    );
    assert_eq!(journal_kinds(&p.s, &agent).await, before, "nothing twice");
}

/// Settlements refused after a restart (here: the facilitator had settled them before the
/// crash, and now refuses the spent nonce): a served call is journaled as unsettled; a
/// top-up is set aside for an operator, counted as unresolved, and credits nothing.
#[tokio::test]
async fn settlements_refused_after_a_restart_are_recorded_or_set_aside() {
    let mut p = paid("").await;
    p.s.agent("a1", "default", 0).await;
    let (key, _) = p.s.issue_key("a1", "wallet-key").await;
    let asked = top_up(&p.s, &key, 3_000, None).await;
    let required = kit::decode_header(asked.header("payment-required").expect("asked"));
    let want = required["accepts"][0].clone();
    let wallet = Wallet::from_seed(25);
    let top_up_payment = wallet.pay(
        &required["resource"],
        &want,
        kit::now_s() + 60,
        kit::nonce(9),
    );
    let call_required = p.asked("/paid").await;
    let call_want = call_required["accepts"][0].clone();
    let call_payment = wallet.pay(
        &call_required["resource"],
        &call_want,
        kit::now_s() + 60,
        kit::nonce(10),
    );
    let agent = payer_agent(&wallet);
    p.s.agent(&agent, "default", 0).await;
    // The facilitator settles both (the process died before it heard back).
    let http = reqwest::Client::new();
    for (payment, want) in [(&top_up_payment, &want), (&call_payment, &call_want)] {
        let r = http
            .post(format!("{}/settle", p.fac.url))
            .json(&serde_json::json!({"x402Version": 2, "paymentPayload": payment, "paymentRequirements": want}))
            .send()
            .await
            .expect("settles");
        let answer: Value = r.json().await.expect("JSON");
        assert_eq!(answer["success"], true, "{answer}");
    }
    p.s.shut_down().await;
    let outbox = Outbox::open(p.s.data_dir()).expect("opens");
    outbox
        .put(&top_up_settlement("a1", 3_000, &top_up_payment, &want))
        .expect("put");
    let call_id = payment_id(&call_payment);
    let mut call = top_up_settlement(&agent, PRICE, &call_payment, &call_want);
    call.unsettled = Some(keyed(
        &agent,
        CommandKind::RecordUnsettledPayment {
            amount_micros: PRICE,
        },
        &format!("{call_id}:unsettled"),
    ));
    outbox.put(&call).expect("put");
    p.restart().await;
    eventually("both handled", || async { outbox.is_empty() }).await;
    let unresolved =
        p.s.data_dir()
            .join(tally_server::outbox::PENDING_DIR)
            .join(tally_server::outbox::UNRESOLVED_DIR);
    assert_eq!(
        std::fs::read_dir(&unresolved).expect("lists").count(),
        1,
        "the top-up is kept for an operator"
    );
    assert_eq!(p.s.balance("a1").await, 0);
    let metrics = p.s.metrics().await;
    assert!(
        metrics.contains("tally_x402_payments_total{outcome=\"unresolved\"} 1"),
        "{metrics}"
    );
    let entries = journal(&p.s, &agent).await;
    let unsettled: Vec<&Value> = entries
        .iter()
        .filter(|e| e["kind"] == "payment_unsettled")
        .collect();
    assert_eq!(unsettled.len(), 1, "{entries:?}");
    assert_eq!(unsettled[0]["amount_micros"], PRICE);
    assert!(unsettled[0]["metadata"]["reason"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
}
