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

const PRICE: u64 = 10_000;

struct Paid {
    s: TestServer,
    fac: Facilitator,
    hits: Arc<AtomicUsize>,
}

async fn upstream() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = Router::new().fallback(move |uri: axum::http::Uri| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            match uri.path() {
                "/broken" => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
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
         [[routes]]\nname = \"broken\"\npath = \"/broken\"\nupstream = \"{up}\"\nprice_micros = {PRICE}\nx402 = true\n",
        fac.url
    );
    let s = TestServer::start_with(config(&text)).await;
    Paid { s, fac, hits }
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
        assert_eq!(required["accepts"][0]["amount"], PRICE.to_string());
        required
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
    let cfg_text = format!("{X402}facilitator_url = \"{}\"\n", p.fac.url);
    p.s.restart(config(&cfg_text)).await;
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
