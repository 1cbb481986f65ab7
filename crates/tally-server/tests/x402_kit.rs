//! The x402 test kit itself (tests/common/x402.rs): the mock facilitator accepts exactly
//! the payments a real one would (`exact` and `upto`), and the wallet's signatures match
//! an independent EIP-712 implementation and the official client byte for byte.

mod common;

use common::x402::{
    self, checksum, client_python, decode_header, header, nonce, parse_address, parse_uint256,
    reason, requirements, requirements_upto, resource, run_client, uint256_decimal, Authorization,
    Domain, Facilitator, UptoPermit, Wallet,
};
use serde_json::{json, Value};

const URL: &str = "http://127.0.0.1:1/v1/paid";

async fn post(f: &Facilitator, endpoint: &str, payload: &Value, requirements: &Value) -> Value {
    let version = payload["x402Version"].clone();
    let resp = reqwest::Client::new()
        .post(format!("{}/{endpoint}", f.url))
        .json(&json!({
            "x402Version": version,
            "paymentPayload": payload,
            "paymentRequirements": requirements,
        }))
        .send()
        .await
        .expect("facilitator answers");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("JSON answer")
}

async fn verify(f: &Facilitator, payload: &Value, requirements: &Value) -> Value {
    post(f, "verify", payload, requirements).await
}

async fn settle(f: &Facilitator, payload: &Value, requirements: &Value) -> Value {
    post(f, "settle", payload, requirements).await
}

fn later_s() -> u64 {
    x402::now_s() + 60
}

/// `verify`'s answer is invalid with `why` and names the claimed payer.
#[track_caller]
fn assert_invalid(answer: &Value, why: &str, payer: &str) {
    assert_eq!(answer["isValid"], false, "{answer}");
    assert_eq!(answer["invalidReason"], why, "{answer}");
    assert_eq!(answer["payer"], payer, "{answer}");
}

#[tokio::test]
async fn a_signed_payment_verifies_and_settles_once() {
    let f = Facilitator::start().await;
    let wallet = Wallet::from_seed(1);
    let req = requirements("10000");
    let payment = wallet.pay(&resource(URL), &req, later_s(), nonce(1));

    let answer = verify(&f, &payment, &req).await;
    assert_eq!(
        answer,
        json!({ "isValid": true, "payer": wallet.address() })
    );
    // Verify does not use the nonce up.
    assert_eq!(verify(&f, &payment, &req).await["isValid"], true);

    let settled = settle(&f, &payment, &req).await;
    assert_eq!(settled["success"], true, "{settled}");
    assert_eq!(settled["payer"], wallet.address());
    assert_eq!(settled["network"], x402::NETWORK);
    assert_eq!(settled["amount"], "10000");
    let tx = settled["transaction"].as_str().expect("transaction");
    assert!(tx.len() == 66 && tx.starts_with("0x"), "{tx}");
    assert!(settled.get("errorReason").is_none());
    assert_eq!(f.settled(), vec![payment.clone()]);

    // The same payment again: its nonce is spent, on verify and on settle.
    let again = settle(&f, &payment, &req).await;
    assert_eq!(
        again,
        json!({
            "success": false,
            "errorReason": reason::NONCE_ALREADY_USED,
            "payer": wallet.address(),
            "transaction": "",
            "network": x402::NETWORK,
        })
    );
    assert_invalid(
        &verify(&f, &payment, &req).await,
        reason::NONCE_ALREADY_USED,
        &wallet.address(),
    );
    assert_eq!(f.settled().len(), 1);
    assert_eq!((f.verify_calls(), f.settle_calls()), (3, 2));

    // Another nonce is another payment.
    let second = wallet.pay(&resource(URL), &req, later_s(), nonce(2));
    assert_eq!(settle(&f, &second, &req).await["success"], true);
    assert_eq!(f.settled().len(), 2);
    let received = f.received();
    assert_eq!(received.len(), 6);
    assert_eq!(received[0].path, "/verify");
    assert_eq!(received[0].body["paymentPayload"], payment);
}

#[tokio::test]
async fn invalid_payments_are_refused_with_the_reference_reasons() {
    let f = Facilitator::start().await;
    let wallet = Wallet::from_seed(1);
    let payer = wallet.address();
    let req = requirements("10000");

    // A value changed after signing: the signature no longer matches.
    let mut tampered = wallet.pay(&resource(URL), &requirements("5000"), later_s(), nonce(1));
    tampered["payload"]["authorization"]["value"] = json!("10000");
    tampered["accepted"] = req.clone();
    assert_invalid(
        &verify(&f, &tampered, &req).await,
        reason::INVALID_SIGNATURE,
        &payer,
    );

    // Signed for less, or more, than asked: `exact` wants the amount itself.
    for amount in ["9999", "10001"] {
        let mut other = wallet.pay(&resource(URL), &requirements(amount), later_s(), nonce(2));
        other["accepted"] = req.clone();
        assert_invalid(
            &verify(&f, &other, &req).await,
            reason::VALUE_MISMATCH,
            &payer,
        );
    }

    // Paid to someone else.
    let mut elsewhere_req = req.clone();
    elsewhere_req["payTo"] = json!(Wallet::from_seed(9).address());
    let mut elsewhere = wallet.pay(&resource(URL), &elsewhere_req, later_s(), nonce(3));
    elsewhere["accepted"] = req.clone();
    assert_invalid(
        &verify(&f, &elsewhere, &req).await,
        reason::RECIPIENT_MISMATCH,
        &payer,
    );

    // Expired, and within the reference's 6 s margin of expiry.
    for valid_before_s in [x402::now_s() - 1, x402::now_s() + 3] {
        let expired = wallet.pay(&resource(URL), &req, valid_before_s, nonce(4));
        assert_invalid(
            &verify(&f, &expired, &req).await,
            reason::VALID_BEFORE,
            &payer,
        );
    }

    // Not valid yet.
    let mut early = wallet.pay(&resource(URL), &req, later_s(), nonce(5));
    early["payload"] = wallet.authorize(&req, x402::now_s() + 30, later_s(), nonce(5));
    assert_invalid(&verify(&f, &early, &req).await, reason::VALID_AFTER, &payer);

    // Signed by another key but claiming to be from `wallet`.
    let thief = Wallet::from_seed(2);
    let mut forged = thief.pay(&resource(URL), &req, later_s(), nonce(6));
    forged["payload"]["authorization"]["from"] = json!(payer);
    assert_invalid(
        &verify(&f, &forged, &req).await,
        reason::INVALID_SIGNATURE,
        &payer,
    );

    // Signed under another token's domain (name), chain or contract.
    for (key, value) in [
        ("extra", json!({ "name": "USD Coin", "version": "2" })),
        ("network", json!("eip155:8453")),
        ("asset", json!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")),
    ] {
        let mut other_req = req.clone();
        other_req[key] = value;
        let mut other = wallet.pay(&resource(URL), &other_req, later_s(), nonce(7));
        other["accepted"] = req.clone();
        assert_invalid(
            &verify(&f, &other, &req).await,
            reason::INVALID_SIGNATURE,
            &payer,
        );
    }

    // A malformed signature, a v out of range, a high-s twin of a good signature.
    let good = wallet.pay(&resource(URL), &req, later_s(), nonce(8));
    let sig = good["payload"]["signature"]
        .as_str()
        .expect("sig")
        .to_owned();
    let high_s = {
        let bytes = hex::decode(&sig[2..]).expect("hex");
        use k256::elliptic_curve::PrimeField;
        let s = k256::Scalar::from_repr(k256::FieldBytes::clone_from_slice(&bytes[32..64]))
            .expect("s in range");
        let mut twin = bytes.clone();
        twin[32..64].copy_from_slice(&(-s).to_bytes());
        twin[64] ^= 1; // 27 <-> 28: the other point recovers the same key with -s.
        format!("0x{}", hex::encode(twin))
    };
    for bad in [
        "0x1234".to_owned(),
        format!("{}1d", &sig[..sig.len() - 2]),
        high_s,
    ] {
        let mut broken = good.clone();
        broken["payload"]["signature"] = json!(bad);
        assert_invalid(
            &verify(&f, &broken, &req).await,
            reason::INVALID_SIGNATURE,
            &payer,
        );
    }
    // v as 0/1 is accepted as well as 27/28.
    let mut v01 = good.clone();
    let v = u8::from_str_radix(&sig[sig.len() - 2..], 16).expect("v") - 27;
    v01["payload"]["signature"] = json!(format!("{}{v:02x}", &sig[..sig.len() - 2]));
    assert_eq!(verify(&f, &v01, &req).await["isValid"], true);

    // Scheme, network and asset of the chosen requirements must be the asked ones.
    let mut unknown = good.clone();
    unknown["accepted"]["scheme"] = json!("deferred");
    assert_invalid(
        &verify(&f, &unknown, &req).await,
        reason::UNSUPPORTED_SCHEME,
        &payer,
    );
    // An `exact` authorization offered as `upto` goes to the upto scheme, which wants a
    // Permit2 payload.
    let mut upto = good.clone();
    upto["accepted"]["scheme"] = json!("upto");
    assert_invalid(
        &verify(&f, &upto, &req).await,
        reason::UNSUPPORTED_PAYLOAD_TYPE,
        &payer,
    );
    let mut mainnet = good.clone();
    mainnet["accepted"]["network"] = json!("eip155:8453");
    assert_invalid(
        &verify(&f, &mainnet, &req).await,
        reason::NETWORK_MISMATCH,
        &payer,
    );
    let mut other_asset = good.clone();
    other_asset["accepted"]["asset"] = json!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913");
    assert_invalid(
        &verify(&f, &other_asset, &req).await,
        reason::ASSET_MISMATCH,
        &payer,
    );
    let mut no_domain = req.clone();
    no_domain.as_object_mut().expect("object").remove("extra");
    assert_invalid(
        &verify(&f, &good, &no_domain).await,
        reason::MISSING_EIP712_DOMAIN,
        &payer,
    );

    // A network the facilitator does not serve.
    let f_mainnet = Facilitator::start_with_networks(&["eip155:8453"]).await;
    assert_invalid(
        &verify(&f_mainnet, &good, &req).await,
        reason::INVALID_NETWORK,
        &payer,
    );

    // None of these settles, and none spent its nonce: the good one still settles.
    for bad in [&tampered, &elsewhere, &forged, &early] {
        let answer = settle(&f, bad, &req).await;
        assert_eq!(answer["success"], false, "{answer}");
        assert_eq!(answer["transaction"], "");
    }
    assert!(f.settled().is_empty());
    assert_eq!(settle(&f, &good, &req).await["success"], true);
}

#[tokio::test]
async fn a_v1_payment_verifies_and_settles() {
    let f = Facilitator::start().await;
    let wallet = Wallet::from_seed(3);
    let req = x402::requirements_v1("10000", URL);
    let payment = wallet.pay_v1(&req, later_s(), nonce(1));
    assert_eq!(payment["x402Version"], 1);
    assert_eq!(payment["scheme"], "exact");
    assert_eq!(payment["network"], "base-sepolia");
    assert_eq!(verify(&f, &payment, &req).await["isValid"], true);
    let settled = settle(&f, &payment, &req).await;
    assert_eq!(settled["success"], true, "{settled}");
    assert_eq!(settled["network"], "base-sepolia");

    // The same authorization signed for v2 on the same chain and token is the same
    // EIP-3009 nonce: spent.
    let v2 = wallet.pay(&resource(URL), &requirements("10000"), later_s(), nonce(1));
    assert_invalid(
        &verify(&f, &v2, &requirements("10000")).await,
        reason::NONCE_ALREADY_USED,
        &wallet.address(),
    );
}

#[tokio::test]
async fn supported_lists_the_kinds_and_signers() {
    let f = Facilitator::start().await;
    let body: Value = reqwest::get(format!("{}/supported", f.url))
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    let kinds = body["kinds"].as_array().expect("kinds");
    assert!(
        kinds.contains(&json!({ "x402Version": 2, "scheme": "exact", "network": "eip155:84532" }))
    );
    assert!(
        kinds.contains(&json!({ "x402Version": 1, "scheme": "exact", "network": "base-sepolia" }))
    );
    // `upto` names the facilitator that will settle: the client signs it into the witness.
    for network in [x402::NETWORK, "eip155:8453"] {
        assert!(kinds.contains(&json!({
            "x402Version": 2, "scheme": "upto", "network": network,
            "extra": { "facilitatorAddress": x402::FACILITATOR_SIGNER },
        })));
    }
    assert!(!kinds
        .iter()
        .any(|k| k["scheme"] == "upto" && k["x402Version"] == 1));
    assert_eq!(body["extensions"], json!([]));
    assert!(body["signers"]["eip155:*"].is_array());
    assert_eq!(f.supported_calls(), 1);
}

#[tokio::test]
async fn down_refuses_connections_until_up_again() {
    let f = Facilitator::start().await;
    let http = reqwest::Client::new();
    let wallet = Wallet::from_seed(1);
    let req = requirements("10000");
    let payment = wallet.pay(&resource(URL), &req, later_s(), nonce(1));
    // A pooled connection is open before going down.
    assert_eq!(verify(&f, &payment, &req).await["isValid"], true);
    let supported = format!("{}/supported", f.url);
    assert!(http.get(&supported).send().await.is_ok());

    f.set_down(true);
    for _ in 0..3 {
        let err = http.get(&supported).send().await.expect_err("down");
        assert!(err.is_connect() || err.is_request(), "{err:?}");
    }
    let refused = tokio::net::TcpStream::connect(f.addr)
        .await
        .expect_err("refused");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    f.set_down(true); // idempotent

    f.set_down(false);
    assert_eq!(http.get(&supported).send().await.expect("up").status(), 200);
    assert_eq!(settle(&f, &payment, &req).await["success"], true);
    f.set_down(false); // idempotent
    assert_eq!(f.settled().len(), 1);
}

#[tokio::test]
async fn status_override_and_a_failed_settle_leave_the_payment_unspent() {
    let f = Facilitator::start().await;
    let wallet = Wallet::from_seed(1);
    let req = requirements("10000");
    let payment = wallet.pay(&resource(URL), &req, later_s(), nonce(1));
    let body = json!({ "x402Version": 2, "paymentPayload": payment, "paymentRequirements": req });

    f.set_status(Some(503));
    let resp = reqwest::Client::new()
        .post(format!("{}/settle", f.url))
        .json(&body)
        .send()
        .await
        .expect("answers");
    assert_eq!(resp.status(), 503);
    assert_eq!(f.settle_calls(), 1);
    f.set_status(None);

    f.fail_next_settle();
    let failed = settle(&f, &payment, &req).await;
    assert_eq!(failed["success"], false);
    assert_eq!(failed["errorReason"], reason::TRANSACTION_FAILED);
    assert_eq!(failed["transaction"], "");
    // Once only; the nonce was not spent, so the retry of the same payment settles.
    assert_eq!(settle(&f, &payment, &req).await["success"], true);
    assert_eq!(f.settle_calls(), 3);
    assert_eq!(f.settled().len(), 1);
}

#[tokio::test]
async fn a_pinned_clock_decides_expiry() {
    let f = Facilitator::start().await;
    let wallet = Wallet::from_seed(1);
    let req = requirements("10000");
    let payment = wallet.pay(&resource(URL), &req, 2_000_000_000, nonce(1));
    f.set_now_s(Some(2_000_000_000 - 7));
    assert_eq!(verify(&f, &payment, &req).await["isValid"], true);
    f.set_now_s(Some(2_000_000_000 - 6));
    assert_eq!(verify(&f, &payment, &req).await["isValid"], true);
    f.set_now_s(Some(2_000_000_000 - 5));
    assert_eq!(
        verify(&f, &payment, &req).await["invalidReason"],
        reason::VALID_BEFORE
    );
}

// ---------------------------------------------------------------------------------------
// upto (Permit2)
// ---------------------------------------------------------------------------------------

/// `requirements` with `amount` replaced: what a resource server sends to `/settle` to
/// charge `amount` under an `upto` permit (the official server's settlement override).
fn charging(requirements: &Value, amount: &str) -> Value {
    let mut charged = requirements.clone();
    charged["amount"] = json!(amount);
    charged
}

/// `settle`'s answer is a refusal with `why`, no transaction.
#[track_caller]
fn assert_refused(answer: &Value, why: &str) {
    assert_eq!(answer["success"], false, "{answer}");
    assert_eq!(answer["errorReason"], why, "{answer}");
    assert_eq!(answer["transaction"], "", "{answer}");
}

#[tokio::test]
async fn an_upto_payment_settles_for_up_to_its_maximum_once() {
    let f = Facilitator::start().await;
    let wallet = Wallet::from_seed(4);
    let req = requirements_upto("10000");
    let payment = wallet.pay_upto(&resource(URL), &req, later_s(), nonce(1));
    assert_eq!(x402::payment_payload_errors(&payment), Vec::<String>::new());

    assert_eq!(
        verify(&f, &payment, &req).await,
        json!({ "isValid": true, "payer": wallet.address() })
    );
    // Verify wants the maximum itself, as `exact` wants the amount.
    assert_invalid(
        &verify(&f, &payment, &charging(&req, "2500")).await,
        reason::PERMIT2_AMOUNT_MISMATCH,
        &wallet.address(),
    );

    // More than signed for: refused, and nothing spent.
    assert_refused(
        &settle(&f, &payment, &charging(&req, "10001")).await,
        reason::UPTO_SETTLEMENT_EXCEEDS_AMOUNT,
    );
    assert!(f.settled().is_empty());

    let settled = settle(&f, &payment, &charging(&req, "2500")).await;
    assert_eq!(settled["success"], true, "{settled}");
    assert_eq!(settled["payer"], wallet.address());
    assert_eq!(settled["network"], x402::NETWORK);
    assert_eq!(settled["amount"], "2500");
    let tx = settled["transaction"].as_str().expect("transaction");
    assert!(tx.len() == 66 && tx.starts_with("0x"), "{tx}");
    assert_eq!(
        x402::settlement_response_errors(&settled),
        Vec::<String>::new()
    );
    assert_eq!(f.settled(), vec![payment.clone()]);
    assert_eq!(f.settled_amounts(), ["2500"]);

    // Settled once: the permit's nonce is spent (verify finds it by simulating).
    assert_refused(
        &settle(&f, &payment, &charging(&req, "2500")).await,
        reason::PERMIT2_INVALID_NONCE,
    );
    assert_invalid(
        &verify(&f, &payment, &req).await,
        reason::UPTO_TRANSACTION_FAILED,
        &wallet.address(),
    );

    // Exactly the maximum is allowed.
    let full = wallet.pay_upto(&resource(URL), &req, later_s(), nonce(2));
    let settled = settle(&f, &full, &req).await;
    assert_eq!(
        (&settled["success"], &settled["amount"]),
        (&json!(true), &json!("10000"))
    );

    // 0 succeeds with no transaction and spends nothing: the permit settles later.
    let idle = wallet.pay_upto(&resource(URL), &req, later_s(), nonce(3));
    assert_eq!(
        settle(&f, &idle, &charging(&req, "0")).await,
        json!({ "success": true, "payer": wallet.address(), "transaction": "",
                "network": x402::NETWORK, "amount": "0" })
    );
    assert_eq!(
        settle(&f, &idle, &charging(&req, "1")).await["success"],
        true
    );
    assert_eq!(f.settled_amounts(), ["2500", "10000", "0", "1"]);
    assert_eq!(f.settled().len(), 4);

    // A failed transaction spends nothing either; the retry settles.
    let retried = wallet.pay_upto(&resource(URL), &req, later_s(), nonce(4));
    f.fail_next_settle();
    assert_refused(
        &settle(&f, &retried, &charging(&req, "7")).await,
        reason::UPTO_TRANSACTION_FAILED,
    );
    assert_eq!(
        settle(&f, &retried, &charging(&req, "7")).await["amount"],
        "7"
    );
    assert_eq!(f.settled_amounts().last().map(String::as_str), Some("7"));

    // `exact` settles record their amount too.
    let exact = wallet.pay(&resource(URL), &requirements("300"), later_s(), nonce(5));
    assert_eq!(
        settle(&f, &exact, &requirements("300")).await["success"],
        true
    );
    assert_eq!(f.settled_amounts().last().map(String::as_str), Some("300"));
}

#[tokio::test]
async fn invalid_upto_payments_are_refused_with_the_reference_reasons() {
    let f = Facilitator::start().await;
    let wallet = Wallet::from_seed(4);
    let payer = wallet.address();
    let req = requirements_upto("10000");
    let good = wallet.pay_upto(&resource(URL), &req, later_s(), nonce(1));
    let signed_for = |key: &str, value: Value| {
        let mut other_req = req.clone();
        *other_req.pointer_mut(key).expect("a requirements field") = value;
        let mut other = wallet.pay_upto(&resource(URL), &other_req, later_s(), nonce(2));
        other["accepted"] = req.clone();
        other
    };

    // Signed by another key but claiming to be from `wallet`.
    let mut forged = Wallet::from_seed(2).pay_upto(&resource(URL), &req, later_s(), nonce(3));
    forged["payload"]["permit2Authorization"]["from"] = json!(payer);
    // A maximum raised after signing.
    let mut raised = good.clone();
    raised["payload"]["permit2Authorization"]["permitted"]["amount"] = json!("20000");
    raised["accepted"]["amount"] = json!("20000");
    // Another spender than the upto proxy (its witness is then not enforced).
    let mut other_spender = good.clone();
    other_spender["payload"]["permit2Authorization"]["spender"] =
        json!("0x402085c248EeA27D92E8b30b2C58ed07f9E20001");
    let expired = wallet.pay_upto(&resource(URL), &req, x402::now_s() + 3, nonce(4));
    let mut early = good.clone();
    early["payload"] = wallet.permit_upto(&req, x402::now_s() + 30, later_s(), nonce(5));
    let mut exact_req = req.clone();
    exact_req["scheme"] = json!("exact");
    let mut other_network = good.clone();
    other_network["accepted"]["network"] = json!("eip155:8453");
    let cases = [
        (&forged, &req, reason::PERMIT2_INVALID_SIGNATURE),
        (
            &raised,
            &charging(&req, "20000"),
            reason::PERMIT2_INVALID_SIGNATURE,
        ),
        // Signed under Base's chain id: another Permit2 domain.
        (
            &signed_for("/network", json!("eip155:8453")),
            &req,
            reason::PERMIT2_INVALID_SIGNATURE,
        ),
        (
            &signed_for("/payTo", json!(Wallet::from_seed(9).address())),
            &req,
            reason::PERMIT2_RECIPIENT_MISMATCH,
        ),
        (
            &signed_for(
                "/extra/facilitatorAddress",
                json!(Wallet::from_seed(9).address()),
            ),
            &req,
            reason::UPTO_FACILITATOR_MISMATCH,
        ),
        (
            &signed_for(
                "/asset",
                json!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"),
            ),
            &req,
            reason::PERMIT2_TOKEN_MISMATCH,
        ),
        (&other_spender, &req, reason::PERMIT2_INVALID_SPENDER),
        (&expired, &req, reason::PERMIT2_DEADLINE_EXPIRED),
        (&early, &req, reason::PERMIT2_NOT_YET_VALID),
        (&good, &exact_req, reason::UPTO_INVALID_SCHEME),
        (&other_network, &req, reason::UPTO_NETWORK_MISMATCH),
    ];
    for (payment, req, why) in cases {
        assert_invalid(&verify(&f, payment, req).await, why, &payer);
        // Settle checks the same (for less than the maximum too) and spends nothing.
        let charged = charging(req, "1");
        assert_refused(&settle(&f, payment, &charged).await, why);
    }
    assert!(f.settled().is_empty());
    assert_eq!(
        settle(&f, &good, &charging(&req, "1")).await["success"],
        true
    );
}

/// Known answer for `upto`, computed independently with Python `eth_account` 0.14.0 and
/// the official client's own types (x402 2.25.0 `UPTO_PERMIT2_WITNESS_TYPES`); its
/// `_sign_upto_permit2_authorization` gives the same signature:
///
/// ```python
/// from eth_account import Account
/// from eth_account.messages import encode_typed_data
/// from x402.mechanisms.evm.constants import UPTO_PERMIT2_WITNESS_TYPES, PERMIT2_ADDRESS
/// acct = Account.from_key("0x" + "11" * 32)
/// domain = {"name": "Permit2", "chainId": 84532, "verifyingContract": PERMIT2_ADDRESS}
/// msg = {"permitted": {"token": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
///                      "amount": 10000},
///        "spender": "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002",
///        "nonce": int.from_bytes(bytes([0x42] * 32), "big"), "deadline": 1795957260,
///        "witness": {"to": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
///                    "facilitator": "0x00000000000000000000000000000000000Fac11",
///                    "validAfter": 0}}
/// signed = acct.sign_message(encode_typed_data(domain_data=domain,
///     message_types=UPTO_PERMIT2_WITNESS_TYPES, message_data=msg))
/// # signed.message_hash.hex(), signed.signature.hex()
/// ```
#[test]
fn upto_known_answer_matches_eth_account() {
    let wallet = Wallet::from_key(&[0x11; 32]);
    let mut req = requirements_upto("10000");
    req["payTo"] = json!("0x209693Bc6afc0C5328bA36FaF03C514EF312287C");
    let payload = wallet.permit_upto(&req, 0, 1_795_957_260, [0x42; 32]);

    let permit = UptoPermit::from_json(&payload["permit2Authorization"]).expect("parses");
    assert_eq!(
        hex::encode(permit.digest(84532)),
        "47b2740adfd096aec888e71dc094e840d4ddd27d8bb70e2e91b2d6f0728d1040"
    );
    assert_eq!(
        payload,
        json!({
            "signature": "0xcea372232304be343cc94571237942c14c1e1cbb50af426570585bf4ba3cd7c2\
                          2170d261201d408147a34a33bce83ae9856be9cec411f06c621886955a28ff5b1b",
            "permit2Authorization": {
                "from": "0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A",
                "permitted": {
                    "token": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
                    "amount": "10000",
                },
                "spender": "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002",
                "nonce": "2996971721436419175668896082577804673849340779581285186903608056\
                          6753986495042",
                "deadline": "1795957260",
                "witness": {
                    "to": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
                    "facilitator": "0x00000000000000000000000000000000000Fac11",
                    "validAfter": "0",
                },
            },
        })
    );
    // The constants are the reference's, checksum included.
    for address in [x402::PERMIT2_ADDRESS, x402::UPTO_PROXY_ADDRESS] {
        assert_eq!(checksum(&parse_address(address).expect("address")), address);
    }
}

/// Known answer, computed independently with Python `eth_account` 0.14.0 (PyPI), the
/// library the official x402 Python client signs with:
///
/// ```python
/// from eth_account import Account
/// from eth_account.messages import encode_typed_data
/// acct = Account.from_key("0x" + "11" * 32)
/// domain = {"name": "USDC", "version": "2", "chainId": 84532,
///           "verifyingContract": "0x036CbD53842c5426634e7929541eC2318f3dCF7e"}
/// types = {"TransferWithAuthorization": [
///     {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
///     {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
///     {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"}]}
/// msg = {"from": acct.address, "to": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
///        "value": 10000, "validAfter": 0, "validBefore": 1795957260,
///        "nonce": bytes([0x42] * 32)}
/// signed = acct.sign_message(encode_typed_data(domain_data=domain,
///                            message_types=types, message_data=msg))
/// # acct.address, signed.message_hash.hex(), signed.signature.hex()
/// ```
#[test]
fn known_answer_matches_eth_account() {
    let wallet = Wallet::from_key(&[0x11; 32]);
    assert_eq!(
        wallet.address(),
        "0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A"
    );

    let mut req = requirements("10000");
    req["payTo"] = json!("0x209693Bc6afc0C5328bA36FaF03C514EF312287C");
    let payload = wallet.authorize(&req, 0, 1_795_957_260, [0x42; 32]);

    let auth = Authorization::from_json(&payload["authorization"]).expect("parses");
    let digest = auth.digest(&Domain::of(&req).expect("domain"));
    assert_eq!(
        hex::encode(digest),
        "1f4652850c50a1c17c49d042584e8335d43f9752e9758a9a21bbc6537b28c328"
    );
    assert_eq!(
        payload,
        json!({
            "signature": "0xa51c6422c4426b6a9f64df587faffc23d1a7c46445981f81a61235d62fd93bb3\
                          7311c20fe7e76b238ca0c2fee82b680626dfc962893e57d30d71f31cc2f1458f1c",
            "authorization": {
                "from": "0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A",
                "to": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
                "value": "10000",
                "validAfter": "0",
                "validBefore": "1795957260",
                "nonce": "0x4242424242424242424242424242424242424242424242424242424242424242",
            },
        })
    );
}

#[test]
fn eip55_and_uint256_encodings() {
    // EIP-55's own examples.
    for address in [
        "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
        "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
    ] {
        let bytes = parse_address(&address.to_lowercase()).expect("address");
        assert_eq!(checksum(&bytes), address);
    }
    assert_eq!(
        Wallet::from_seed(1).address(),
        Wallet::from_seed(1).address()
    );
    assert_ne!(
        Wallet::from_seed(1).address(),
        Wallet::from_seed(2).address()
    );

    let word = |n: u128| {
        let mut w = [0u8; 32];
        w[16..].copy_from_slice(&n.to_be_bytes());
        w
    };
    assert_eq!(parse_uint256("10000"), Some(word(10_000)));
    assert_eq!(parse_uint256("0x2710"), Some(word(10_000)));
    assert_eq!(parse_uint256("0X0002710"), Some(word(10_000)));
    assert_eq!(parse_uint256("0"), Some(word(0)));
    assert_eq!(parse_uint256(&u128::MAX.to_string()), Some(word(u128::MAX)));
    let max = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
    assert_eq!(parse_uint256(max), Some([0xff; 32]));
    let past_max = "115792089237316195423570985008687907853269984665640564039457584007913129639936";
    assert_eq!(parse_uint256(past_max), None);
    for bad in ["", "-1", "1.5", "0x", "1e3", " 1", "0xg1"] {
        assert_eq!(parse_uint256(bad), None, "{bad:?}");
    }
    for decimal in [
        "0",
        "9",
        "10",
        "255",
        "256",
        "10000",
        &u128::MAX.to_string(),
        max,
    ] {
        let w = parse_uint256(decimal).expect("a uint256");
        assert_eq!(uint256_decimal(&w), decimal);
    }

    let payment = Wallet::from_seed(1).pay(&resource(URL), &requirements("1"), 1, nonce(1));
    assert_eq!(decode_header(&header(&payment)), payment);
}

// ---------------------------------------------------------------------------------------
// Interop with the official x402 Python client (scripts/x402-client.py)
// ---------------------------------------------------------------------------------------

/// A paid resource as the spec's HTTP transport describes it: 402 with `PAYMENT-REQUIRED`
/// (v2) or with the requirements in the body (v1, under `/v1`); a paid retry is verified
/// and settled with the facilitator, then answered with the request's body echoed and
/// `PAYMENT-RESPONSE`. Under `/upto` it offers `upto` for at most 10000 and charges
/// [`UPTO_CHARGE`]. Records the headers of every request.
const UPTO_CHARGE: &str = "2500";

struct PaidResource {
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<axum::http::HeaderMap>>>,
}

#[derive(Clone)]
struct PaidState {
    facilitator: String,
    base: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<axum::http::HeaderMap>>>,
}

async fn paid_handler(
    axum::extract::State(st): axum::extract::State<PaidState>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    st.seen.lock().expect("lock").push(headers.clone());
    let v1 = uri.path().starts_with("/v1");
    let upto = uri.path().starts_with("/upto");
    let url = format!("{}{}", st.base, uri.path());
    let (req, required) = if upto {
        let req = requirements_upto("10000");
        let required = json!({ "x402Version": 2, "error": "PAYMENT-SIGNATURE header is required",
                               "resource": resource(&url), "accepts": [req] });
        (req, required)
    } else if v1 {
        let req = x402::requirements_v1("10000", &url);
        let required = json!({ "x402Version": 1, "error": "X-PAYMENT header is required",
                               "accepts": [req] });
        (req, required)
    } else {
        let req = requirements("10000");
        let required = json!({ "x402Version": 2, "error": "PAYMENT-SIGNATURE header is required",
                               "resource": resource(&url), "accepts": [req] });
        (req, required)
    };
    let payment_header = if v1 { "x-payment" } else { "payment-signature" };
    let Some(payment) = headers.get(payment_header).and_then(|v| v.to_str().ok()) else {
        let mut resp = (
            axum::http::StatusCode::PAYMENT_REQUIRED,
            axum::Json(required.clone()),
        )
            .into_response();
        if !v1 {
            let value = header(&required).parse().expect("header value");
            resp.headers_mut().insert("payment-required", value);
        }
        return resp;
    };
    let request = json!({
        "x402Version": if v1 { 1 } else { 2 },
        "paymentPayload": decode_header(payment),
        "paymentRequirements": req,
    });
    let http = reqwest::Client::new();
    let verified: Value = http
        .post(format!("{}/verify", st.facilitator))
        .json(&request)
        .send()
        .await
        .expect("verify")
        .json()
        .await
        .expect("verify JSON");
    if verified["isValid"] != true {
        let mut refused = required.clone();
        refused["error"] = verified["invalidReason"].clone();
        return (
            axum::http::StatusCode::PAYMENT_REQUIRED,
            axum::Json(refused),
        )
            .into_response();
    }
    let mut request = request;
    if upto {
        request["paymentRequirements"]["amount"] = json!(UPTO_CHARGE);
    }
    let settled: Value = http
        .post(format!("{}/settle", st.facilitator))
        .json(&request)
        .send()
        .await
        .expect("settle")
        .json()
        .await
        .expect("settle JSON");
    let name = if v1 {
        "x-payment-response"
    } else {
        "payment-response"
    };
    let mut resp = axum::Json(json!({ "paid": true, "echo": body })).into_response();
    let value = header(&settled).parse().expect("header value");
    resp.headers_mut().insert(name, value);
    resp
}

impl PaidResource {
    async fn start(facilitator: &Facilitator) -> PaidResource {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let state = PaidState {
            facilitator: facilitator.url.clone(),
            base: base.clone(),
            seen: seen.clone(),
        };
        let app = axum::Router::new().fallback(paid_handler).with_state(state);
        tokio::spawn(async move { axum::serve(listener, app).await });
        PaidResource { url: base, seen }
    }
}

#[tokio::test]
async fn the_official_python_client_pays_and_its_signature_verifies() {
    let Some(python) = client_python() else {
        return;
    };
    let f = Facilitator::start().await;
    let site = PaidResource::start(&f).await;
    let wallet = Wallet::from_seed(7);
    let key = wallet.private_key_hex();

    // v2, GET: 402 with PAYMENT-REQUIRED, paid retry with PAYMENT-SIGNATURE.
    let url = format!("{}/paid", site.url);
    let (out, code) = run_client(&python, &key, &[&url]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"]["paid"], true);
    let settled = &out["payment_response"];
    assert_eq!(settled["success"], true, "{out}");
    assert_eq!(settled["payer"], wallet.address());
    assert_eq!(settled["network"], x402::NETWORK);
    assert_eq!(f.settled().len(), 1);
    assert_eq!(f.verify_calls(), 1);

    // What it sent: a v2 PaymentPayload, as the spec's §5.2 shows it.
    let sent = &out["payment_signature"];
    assert_eq!(f.settled()[0], *sent);
    assert_eq!(x402::payment_payload_errors(sent), Vec::<String>::new());
    assert_eq!(
        x402::settlement_response_errors(settled),
        Vec::<String>::new()
    );
    assert_eq!(sent["x402Version"], 2);
    assert_eq!(sent["accepted"], requirements("10000"));
    assert_eq!(sent["resource"]["url"], url);
    let auth = &sent["payload"]["authorization"];
    assert_eq!(auth["from"], wallet.address());
    assert_eq!(auth["to"], x402::PAY_TO);
    assert_eq!(auth["value"], "10000");
    for field in ["validAfter", "validBefore"] {
        let s = auth[field].as_str().expect("a decimal string");
        assert!(s.bytes().all(|b| b.is_ascii_digit()), "{field}: {s}");
    }
    let valid_before: u64 = auth["validBefore"]
        .as_str()
        .expect("str")
        .parse()
        .expect("u64");
    assert!(
        valid_before <= x402::now_s() + 60 + 5,
        "maxTimeoutSeconds bounds it"
    );
    assert_eq!(auth["nonce"].as_str().expect("nonce").len(), 66);
    assert_eq!(
        sent["payload"]["signature"].as_str().expect("sig").len(),
        132
    );
    // The wallet signs the same authorization to the same bytes (RFC 6979 both sides).
    let nonce_bytes: [u8; 32] = hex::decode(&auth["nonce"].as_str().expect("nonce")[2..])
        .expect("hex")
        .try_into()
        .expect("32 bytes");
    let valid_after: u64 = auth["validAfter"]
        .as_str()
        .expect("str")
        .parse()
        .expect("u64");
    let ours = wallet.authorize(
        &requirements("10000"),
        valid_after,
        valid_before,
        nonce_bytes,
    );
    assert_eq!(ours, sent["payload"]);

    let headers = site.seen.lock().expect("lock").clone();
    assert_eq!(headers.len(), 2, "one 402, one paid retry");
    assert!(headers[0].get("payment-signature").is_none());
    assert_eq!(
        headers[1].get("payment-retry").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );

    // v2, POST with a JSON body and an extra header: both reach the paid retry.
    let (out, code) = run_client(
        &python,
        &key,
        &[
            &url,
            "--method",
            "POST",
            "--json",
            r#"{"n":1}"#,
            "-H",
            "Authorization: Bearer k",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["body"]["echo"], r#"{"n":1}"#);
    let last = site
        .seen
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("seen");
    assert_eq!(
        last.get("authorization").map(|v| v.as_bytes()),
        Some(&b"Bearer k"[..])
    );
    assert_eq!(f.settled().len(), 2);

    // v1: requirements in the 402's body, paid with X-PAYMENT.
    let (out, code) = run_client(&python, &key, &[&format!("{}/v1/paid", site.url)]).await;
    assert_eq!(code, 0, "{out}");
    let sent = &out["payment_signature"];
    assert_eq!(sent["x402Version"], 1);
    assert_eq!(sent["scheme"], "exact");
    assert_eq!(sent["network"], "base-sepolia");
    assert_eq!(out["payment_response"]["success"], true, "{out}");
    assert_eq!(f.settled().len(), 3);

    // A refused payment: the client does not pay twice, and exits 1 with the final 402.
    f.set_now_s(Some(x402::now_s() + 3600));
    let (out, code) = run_client(&python, &key, &[&url]).await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(out["status"], 402);
    assert_eq!(out["body"]["error"], reason::VALID_BEFORE);
    assert_eq!(f.settled().len(), 3);
}

/// The official client's `upto` payload verifies here, and the wallet signs the same
/// permit to the same bytes: the kit's Permit2 EIP-712 hashing is the official one. It
/// also pays an `upto` 402 over HTTP.
#[tokio::test]
async fn the_official_python_clients_upto_payload_verifies() {
    let Some(python) = client_python() else {
        return;
    };
    let f = Facilitator::start().await;
    let wallet = Wallet::from_seed(8);
    let key = wallet.private_key_hex();
    let req = requirements_upto("10000");
    let required = json!({ "x402Version": 2, "resource": resource(URL), "accepts": [req] });
    let (out, code) = run_client(&python, &key, &["--payload-for", &required.to_string()]).await;
    assert_eq!(code, 0, "{out}");
    let sent = &out["payment_payload"];
    assert_eq!(x402::payment_payload_errors(sent), Vec::<String>::new());
    assert_eq!(sent["accepted"], req);
    assert_eq!(
        verify(&f, sent, &req).await,
        json!({ "isValid": true, "payer": wallet.address() })
    );

    // Its random nonce and clock-made deadline, signed by the wallet: the same payload.
    let auth = &sent["payload"]["permit2Authorization"];
    let number = |field: &str| auth[field].as_str().expect("a decimal string").to_owned();
    assert!(
        number("nonce").bytes().all(|b| b.is_ascii_digit()),
        "{auth}"
    );
    let deadline_s: u64 = number("deadline").parse().expect("deadline in seconds");
    assert!(
        deadline_s <= x402::now_s() + 60 + 5,
        "maxTimeoutSeconds bounds it"
    );
    let nonce_word = parse_uint256(&number("nonce")).expect("a uint256");
    assert_eq!(
        wallet.pay_upto(&resource(URL), &req, deadline_s, nonce_word),
        *sent
    );

    let settled = settle(&f, sent, &charging(&req, "1234")).await;
    assert_eq!(
        (&settled["success"], &settled["amount"]),
        (&json!(true), &json!("1234"))
    );

    // Over HTTP: the 402 offers `upto`, the client pays it, the resource charges less.
    let site = PaidResource::start(&f).await;
    let (out, code) = run_client(&python, &key, &[&format!("{}/upto/paid", site.url)]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["payment_signature"]["accepted"]["scheme"], "upto");
    assert_eq!(out["payment_response"]["amount"], UPTO_CHARGE, "{out}");
    assert_eq!(f.settled_amounts(), ["1234", UPTO_CHARGE]);
}

#[test]
fn v2_message_rules() {
    // The spec's §5.1.1 example is valid.
    let example = json!({
        "x402Version": 2,
        "error": "PAYMENT-SIGNATURE header is required",
        "resource": { "url": "https://api.example.com/premium-data",
                      "description": "Access to premium market data",
                      "mimeType": "application/json" },
        "accepts": [{
            "scheme": "exact", "network": "eip155:84532", "amount": "10000",
            "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
            "payTo": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
            "maxTimeoutSeconds": 60, "extra": { "name": "USDC", "version": "2" },
        }],
        "extensions": {},
    });
    assert_eq!(
        x402::payment_required_errors(&example),
        Vec::<String>::new()
    );
    for (path, bad) in [
        ("/x402Version", json!(1)),
        ("/accepts", json!([])),
        ("/resource", json!("https://api.example.com")),
        ("/accepts/0/amount", json!(10000)),
        ("/accepts/0/amount", json!("0.01")),
        ("/accepts/0/network", json!("base-sepolia")),
        ("/accepts/0/maxTimeoutSeconds", json!("60")),
        ("/accepts/0/extra", json!("USDC")),
        ("/error", json!(402)),
    ] {
        let mut broken = example.clone();
        *broken.pointer_mut(path).expect("path") = bad.clone();
        assert!(
            !x402::payment_required_errors(&broken).is_empty(),
            "{path} = {bad} passed"
        );
    }
    let payment = Wallet::from_seed(1).pay(&resource(URL), &requirements("1"), 1, nonce(1));
    assert_eq!(x402::payment_payload_errors(&payment), Vec::<String>::new());
    let v1 = Wallet::from_seed(1).pay_v1(&x402::requirements_v1("1", URL), 1, nonce(1));
    assert!(!x402::payment_payload_errors(&v1).is_empty());
    let settled = json!({ "success": true, "transaction": "0x12", "network": "eip155:84532",
                          "payer": "0x857b06519E91e3A54538791bDbb0E22373e36b66" });
    assert_eq!(
        x402::settlement_response_errors(&settled),
        Vec::<String>::new()
    );
    assert!(!x402::settlement_response_errors(&json!({ "success": "true" })).is_empty());
}
