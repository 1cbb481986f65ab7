//! x402 test kit: a mock facilitator that really checks `exact` EVM payments (EIP-712 /
//! EIP-3009 signatures recovered over secp256k1, recipient, amount, time window, nonce
//! reuse) and `upto` EVM payments (Permit2 `PermitWitnessTransferFrom`, settled for any
//! amount up to the signed maximum), and a throwaway wallet that signs both as the
//! official clients do.
//!
//! Wire shapes follow coinbase/x402 `specs/x402-specification-v2.md` (§5 types, §7
//! facilitator API). Where the spec's prose and the reference facilitator (PyPI `x402`
//! 2.25.0, `mechanisms/evm/exact/facilitator.py`) differ, the kit does what the reference
//! facilitator does, since that is what a real facilitator answers:
//! - the authorized `value` must EQUAL `paymentRequirements.amount` (the spec's §6.1.2 says
//!   "meets or exceeds"; the reference rejects any difference with
//!   [`reason::VALUE_MISMATCH`]);
//! - `validBefore` must be at least [`VALID_BEFORE_MARGIN_S`] seconds in the future;
//! - reason strings are the reference's constants (see [`reason`]).
//!
//! `upto` follows the reference's `mechanisms/evm/upto/permit2_utils.py`
//! (`verify_upto_permit2`, `settle_upto_permit2`) and the spec's
//! `specs/schemes/upto/scheme_upto_evm.md`: verify wants `permitted.amount` EQUAL to the
//! requirements' amount; settle takes the requirements' amount as the amount to charge
//! (the resource server's settlement override), any amount up to `permitted.amount`, and
//! a settle of 0 succeeds with no transaction (so it does not spend the permit's nonce).

#![allow(dead_code)]

use std::collections::HashSet;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k256::ecdsa::{RecoveryId, Signature, SigningKey, VerifyingKey};
use serde_json::{json, Value};
use sha3::{Digest, Keccak256};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Notify};

/// Base Sepolia, the network of the tests' `[x402]` config (`common::X402`).
pub const NETWORK: &str = "eip155:84532";
/// The same network under its v1 name (v1 used plain names, v2 uses CAIP-2).
pub const NETWORK_V1: &str = "base-sepolia";
/// USDC on Base Sepolia.
pub const ASSET: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
/// The `pay_to` of `common::X402`.
pub const PAY_TO: &str = "0x000000000000000000000000000000000000dEaD";
/// The reference facilitator answers `validBefore < now + 6` as expired: an authorization
/// about to lapse could not be mined in time.
pub const VALID_BEFORE_MARGIN_S: u64 = 6;

/// Permit2's canonical address (the same on every chain): the `verifyingContract` of the
/// EIP-712 domain an `upto` permit is signed under.
pub const PERMIT2_ADDRESS: &str = "0x000000000022D473030F116dDEE9F6B43aC78BA3";
/// x402's upto Permit2 proxy (`X402_UPTO_PERMIT2_PROXY_ADDRESS`): the only `spender` an
/// `upto` permit may name, since it is the contract that enforces the witness.
pub const UPTO_PROXY_ADDRESS: &str = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002";

/// The `invalidReason` / `errorReason` strings the mock answers: the reference
/// facilitator's (PyPI `x402` 2.25.0, `mechanisms/evm/constants.py`), except where marked.
pub mod reason {
    pub const UNSUPPORTED_SCHEME: &str = "unsupported_scheme";
    pub const NETWORK_MISMATCH: &str = "network_mismatch";
    /// The spec's §9 name; the reference answers an unknown chain with
    /// `invalid_exact_evm_failed_to_get_network_config` (`upto`:
    /// `invalid_upto_evm_failed_to_get_network_config`).
    pub const INVALID_NETWORK: &str = "invalid_network";
    /// The spec's §9 name, for a payload or request that does not parse.
    pub const INVALID_PAYLOAD: &str = "invalid_payload";
    /// The spec's §9 name, for an `x402Version` other than 1 or 2.
    pub const INVALID_X402_VERSION: &str = "invalid_x402_version";
    pub const MISSING_EIP712_DOMAIN: &str = "missing_eip712_domain";
    /// The kit's own name: the reference does not compare assets (the signature's domain
    /// does: a payment for another asset fails as [`INVALID_SIGNATURE`]).
    pub const ASSET_MISMATCH: &str = "invalid_exact_evm_payload_asset_mismatch";
    pub const RECIPIENT_MISMATCH: &str = "invalid_exact_evm_payload_recipient_mismatch";
    /// The spec's §9 list says `invalid_exact_evm_payload_authorization_value`.
    pub const VALUE_MISMATCH: &str = "invalid_exact_evm_payload_authorization_value_mismatch";
    pub const VALID_BEFORE: &str = "invalid_exact_evm_payload_authorization_valid_before";
    pub const VALID_AFTER: &str = "invalid_exact_evm_payload_authorization_valid_after";
    pub const INVALID_SIGNATURE: &str = "invalid_exact_evm_payload_signature";
    pub const NONCE_ALREADY_USED: &str = "invalid_exact_evm_nonce_already_used";
    /// What a settle answers after [`super::Facilitator::fail_next_settle`]: the
    /// reference's name for a reverted `transferWithAuthorization`.
    pub const TRANSACTION_FAILED: &str = "transaction_failed";

    // `upto` (Permit2), in the order the reference checks them.
    /// What the reference's `upto` scheme answers for a `payload` that is not an upto
    /// permit (no `permit2Authorization.witness.facilitator`).
    pub const UNSUPPORTED_PAYLOAD_TYPE: &str = "unsupported_payload_type";
    pub const UPTO_INVALID_SCHEME: &str = "invalid_upto_evm_scheme";
    pub const UPTO_NETWORK_MISMATCH: &str = "invalid_upto_evm_network_mismatch";
    pub const PERMIT2_INVALID_SPENDER: &str = "invalid_permit2_spender";
    pub const PERMIT2_RECIPIENT_MISMATCH: &str = "invalid_permit2_recipient_mismatch";
    pub const UPTO_FACILITATOR_MISMATCH: &str = "upto_facilitator_mismatch";
    /// A permit's amount, deadline or validAfter, or the amount to settle, that does not
    /// parse (a bad `from` or nonce fails as [`PERMIT2_INVALID_SIGNATURE`], as there).
    pub const PERMIT2_PAYLOAD_FORMAT: &str = "invalid_permit2_payload_format";
    pub const PERMIT2_DEADLINE_EXPIRED: &str = "permit2_deadline_expired";
    pub const PERMIT2_NOT_YET_VALID: &str = "permit2_not_yet_valid";
    pub const PERMIT2_AMOUNT_MISMATCH: &str = "permit2_amount_mismatch";
    pub const PERMIT2_TOKEN_MISMATCH: &str = "permit2_token_mismatch";
    pub const PERMIT2_INVALID_SIGNATURE: &str = "invalid_permit2_signature";
    /// A settle for more than `permitted.amount`.
    pub const UPTO_SETTLEMENT_EXCEEDS_AMOUNT: &str =
        "invalid_upto_evm_payload_settlement_exceeds_amount";
    /// Verify of a permit whose nonce is spent: the reference finds it by simulating the
    /// settle, and answers a failed simulation (balance and allowance fine) so. Also what
    /// a settle answers after [`super::Facilitator::fail_next_settle`].
    pub const UPTO_TRANSACTION_FAILED: &str = "invalid_upto_evm_transaction_failed";
    /// Settle of a permit whose nonce is spent: the reference's name for Permit2's
    /// `InvalidNonce` revert.
    pub const PERMIT2_INVALID_NONCE: &str = "permit2_invalid_nonce";
}

/// Seconds since the Unix epoch, real clock (the facilitator's default clock).
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// v2 `PaymentRequirements` for `amount` atomic units on [`NETWORK`], paid to [`PAY_TO`]:
/// what tally's 402 should offer under `common::X402`.
pub fn requirements(amount: &str) -> Value {
    json!({
        "scheme": "exact",
        "network": NETWORK,
        "amount": amount,
        "asset": ASSET,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": { "name": "USDC", "version": "2" },
    })
}

/// v2 `upto` `PaymentRequirements` for at most `amount` atomic units, as the official
/// server's `UptoEvmScheme` builds them from this mock's `/supported`: `extra` carries
/// the facilitator that must settle ([`FACILITATOR_SIGNER`]) and the transfer method.
pub fn requirements_upto(amount: &str) -> Value {
    json!({
        "scheme": "upto",
        "network": NETWORK,
        "amount": amount,
        "asset": ASSET,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {
            "name": "USDC",
            "version": "2",
            "facilitatorAddress": FACILITATOR_SIGNER,
            "assetTransferMethod": "permit2",
        },
    })
}

/// v1 `PaymentRequirements` (`maxAmountRequired`, plain network name, resource as a URL).
pub fn requirements_v1(amount: &str, resource_url: &str) -> Value {
    json!({
        "scheme": "exact",
        "network": NETWORK_V1,
        "maxAmountRequired": amount,
        "resource": resource_url,
        "description": "",
        "mimeType": "application/json",
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "asset": ASSET,
        "extra": { "name": "USDC", "version": "2" },
    })
}

/// A v2 `ResourceInfo`.
pub fn resource(url: &str) -> Value {
    json!({ "url": url, "description": "", "mimeType": "application/json" })
}

/// An HTTP header value for a payment (`PAYMENT-SIGNATURE`, `X-PAYMENT`), a payment
/// requirement (`PAYMENT-REQUIRED`) or a settle response (`PAYMENT-RESPONSE`): standard
/// base64 with padding of the JSON, as the official clients encode them.
pub fn header(payload: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(payload.to_string())
}

/// The JSON in a base64 x402 header; panics on anything else (a test helper).
pub fn decode_header(value: &str) -> Value {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .expect("x402 header is base64");
    serde_json::from_slice(&bytes).expect("x402 header is JSON")
}

// ---------------------------------------------------------------------------------------
// v2 message rules (coinbase/x402 specs/schemas/x402-v2.schema.json, its rules copied)
// ---------------------------------------------------------------------------------------

/// What breaks the rules of the v2 `PaymentRequired` (the 402's `PAYMENT-REQUIRED` JSON):
/// the schema's (`x402Version` const 2, `accepts` an array of at least one
/// `PaymentRequirements`, `resource` a `ResourceInfo` with a string `url`, `error` a
/// string) and the spec's §5.1.2 table (which also requires `amount` and
/// `maxTimeoutSeconds`, and `resource`). Empty when valid.
pub fn payment_required_errors(v: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let Some(obj) = v.as_object() else {
        return vec!["PaymentRequired is not an object".into()];
    };
    if obj.get("x402Version") != Some(&json!(2)) {
        errors.push(format!(
            "x402Version must be 2, is {:?}",
            obj.get("x402Version")
        ));
    }
    if let Some(error) = obj.get("error") {
        if !error.is_string() {
            errors.push("error must be a string".into());
        }
    }
    match obj.get("resource") {
        Some(r) => resource_errors(r, "resource", &mut errors),
        None => errors.push("resource is required (spec §5.1.2)".into()),
    }
    match obj.get("accepts").and_then(Value::as_array) {
        Some(accepts) if !accepts.is_empty() => {
            for (i, req) in accepts.iter().enumerate() {
                requirements_errors(req, &format!("accepts[{i}]"), &mut errors);
            }
        }
        _ => errors.push("accepts must be an array of at least one item".into()),
    }
    if let Some(ext) = obj.get("extensions") {
        if !ext.is_object() {
            errors.push("extensions must be an object".into());
        }
    }
    errors
}

/// What breaks the rules of a v2 `PaymentPayload` with an `exact` EVM `payload`, or an
/// `upto` one (`payload.permit2Authorization`, the reference's `UptoPermit2Payload`).
pub fn payment_payload_errors(v: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let Some(obj) = v.as_object() else {
        return vec!["PaymentPayload is not an object".into()];
    };
    if obj.get("x402Version") != Some(&json!(2)) {
        errors.push("x402Version must be 2".into());
    }
    if let Some(r) = obj.get("resource") {
        resource_errors(r, "resource", &mut errors);
    }
    match obj.get("accepted") {
        Some(req) => requirements_errors(req, "accepted", &mut errors),
        None => errors.push("accepted is required".into()),
    }
    let payload = &v["payload"];
    if !payload["signature"].is_string() {
        errors.push("payload.signature must be a string".into());
    }
    let (object, fields): (&str, &[&str]) = if payload.get("permit2Authorization").is_some() {
        let fields = &[
            "from",
            "permitted/token",
            "permitted/amount",
            "spender",
            "nonce",
            "deadline",
            "witness/to",
            "witness/facilitator",
            "witness/validAfter",
        ];
        ("permit2Authorization", fields)
    } else {
        let fields = &["from", "to", "value", "validAfter", "validBefore", "nonce"];
        ("authorization", fields)
    };
    for field in fields {
        let at = format!("/payload/{object}/{field}");
        if !v.pointer(&at).is_some_and(Value::is_string) {
            errors.push(format!("{at} must be a string"));
        }
    }
    errors
}

/// What breaks the rules of a `SettlementResponse` (the `PAYMENT-RESPONSE` JSON):
/// `success` a boolean, `transaction` and `network` strings (required), `payer` and
/// `errorReason` strings when present.
pub fn settlement_response_errors(v: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    if !v["success"].is_boolean() {
        errors.push("success must be a boolean".into());
    }
    for field in ["transaction", "network"] {
        if !v[field].is_string() {
            errors.push(format!("{field} must be a string"));
        }
    }
    for field in ["payer", "errorReason"] {
        if v.get(field).is_some_and(|x| !x.is_string()) {
            errors.push(format!("{field} must be a string when present"));
        }
    }
    errors
}

fn resource_errors(r: &Value, at: &str, errors: &mut Vec<String>) {
    if !r.is_object() || !r["url"].is_string() {
        errors.push(format!("{at} must be an object with a string url"));
    }
    for field in ["description", "mimeType"] {
        if r.get(field).is_some_and(|x| !x.is_string()) {
            errors.push(format!("{at}.{field} must be a string"));
        }
    }
}

fn requirements_errors(req: &Value, at: &str, errors: &mut Vec<String>) {
    if !req.is_object() {
        errors.push(format!("{at} must be an object"));
        return;
    }
    for field in ["scheme", "network", "asset", "payTo", "amount"] {
        if !req[field].is_string() {
            errors.push(format!("{at}.{field} must be a string"));
        }
    }
    // CAIP-2: `namespace:reference`.
    if let Some(network) = req["network"].as_str() {
        let caip2 = network
            .split_once(':')
            .is_some_and(|(ns, reference)| !ns.is_empty() && !reference.is_empty());
        if !caip2 {
            errors.push(format!("{at}.network {network:?} is not CAIP-2"));
        }
    }
    // "Amount in atomic units, as a base-10 integer string".
    if let Some(amount) = req["amount"].as_str() {
        if amount.is_empty() || !amount.bytes().all(|b| b.is_ascii_digit()) {
            errors.push(format!("{at}.amount {amount:?} is not a base-10 integer"));
        }
    }
    if !req["maxTimeoutSeconds"].is_u64() {
        errors.push(format!("{at}.maxTimeoutSeconds must be an integer >= 0"));
    }
    if req.get("extra").is_some_and(|x| !x.is_object()) {
        errors.push(format!("{at}.extra must be an object when present"));
    }
}

// ---------------------------------------------------------------------------------------
// EIP-712 / EIP-3009
// ---------------------------------------------------------------------------------------

const DOMAIN_TYPE: &str =
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)";
const TRANSFER_TYPE: &str = "TransferWithAuthorization(address from,address to,uint256 value,\
                             uint256 validAfter,uint256 validBefore,bytes32 nonce)";

pub fn keccak(bytes: &[u8]) -> [u8; 32] {
    Keccak256::digest(bytes).into()
}

/// The EIP-3009 `TransferWithAuthorization` message, its numbers as 32-byte big-endian
/// words (EIP-712 encodes every `uint256` so, and comparing words compares numbers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    pub from: [u8; 20],
    pub to: [u8; 20],
    pub value: [u8; 32],
    pub valid_after: [u8; 32],
    pub valid_before: [u8; 32],
    pub nonce: [u8; 32],
}

/// The EIP-712 domain of an EIP-3009 token: `extra.name`, `extra.version`, the chain and
/// the token contract (`asset`).
#[derive(Clone, Debug)]
pub struct Domain {
    pub name: String,
    pub version: String,
    pub chain_id: u64,
    pub verifying_contract: [u8; 20],
}

impl Domain {
    /// The domain that `requirements` (v1 or v2) ask to be signed under.
    pub fn of(requirements: &Value) -> Result<Domain, &'static str> {
        let extra = &requirements["extra"];
        let (Some(name), Some(version)) = (extra["name"].as_str(), extra["version"].as_str())
        else {
            return Err(reason::MISSING_EIP712_DOMAIN);
        };
        let network = requirements["network"]
            .as_str()
            .ok_or(reason::INVALID_PAYLOAD)?;
        let chain_id = chain_id(network).ok_or(reason::INVALID_NETWORK)?;
        let verifying_contract = requirements["asset"]
            .as_str()
            .and_then(parse_address)
            .ok_or(reason::INVALID_PAYLOAD)?;
        Ok(Domain {
            name: name.to_owned(),
            version: version.to_owned(),
            chain_id,
            verifying_contract,
        })
    }

    pub fn separator(&self) -> [u8; 32] {
        let mut enc = Vec::with_capacity(5 * 32);
        enc.extend_from_slice(&keccak(DOMAIN_TYPE.as_bytes()));
        enc.extend_from_slice(&keccak(self.name.as_bytes()));
        enc.extend_from_slice(&keccak(self.version.as_bytes()));
        enc.extend_from_slice(&word_u64(self.chain_id));
        enc.extend_from_slice(&word_address(&self.verifying_contract));
        keccak(&enc)
    }
}

impl Authorization {
    pub fn struct_hash(&self) -> [u8; 32] {
        let mut enc = Vec::with_capacity(7 * 32);
        enc.extend_from_slice(&keccak(TRANSFER_TYPE.as_bytes()));
        enc.extend_from_slice(&word_address(&self.from));
        enc.extend_from_slice(&word_address(&self.to));
        enc.extend_from_slice(&self.value);
        enc.extend_from_slice(&self.valid_after);
        enc.extend_from_slice(&self.valid_before);
        enc.extend_from_slice(&self.nonce);
        keccak(&enc)
    }

    /// The EIP-712 digest that is signed: `keccak(0x19 0x01 ‖ domainSeparator ‖ hashStruct)`.
    pub fn digest(&self, domain: &Domain) -> [u8; 32] {
        let mut enc = Vec::with_capacity(2 + 64);
        enc.extend_from_slice(&[0x19, 0x01]);
        enc.extend_from_slice(&domain.separator());
        enc.extend_from_slice(&self.struct_hash());
        keccak(&enc)
    }

    /// Parses the JSON `authorization` as the spec encodes it (addresses 0x-hex; numbers
    /// decimal, or hex when 0x-prefixed; nonce 0x-hex of 32 bytes).
    pub fn from_json(auth: &Value) -> Option<Authorization> {
        let nonce = hex_fixed::<32>(auth["nonce"].as_str()?)?;
        Some(Authorization {
            from: parse_address(auth["from"].as_str()?)?,
            to: parse_address(auth["to"].as_str()?)?,
            value: parse_uint256(auth["value"].as_str()?)?,
            valid_after: parse_uint256(auth["validAfter"].as_str()?)?,
            valid_before: parse_uint256(auth["validBefore"].as_str()?)?,
            nonce,
        })
    }
}

// ---------------------------------------------------------------------------------------
// EIP-712 / Permit2 (`upto`)
// ---------------------------------------------------------------------------------------

/// Permit2's domain has no `version` (Permit2's own `EIP712` contract leaves it out).
const PERMIT2_DOMAIN_TYPE: &str =
    "EIP712Domain(string name,uint256 chainId,address verifyingContract)";
const PERMIT_WITNESS_TRANSFER_TYPE: &str = "PermitWitnessTransferFrom(TokenPermissions permitted,\
                                            address spender,uint256 nonce,uint256 deadline,\
                                            Witness witness)";
const TOKEN_PERMISSIONS_TYPE: &str = "TokenPermissions(address token,uint256 amount)";
/// The upto witness: the exact scheme's Permit2 witness plus `facilitator`, so that only
/// the facilitator the client chose can settle (and pick the amount).
const UPTO_WITNESS_TYPE: &str = "Witness(address to,address facilitator,uint256 validAfter)";

/// `encodeType` of the primary type: EIP-712 appends the types it references, sorted by
/// name (`TokenPermissions` < `Witness`).
fn permit_witness_type_hash() -> [u8; 32] {
    keccak(
        [
            PERMIT_WITNESS_TRANSFER_TYPE,
            TOKEN_PERMISSIONS_TYPE,
            UPTO_WITNESS_TYPE,
        ]
        .concat()
        .as_bytes(),
    )
}

/// Permit2's domain separator on `chain_id`.
pub fn permit2_domain_separator(chain_id: u64) -> [u8; 32] {
    let permit2 = parse_address(PERMIT2_ADDRESS).expect("PERMIT2_ADDRESS is an address");
    let mut enc = Vec::with_capacity(4 * 32);
    enc.extend_from_slice(&keccak(PERMIT2_DOMAIN_TYPE.as_bytes()));
    enc.extend_from_slice(&keccak(b"Permit2"));
    enc.extend_from_slice(&word_u64(chain_id));
    enc.extend_from_slice(&word_address(&permit2));
    keccak(&enc)
}

/// An `upto` permit: Permit2's `PermitWitnessTransferFrom` with the upto witness, and the
/// `from` it claims (not signed: Permit2 recovers the owner from the signature). Numbers
/// as 32-byte big-endian words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UptoPermit {
    pub from: [u8; 20],
    pub token: [u8; 20],
    /// The most the facilitator may transfer.
    pub amount: [u8; 32],
    pub spender: [u8; 20],
    pub nonce: [u8; 32],
    pub deadline: [u8; 32],
    pub to: [u8; 20],
    pub facilitator: [u8; 20],
    pub valid_after: [u8; 32],
}

impl UptoPermit {
    /// `hashStruct(PermitWitnessTransferFrom)`, its struct members hashed with their own
    /// `hashStruct` (EIP-712 `encodeData`).
    pub fn struct_hash(&self) -> [u8; 32] {
        let mut permitted = Vec::with_capacity(3 * 32);
        permitted.extend_from_slice(&keccak(TOKEN_PERMISSIONS_TYPE.as_bytes()));
        permitted.extend_from_slice(&word_address(&self.token));
        permitted.extend_from_slice(&self.amount);
        let mut witness = Vec::with_capacity(4 * 32);
        witness.extend_from_slice(&keccak(UPTO_WITNESS_TYPE.as_bytes()));
        witness.extend_from_slice(&word_address(&self.to));
        witness.extend_from_slice(&word_address(&self.facilitator));
        witness.extend_from_slice(&self.valid_after);
        let mut enc = Vec::with_capacity(6 * 32);
        enc.extend_from_slice(&permit_witness_type_hash());
        enc.extend_from_slice(&keccak(&permitted));
        enc.extend_from_slice(&word_address(&self.spender));
        enc.extend_from_slice(&self.nonce);
        enc.extend_from_slice(&self.deadline);
        enc.extend_from_slice(&keccak(&witness));
        keccak(&enc)
    }

    /// The EIP-712 digest signed on `chain_id`, under Permit2's domain.
    pub fn digest(&self, chain_id: u64) -> [u8; 32] {
        let mut enc = Vec::with_capacity(2 + 64);
        enc.extend_from_slice(&[0x19, 0x01]);
        enc.extend_from_slice(&permit2_domain_separator(chain_id));
        enc.extend_from_slice(&self.struct_hash());
        keccak(&enc)
    }

    /// Parses `payload.permit2Authorization` (addresses 0x-hex, numbers decimal strings,
    /// or 0x-hex).
    pub fn from_json(auth: &Value) -> Option<UptoPermit> {
        let address = |v: &Value| v.as_str().and_then(parse_address);
        let uint = |v: &Value| v.as_str().and_then(parse_uint256);
        Some(UptoPermit {
            from: address(&auth["from"])?,
            token: address(&auth["permitted"]["token"])?,
            amount: uint(&auth["permitted"]["amount"])?,
            spender: address(&auth["spender"])?,
            nonce: uint(&auth["nonce"])?,
            deadline: uint(&auth["deadline"])?,
            to: address(&auth["witness"]["to"])?,
            facilitator: address(&auth["witness"]["facilitator"])?,
            valid_after: uint(&auth["witness"]["validAfter"])?,
        })
    }
}

/// The chain id of a CAIP-2 `eip155:<id>` network, or of a v1 network name.
pub fn chain_id(network: &str) -> Option<u64> {
    if let Some(id) = network.strip_prefix("eip155:") {
        return id.parse().ok();
    }
    // The v1 names the reference client knows for the networks of these tests.
    match network {
        "base" => Some(8453),
        "base-sepolia" => Some(84532),
        "avalanche" => Some(43114),
        "avalanche-fuji" => Some(43113),
        _ => None,
    }
}

fn word_u64(n: u64) -> [u8; 32] {
    let mut w = [0u8; 32];
    w[24..].copy_from_slice(&n.to_be_bytes());
    w
}

fn word_address(a: &[u8; 20]) -> [u8; 32] {
    let mut w = [0u8; 32];
    w[12..].copy_from_slice(a);
    w
}

fn strip_0x(s: &str) -> Option<&str> {
    s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))
}

fn hex_fixed<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(strip_0x(s)?, &mut out).ok()?;
    Some(out)
}

/// A 0x-prefixed 20-byte address, any letter case (the checksum is not enforced: the
/// reference compares addresses lower-cased).
pub fn parse_address(s: &str) -> Option<[u8; 20]> {
    hex_fixed::<20>(s)
}

/// A `uint256` as the spec encodes it: hex when 0x-prefixed (leading zeros may be left
/// out), decimal otherwise. `None` past 2^256 − 1 or on any other character.
pub fn parse_uint256(s: &str) -> Option<[u8; 32]> {
    let mut w = [0u8; 32];
    if let Some(h) = strip_0x(s) {
        if h.is_empty() || h.len() > 64 {
            return None;
        }
        let padded = format!("{h:0>64}");
        hex::decode_to_slice(padded, &mut w).ok()?;
        return Some(w);
    }
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    for digit in s.bytes().map(|b| b - b'0') {
        // w = w * 10 + digit, overflow past 256 bits refused.
        let mut carry = u16::from(digit);
        for byte in w.iter_mut().rev() {
            let x = u16::from(*byte) * 10 + carry;
            *byte = (x & 0xff) as u8;
            carry = x >> 8;
        }
        if carry != 0 {
            return None;
        }
    }
    Some(w)
}

/// A `uint256` word in decimal, as Permit2 nonces and amounts travel in JSON.
pub fn uint256_decimal(w: &[u8; 32]) -> String {
    let mut n = *w;
    let mut digits = Vec::new();
    loop {
        // n, remainder = n / 10, n % 10: long division, most significant byte first.
        let mut remainder = 0u16;
        for byte in n.iter_mut() {
            let x = (remainder << 8) | u16::from(*byte);
            *byte = (x / 10) as u8;
            remainder = x % 10;
        }
        digits.push(b'0' + remainder as u8);
        if n.iter().all(|&b| b == 0) {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).expect("ASCII digits")
}

fn word_to_u64(w: &[u8; 32]) -> Option<u64> {
    if w[..24].iter().any(|&b| b != 0) {
        return None;
    }
    Some(u64::from_be_bytes(w[24..].try_into().expect("8 bytes")))
}

/// The 20-byte address of a public key: the last 20 bytes of keccak of its 64-byte
/// uncompressed form.
pub fn address_of(key: &VerifyingKey) -> [u8; 20] {
    let point = key.to_encoded_point(false);
    let hash = keccak(&point.as_bytes()[1..]);
    hash[12..].try_into().expect("20 bytes")
}

/// EIP-55 mixed-case checksum form, 0x-prefixed.
pub fn checksum(address: &[u8; 20]) -> String {
    let lower = hex::encode(address);
    let hash = keccak(lower.as_bytes());
    let mut out = String::with_capacity(42);
    out.push_str("0x");
    for (i, c) in lower.chars().enumerate() {
        let nibble = (hash[i / 2] >> (if i % 2 == 0 { 4 } else { 0 })) & 0x0f;
        out.push(if c.is_ascii_alphabetic() && nibble >= 8 {
            c.to_ascii_uppercase()
        } else {
            c
        });
    }
    out
}

/// The signer of `digest` given a 65-byte `r ‖ s ‖ v` signature (`v` 27/28 or 0/1). High-s
/// signatures are refused, as USDC's `ecrecover` wrapper does.
pub fn recover(digest: &[u8; 32], signature: &[u8]) -> Option<[u8; 20]> {
    if signature.len() != 65 {
        return None;
    }
    let sig = Signature::from_slice(&signature[..64]).ok()?;
    let v = match signature[64] {
        v @ (27 | 28) => v - 27,
        v @ (0 | 1) => v,
        _ => return None,
    };
    let key = VerifyingKey::recover_from_prehash(digest, &sig, RecoveryId::from_byte(v)?).ok()?;
    Some(address_of(&key))
}

// ---------------------------------------------------------------------------------------
// Wallet
// ---------------------------------------------------------------------------------------

/// A throwaway secp256k1 key that signs `exact` and `upto` EVM payments.
#[derive(Clone)]
pub struct Wallet {
    key: SigningKey,
}

impl std::fmt::Debug for Wallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wallet({})", self.address())
    }
}

impl Wallet {
    /// The same wallet for the same seed: key = keccak("tally x402 test wallet" ‖ seed).
    pub fn from_seed(seed: u8) -> Wallet {
        let mut material = b"tally x402 test wallet".to_vec();
        material.push(seed);
        Wallet::from_key(&keccak(&material))
    }

    /// A wallet of a given private key (32 bytes, big-endian).
    pub fn from_key(key: &[u8; 32]) -> Wallet {
        Wallet {
            key: SigningKey::from_slice(key).expect("a valid secp256k1 private key"),
        }
    }

    /// The private key, 0x-hex (for `X402_PRIVATE_KEY` of the official client).
    pub fn private_key_hex(&self) -> String {
        format!("0x{}", hex::encode(self.key.to_bytes()))
    }

    pub fn address_bytes(&self) -> [u8; 20] {
        address_of(self.key.verifying_key())
    }

    /// 0x + 40 hex, EIP-55 checksummed.
    pub fn address(&self) -> String {
        checksum(&self.address_bytes())
    }

    /// 65 bytes `r ‖ s ‖ v`, `v` 27 or 28 as Ethereum wallets give it; RFC 6979
    /// deterministic, low-s.
    pub fn sign_digest(&self, digest: &[u8; 32]) -> [u8; 65] {
        let (sig, recid) = self
            .key
            .sign_prehash_recoverable(digest)
            .expect("signing a 32-byte digest");
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&sig.to_bytes());
        out[64] = 27 + recid.to_byte();
        out
    }

    /// The scheme payload `{signature, authorization}` for `requirements` (v1 or v2: the
    /// amount is `amount`, else `maxAmountRequired`), encoded as the official clients
    /// send it: numbers as decimal strings, nonce and signature 0x-hex, `from` EIP-55.
    pub fn authorize(
        &self,
        requirements: &Value,
        valid_after_s: u64,
        valid_before_s: u64,
        nonce: [u8; 32],
    ) -> Value {
        let domain = Domain::of(requirements).expect("requirements with an EIP-712 domain");
        let amount = requirements["amount"]
            .as_str()
            .or_else(|| requirements["maxAmountRequired"].as_str())
            .expect("requirements with an amount");
        let pay_to = requirements["payTo"].as_str().expect("requirements.payTo");
        let auth = Authorization {
            from: self.address_bytes(),
            to: parse_address(pay_to).expect("payTo is an address"),
            value: parse_uint256(amount).expect("amount is a uint256"),
            valid_after: word_u64(valid_after_s),
            valid_before: word_u64(valid_before_s),
            nonce,
        };
        let signature = self.sign_digest(&auth.digest(&domain));
        json!({
            "signature": format!("0x{}", hex::encode(signature)),
            "authorization": {
                "from": self.address(),
                // `payTo` as the requirements spell it, as the official client sends it.
                "to": pay_to,
                "value": amount,
                "validAfter": valid_after_s.to_string(),
                "validBefore": valid_before_s.to_string(),
                "nonce": format!("0x{}", hex::encode(nonce)),
            },
        })
    }

    /// A v2 `PaymentPayload` (the `PAYMENT-SIGNATURE` header's JSON) for `requirements`,
    /// `validAfter` 0 as the official Python client (2.25.0) sends it.
    pub fn pay(
        &self,
        resource: &Value,
        requirements: &Value,
        valid_before_s: u64,
        nonce: [u8; 32],
    ) -> Value {
        json!({
            "x402Version": 2,
            "resource": resource,
            "accepted": requirements,
            "payload": self.authorize(requirements, 0, valid_before_s, nonce),
        })
    }

    /// A v1 payment (the `X-PAYMENT` header's JSON) for v1 `requirements`
    /// (see [`requirements_v1`]).
    pub fn pay_v1(&self, requirements: &Value, valid_before_s: u64, nonce: [u8; 32]) -> Value {
        json!({
            "x402Version": 1,
            "scheme": requirements["scheme"],
            "network": requirements["network"],
            "payload": self.authorize(requirements, 0, valid_before_s, nonce),
        })
    }

    /// The `upto` scheme payload `{signature, permit2Authorization}` for `requirements`
    /// (v2, `extra.facilitatorAddress` set), encoded as the official Python client's
    /// `UptoPermit2Payload.to_dict`: addresses EIP-55, numbers (nonce included) decimal
    /// strings, the maximum `permitted.amount` = `requirements.amount`.
    pub fn permit_upto(
        &self,
        requirements: &Value,
        valid_after_s: u64,
        deadline_s: u64,
        nonce: [u8; 32],
    ) -> Value {
        let chain = requirements["network"]
            .as_str()
            .and_then(chain_id)
            .expect("requirements on an eip155 network");
        let field = |name: &str| {
            let v = requirements.pointer(name).and_then(Value::as_str);
            v.unwrap_or_else(|| panic!("requirements{name}"))
        };
        let address = |name: &str| parse_address(field(name)).expect("an address");
        let amount = field("/amount");
        let permit = UptoPermit {
            from: self.address_bytes(),
            token: address("/asset"),
            amount: parse_uint256(amount).expect("amount is a uint256"),
            spender: parse_address(UPTO_PROXY_ADDRESS).expect("UPTO_PROXY_ADDRESS"),
            nonce,
            deadline: word_u64(deadline_s),
            to: address("/payTo"),
            facilitator: address("/extra/facilitatorAddress"),
            valid_after: word_u64(valid_after_s),
        };
        let signature = self.sign_digest(&permit.digest(chain));
        json!({
            "signature": format!("0x{}", hex::encode(signature)),
            "permit2Authorization": {
                "from": self.address(),
                "permitted": { "token": checksum(&permit.token), "amount": amount },
                "spender": UPTO_PROXY_ADDRESS,
                "nonce": uint256_decimal(&nonce),
                "deadline": deadline_s.to_string(),
                "witness": {
                    "to": checksum(&permit.to),
                    "facilitator": checksum(&permit.facilitator),
                    "validAfter": valid_after_s.to_string(),
                },
            },
        })
    }

    /// A v2 `upto` `PaymentPayload` for `accepted` (see [`requirements_upto`]): a permit
    /// for at most `accepted.amount`, `validAfter` 0 as the official Python client sends
    /// it.
    pub fn pay_upto(
        &self,
        resource: &Value,
        accepted: &Value,
        deadline_s: u64,
        nonce: [u8; 32],
    ) -> Value {
        json!({
            "x402Version": 2,
            "resource": resource,
            "accepted": accepted,
            "payload": self.permit_upto(accepted, 0, deadline_s, nonce),
        })
    }
}

/// A distinct nonce per `n`, for tests that need many payments.
pub fn nonce(n: u64) -> [u8; 32] {
    keccak(format!("tally x402 test nonce {n}").as_bytes())
}

// ---------------------------------------------------------------------------------------
// Facilitator
// ---------------------------------------------------------------------------------------

/// One request the facilitator received: its path and JSON body (`Null` for a GET or a
/// body that is not JSON).
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub body: Value,
}

/// What identifies an authorization on chain: `(chain id, contract, from, nonce)`. EIP-3009
/// nonces are per token contract and authorizer; Permit2 nonces per owner, in the one
/// Permit2 contract ([`PERMIT2_ADDRESS`]) whatever the token.
type NonceKey = (u64, [u8; 20], [u8; 20], [u8; 32]);

#[derive(Default)]
struct Inner {
    /// The authorizations settled.
    used_nonces: HashSet<NonceKey>,
    settled: Vec<Value>,
    /// The amount of each successful settle, beside `settled`.
    settled_amounts: Vec<String>,
    received: Vec<Received>,
    fail_next_settle: bool,
    status_override: Option<u16>,
    now_s: Option<u64>,
}

struct Shared {
    networks: Vec<String>,
    verify_calls: AtomicUsize,
    settle_calls: AtomicUsize,
    supported_calls: AtomicUsize,
    inner: Mutex<Inner>,
    /// The listening socket while up; taken (closed) by `set_down(true)` so that new
    /// connections are refused at once.
    listener: Mutex<Option<TcpListener>>,
    /// Wakes the accept loop when the listener is taken or put back.
    relisten: Notify,
    /// `true` while down: open connections close when it turns `true`.
    down: watch::Sender<bool>,
}

impl Shared {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("facilitator state lock")
    }
}

/// A mock x402 facilitator on 127.0.0.1, port 0: `POST /verify`, `POST /settle`,
/// `GET /supported`, x402 v2 JSON (v1 payloads accepted too).
///
/// **Down** ([`Facilitator::set_down`]) closes the listening socket and every open
/// connection: new connections are refused (`ECONNREFUSED`), as with a facilitator that is
/// not running; a request in flight sees its connection close. For a facilitator that
/// answers but fails, [`Facilitator::set_status`] makes every endpoint answer a status.
pub struct Facilitator {
    /// `http://127.0.0.1:<port>`, no trailing slash.
    pub url: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Facilitator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Facilitator({})", self.url)
    }
}

impl Drop for Facilitator {
    fn drop(&mut self) {
        self.shared.down.send_replace(true);
        self.task.abort();
    }
}

fn bind_reusable(addr: SocketAddr) -> std::io::Result<TcpListener> {
    // SO_REUSEADDR: the port comes back after `set_down(false)` even with the closed
    // connections of before still in TIME_WAIT.
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Facilitator {
    /// Supports `exact` on [`NETWORK`] (Base Sepolia) and `eip155:8453` (Base), v2 and v1,
    /// and `upto` on both (v2).
    pub async fn start() -> Facilitator {
        Facilitator::start_with_networks(&[NETWORK, "eip155:8453"]).await
    }

    /// Supports `exact` and `upto` on the given CAIP-2 networks only: a payment for another
    /// network is invalid (`invalid_network`), and `/supported` lists just these.
    pub async fn start_with_networks(networks: &[&str]) -> Facilitator {
        let listener =
            bind_reusable("127.0.0.1:0".parse().expect("addr")).expect("facilitator binds");
        let addr = listener.local_addr().expect("facilitator addr");
        let (down, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            networks: networks.iter().map(|n| n.to_string()).collect(),
            verify_calls: AtomicUsize::new(0),
            settle_calls: AtomicUsize::new(0),
            supported_calls: AtomicUsize::new(0),
            inner: Mutex::new(Inner::default()),
            listener: Mutex::new(Some(listener)),
            relisten: Notify::new(),
            down,
        });
        let app = Router::new()
            .route("/verify", post(verify))
            .route("/settle", post(settle))
            .route("/supported", get(supported))
            .layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                record_and_override,
            ))
            .with_state(shared.clone());
        let task = tokio::spawn(accept_loop(shared.clone(), app));
        Facilitator {
            url: format!("http://{addr}"),
            addr,
            shared,
            task,
        }
    }

    /// Down: refuse new connections and close open ones. Up again: listen on the same port.
    /// Both take effect before this returns.
    pub fn set_down(&self, down: bool) {
        let mut slot = self.shared.listener.lock().expect("listener lock");
        if down {
            self.shared.down.send_replace(true);
            // Dropping the listener closes the socket now; the accept loop holds no clone.
            slot.take();
            self.shared.relisten.notify_one();
        } else if slot.is_none() {
            *slot = Some(bind_reusable(self.addr).expect("facilitator binds its port again"));
            self.shared.down.send_replace(false);
            self.shared.relisten.notify_one();
        }
    }

    /// `Some(status)`: every endpoint answers `status` with a JSON error body (the request
    /// is still counted and recorded). `None`: normal answers.
    pub fn set_status(&self, status: Option<u16>) {
        self.shared.inner().status_override = status;
    }

    /// The next `/settle` answers `success: false` with [`reason::TRANSACTION_FAILED`]
    /// (`upto`: [`reason::UPTO_TRANSACTION_FAILED`]), after checking the payment; the
    /// nonce stays unused, as with a reverted transaction, so a retry of the same payment
    /// can settle. A settle that fails its checks leaves it armed.
    pub fn fail_next_settle(&self) {
        self.shared.inner().fail_next_settle = true;
    }

    /// Pins the facilitator's clock (Unix seconds); `None` goes back to the real clock.
    pub fn set_now_s(&self, now_s: Option<u64>) {
        self.shared.inner().now_s = now_s;
    }

    pub fn verify_calls(&self) -> usize {
        self.shared.verify_calls.load(Ordering::SeqCst)
    }

    pub fn settle_calls(&self) -> usize {
        self.shared.settle_calls.load(Ordering::SeqCst)
    }

    pub fn supported_calls(&self) -> usize {
        self.shared.supported_calls.load(Ordering::SeqCst)
    }

    /// The `paymentPayload` of each successful settle, in order.
    pub fn settled(&self) -> Vec<Value> {
        self.shared.inner().settled.clone()
    }

    /// The amount each successful settle transferred, in order (beside [`Self::settled`]):
    /// `exact`'s authorized value, or the amount an `upto` settle was asked for ("0" for a
    /// settle with no transaction).
    pub fn settled_amounts(&self) -> Vec<String> {
        self.shared.inner().settled_amounts.clone()
    }

    /// Every request received, in order (what the server under test sent).
    pub fn received(&self) -> Vec<Received> {
        self.shared.inner().received.clone()
    }
}

async fn accept_loop(shared: Arc<Shared>, app: Router) {
    loop {
        // `set_down` notifies both ways: dropping a listener does not wake its waiter.
        let notified = shared.relisten.notified();
        let accept = poll_fn(|cx| {
            let slot = shared.listener.lock().expect("listener lock");
            match slot.as_ref() {
                Some(listener) => listener.poll_accept(cx),
                None => std::task::Poll::Pending,
            }
        });
        let stream = tokio::select! {
            accepted = accept => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = notified => continue,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut down = shared.down.subscribe();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                biased;
                // Going down drops the connection: its socket closes mid-request.
                _ = down.wait_for(|down| *down) => {}
                _ = conn => {}
            }
        });
    }
}

async fn record_and_override(
    State(shared): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    match path.as_str() {
        "/verify" => shared.verify_calls.fetch_add(1, Ordering::SeqCst),
        "/settle" => shared.settle_calls.fetch_add(1, Ordering::SeqCst),
        "/supported" => shared.supported_calls.fetch_add(1, Ordering::SeqCst),
        _ => 0,
    };
    let status_override = {
        let mut inner = shared.inner();
        inner.received.push(Received {
            path,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        });
        inner.status_override
    };
    if let Some(status) = status_override {
        let status = StatusCode::from_u16(status).expect("a valid status");
        return (status, Json(json!({ "error": "mock facilitator failing" }))).into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

async fn supported(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let mut kinds = Vec::new();
    for network in &shared.networks {
        kinds.push(json!({ "x402Version": 2, "scheme": "exact", "network": network }));
    }
    // What the reference's `UptoEvmScheme.get_extra` adds: the address that will settle,
    // which the client signs into the witness.
    for network in &shared.networks {
        kinds.push(json!({
            "x402Version": 2,
            "scheme": "upto",
            "network": network,
            "extra": { "facilitatorAddress": FACILITATOR_SIGNER },
        }));
    }
    // v1 kinds carry the v1 network names, as the reference facilitator lists them.
    for (name, caip) in [("base-sepolia", NETWORK), ("base", "eip155:8453")] {
        if shared.networks.iter().any(|n| n == caip) {
            kinds.push(json!({ "x402Version": 1, "scheme": "exact", "network": name }));
        }
    }
    Json(json!({
        "kinds": kinds,
        "extensions": [],
        "signers": { "eip155:*": [FACILITATOR_SIGNER] },
    }))
}

/// The address the mock claims to settle from (any fixed address: nothing is sent), and
/// the `facilitatorAddress` an `upto` witness must name.
pub const FACILITATOR_SIGNER: &str = "0x00000000000000000000000000000000000fac11";

/// A checked payment: who pays, and what to record when it settles.
struct Checked {
    payer: String,
    nonce_key: NonceKey,
    value: String,
}

/// The request's `(paymentPayload, paymentRequirements, network)`; `network` from the
/// requirements, for the answer's `network` field.
fn parts(body: &Value) -> (Value, Value, String) {
    let payload = body["paymentPayload"].clone();
    let requirements = body["paymentRequirements"].clone();
    let network = requirements["network"].as_str().unwrap_or("").to_owned();
    (payload, requirements, network)
}

/// The payer named by the payload, for answers about invalid payments (the reference
/// reports it whenever the payload parses).
fn claimed_payer(payload: &Value) -> Value {
    let exact = &payload["payload"]["authorization"]["from"];
    let upto = &payload["payload"]["permit2Authorization"]["from"];
    if exact.is_null() { upto } else { exact }.clone()
}

/// Whether the facilitator's `upto` scheme takes the request: the reference picks a
/// scheme by the payload's `accepted.scheme` (v2 only: v1 had no `upto`).
fn is_upto(body: &Value) -> bool {
    let payload = &body["paymentPayload"];
    payload["x402Version"] == 2 && payload["accepted"]["scheme"] == "upto"
}

/// The request's versions checked: `(version, paymentPayload, paymentRequirements,
/// accepted)`, `accepted` being the chosen requirements (v2's `accepted`; v1 puts scheme
/// and network at the top of the payload).
fn envelope(body: &Value) -> Result<(u64, Value, Value, Value), &'static str> {
    let version = body["x402Version"]
        .as_u64()
        .ok_or(reason::INVALID_PAYLOAD)?;
    let (payload, requirements, _) = parts(body);
    if !payload.is_object() || !requirements.is_object() {
        return Err(reason::INVALID_PAYLOAD);
    }
    let payload_version = payload["x402Version"]
        .as_u64()
        .ok_or(reason::INVALID_PAYLOAD)?;
    if !(version == 1 || version == 2) || payload_version != version {
        return Err(reason::INVALID_X402_VERSION);
    }
    let accepted = if version == 2 {
        payload["accepted"].clone()
    } else {
        payload.clone()
    };
    Ok((version, payload, requirements, accepted))
}

/// The chain id of the requirements' network, if this facilitator serves it.
fn served_chain(shared: &Shared, requirements: &Value) -> Result<u64, &'static str> {
    let network = requirements["network"]
        .as_str()
        .ok_or(reason::INVALID_PAYLOAD)?;
    let chain = chain_id(network).ok_or(reason::INVALID_NETWORK)?;
    if !shared
        .networks
        .iter()
        .any(|n| chain_id(n) == Some(chain) && n.starts_with("eip155:"))
    {
        return Err(reason::INVALID_NETWORK);
    }
    Ok(chain)
}

/// Checks an `exact` EVM payment as the reference facilitator does, in its order, minus
/// the chain (balance, simulation); the nonce is checked against this mock's settles.
fn check(
    shared: &Shared,
    inner: &Inner,
    body: &Value,
    now_s: u64,
) -> Result<Checked, &'static str> {
    let (version, payload, requirements, accepted) = envelope(body)?;
    if accepted["scheme"] != "exact" || requirements["scheme"] != "exact" {
        return Err(reason::UNSUPPORTED_SCHEME);
    }
    if accepted["network"] != requirements["network"] {
        return Err(reason::NETWORK_MISMATCH);
    }
    let chain = served_chain(shared, &requirements)?;
    let asset = requirements["asset"]
        .as_str()
        .and_then(parse_address)
        .ok_or(reason::INVALID_PAYLOAD)?;
    if version == 2 {
        let accepted_asset = accepted["asset"].as_str().and_then(parse_address);
        if accepted_asset != Some(asset) {
            return Err(reason::ASSET_MISMATCH);
        }
    }
    let domain = Domain::of(&requirements)?;
    let scheme_payload = &payload["payload"];
    let auth = Authorization::from_json(&scheme_payload["authorization"])
        .ok_or(reason::INVALID_PAYLOAD)?;
    let pay_to = requirements["payTo"]
        .as_str()
        .and_then(parse_address)
        .ok_or(reason::INVALID_PAYLOAD)?;
    if auth.to != pay_to {
        return Err(reason::RECIPIENT_MISMATCH);
    }
    let amount_field = if version == 2 {
        "amount"
    } else {
        "maxAmountRequired"
    };
    let amount = requirements[amount_field]
        .as_str()
        .and_then(parse_uint256)
        .ok_or(reason::INVALID_PAYLOAD)?;
    if auth.value != amount {
        return Err(reason::VALUE_MISMATCH);
    }
    // Past u64 seconds is "never expires" / "never valid yet".
    let valid_before = word_to_u64(&auth.valid_before).unwrap_or(u64::MAX);
    if valid_before < now_s.saturating_add(VALID_BEFORE_MARGIN_S) {
        return Err(reason::VALID_BEFORE);
    }
    let valid_after = word_to_u64(&auth.valid_after).unwrap_or(u64::MAX);
    if valid_after > now_s {
        return Err(reason::VALID_AFTER);
    }
    let signature = scheme_payload["signature"]
        .as_str()
        .and_then(strip_0x)
        .and_then(|h| hex::decode(h).ok())
        .ok_or(reason::INVALID_SIGNATURE)?;
    if recover(&auth.digest(&domain), &signature) != Some(auth.from) {
        return Err(reason::INVALID_SIGNATURE);
    }
    let nonce_key = (chain, asset, auth.from, auth.nonce);
    if inner.used_nonces.contains(&nonce_key) {
        return Err(reason::NONCE_ALREADY_USED);
    }
    Ok(Checked {
        payer: checksum(&auth.from),
        nonce_key,
        value: scheme_payload["authorization"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    })
}

/// A checked `upto` permit: who pays, its nonce, and the most it lets be transferred.
struct CheckedUpto {
    payer: String,
    nonce_key: NonceKey,
    permitted: [u8; 32],
}

/// Checks an `upto` payment as the reference's `verify_upto_permit2` does, in its order,
/// minus the chain (allowance, balance, simulation) and the nonce (left to the callers,
/// since verify and settle name a spent one differently). At settle the requirements'
/// amount is what to charge, not the maximum: the reference re-verifies with the
/// permit's own `permitted.amount` in its place, so `at_settle` skips the amount check.
fn check_upto(
    shared: &Shared,
    body: &Value,
    now_s: u64,
    at_settle: bool,
) -> Result<CheckedUpto, &'static str> {
    let (_, payload, requirements, accepted) = envelope(body)?;
    let auth = &payload["payload"]["permit2Authorization"];
    let is_upto_permit = auth["witness"]
        .as_object()
        .is_some_and(|w| w.contains_key("facilitator"));
    if !is_upto_permit {
        return Err(reason::UNSUPPORTED_PAYLOAD_TYPE);
    }
    if accepted["scheme"] != "upto" || requirements["scheme"] != "upto" {
        return Err(reason::UPTO_INVALID_SCHEME);
    }
    if accepted["network"] != requirements["network"] {
        return Err(reason::UPTO_NETWORK_MISMATCH);
    }
    let chain = served_chain(shared, &requirements)?;
    let asset = requirements["asset"]
        .as_str()
        .and_then(parse_address)
        .ok_or(reason::INVALID_PAYLOAD)?;
    let address = |v: &Value| v.as_str().and_then(parse_address);
    if address(&auth["spender"]) != parse_address(UPTO_PROXY_ADDRESS) {
        return Err(reason::PERMIT2_INVALID_SPENDER);
    }
    let to = address(&auth["witness"]["to"]);
    if to.is_none() || to != address(&requirements["payTo"]) {
        return Err(reason::PERMIT2_RECIPIENT_MISMATCH);
    }
    if address(&auth["witness"]["facilitator"]) != parse_address(FACILITATOR_SIGNER) {
        return Err(reason::UPTO_FACILITATOR_MISMATCH);
    }
    let uint = |v: &Value| {
        v.as_str()
            .and_then(parse_uint256)
            .ok_or(reason::PERMIT2_PAYLOAD_FORMAT)
    };
    let deadline = uint(&auth["deadline"])?;
    let valid_after = uint(&auth["witness"]["validAfter"])?;
    let permitted = uint(&auth["permitted"]["amount"])?;
    let required = if at_settle {
        permitted
    } else {
        uint(&requirements["amount"])?
    };
    // Past u64 seconds is "never expires" / "never valid yet".
    if word_to_u64(&deadline).unwrap_or(u64::MAX) < now_s.saturating_add(VALID_BEFORE_MARGIN_S) {
        return Err(reason::PERMIT2_DEADLINE_EXPIRED);
    }
    if word_to_u64(&valid_after).unwrap_or(u64::MAX) > now_s {
        return Err(reason::PERMIT2_NOT_YET_VALID);
    }
    if permitted != required {
        return Err(reason::PERMIT2_AMOUNT_MISMATCH);
    }
    if address(&auth["permitted"]["token"]) != Some(asset) {
        return Err(reason::PERMIT2_TOKEN_MISMATCH);
    }
    // What is left to parse (from, nonce) is only used to rebuild the signed message: the
    // reference fails that as a bad signature.
    let permit = UptoPermit::from_json(auth).ok_or(reason::PERMIT2_INVALID_SIGNATURE)?;
    let signature = payload["payload"]["signature"]
        .as_str()
        .and_then(strip_0x)
        .and_then(|h| hex::decode(h).ok())
        .ok_or(reason::PERMIT2_INVALID_SIGNATURE)?;
    if recover(&permit.digest(chain), &signature) != Some(permit.from) {
        return Err(reason::PERMIT2_INVALID_SIGNATURE);
    }
    let permit2 = parse_address(PERMIT2_ADDRESS).expect("PERMIT2_ADDRESS is an address");
    Ok(CheckedUpto {
        payer: checksum(&permit.from),
        nonce_key: (chain, permit2, permit.from, permit.nonce),
        permitted,
    })
}

/// `/verify` of an `upto` payment: its payer, or why not.
fn verify_upto(
    shared: &Shared,
    inner: &Inner,
    body: &Value,
    now_s: u64,
) -> Result<String, &'static str> {
    let checked = check_upto(shared, body, now_s, false)?;
    if inner.used_nonces.contains(&checked.nonce_key) {
        return Err(reason::UPTO_TRANSACTION_FAILED);
    }
    Ok(checked.payer)
}

/// `/settle` of an `upto` payment, in the reference's order: the amount to charge parses,
/// the permit checks, more than it allows is refused; then the transaction, which a spent
/// nonce or [`Facilitator::fail_next_settle`] fails. 0 sends no transaction, so it spends
/// nothing, and the reference lets it pass even with the nonce spent.
fn settle_upto(shared: &Shared, inner: &mut Inner, body: &Value, now_s: u64) -> Value {
    let (payload, requirements, network) = parts(body);
    let failure = |why: &str| {
        without_null_payer(json!({
            "success": false,
            "errorReason": why,
            "payer": claimed_payer(&payload),
            "transaction": "",
            "network": network,
        }))
    };
    let Some(amount) = requirements["amount"].as_str().and_then(parse_uint256) else {
        return failure(reason::PERMIT2_PAYLOAD_FORMAT);
    };
    let checked = match check_upto(shared, body, now_s, true) {
        Ok(checked) => checked,
        Err(why) => return failure(why),
    };
    if amount > checked.permitted {
        return failure(reason::UPTO_SETTLEMENT_EXCEEDS_AMOUNT);
    }
    let zero = amount == [0u8; 32];
    if !zero && inner.used_nonces.contains(&checked.nonce_key) {
        return failure(reason::PERMIT2_INVALID_NONCE);
    }
    if std::mem::take(&mut inner.fail_next_settle) {
        return failure(reason::UPTO_TRANSACTION_FAILED);
    }
    let transaction = if zero {
        String::new()
    } else {
        inner.used_nonces.insert(checked.nonce_key);
        transaction_hash(&checked.nonce_key)
    };
    inner.settled.push(payload.clone());
    inner.settled_amounts.push(uint256_decimal(&amount));
    json!({
        "success": true,
        "payer": checked.payer,
        "transaction": transaction,
        "network": network,
        "amount": uint256_decimal(&amount),
    })
}

/// A stand-in transaction hash, fixed per authorization: keccak of its nonce key.
fn transaction_hash(nonce_key: &NonceKey) -> String {
    let (chain, contract, from, nonce) = nonce_key;
    let mut key = chain.to_be_bytes().to_vec();
    key.extend_from_slice(contract);
    key.extend_from_slice(from);
    key.extend_from_slice(nonce);
    format!("0x{}", hex::encode(keccak(&key)))
}

/// `payer` is optional: left out when the payload names none.
fn without_null_payer(mut answer: Value) -> Value {
    if answer["payer"].is_null() {
        answer.as_object_mut().expect("an object").remove("payer");
    }
    answer
}

fn now_of(inner: &Inner) -> u64 {
    inner.now_s.unwrap_or_else(now_s)
}

async fn verify(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Json<Value> {
    let inner = shared.inner();
    let now = now_of(&inner);
    let checked = if is_upto(&body) {
        verify_upto(&shared, &inner, &body, now)
    } else {
        check(&shared, &inner, &body, now).map(|ok| ok.payer)
    };
    Json(match checked {
        Ok(payer) => json!({ "isValid": true, "payer": payer }),
        Err(why) => without_null_payer(json!({
            "isValid": false,
            "invalidReason": why,
            "payer": claimed_payer(&body["paymentPayload"]),
        })),
    })
}

async fn settle(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Json<Value> {
    let (payload, _, network) = parts(&body);
    // One lock from check to record: two concurrent settles of one payment cannot both pass.
    let mut inner = shared.inner();
    let now = now_of(&inner);
    if is_upto(&body) {
        return Json(settle_upto(&shared, &mut inner, &body, now));
    }
    let failure = |why: &str| {
        without_null_payer(json!({
            "success": false,
            "errorReason": why,
            "payer": claimed_payer(&payload),
            "transaction": "",
            "network": network,
        }))
    };
    let checked = match check(&shared, &inner, &body, now) {
        Ok(checked) => checked,
        Err(why) => return Json(failure(why)),
    };
    if std::mem::take(&mut inner.fail_next_settle) {
        return Json(failure(reason::TRANSACTION_FAILED));
    }
    inner.used_nonces.insert(checked.nonce_key);
    inner.settled.push(payload.clone());
    inner.settled_amounts.push(checked.value.clone());
    Json(json!({
        "success": true,
        "payer": checked.payer,
        "transaction": transaction_hash(&checked.nonce_key),
        "network": network,
        "amount": checked.value,
    }))
}

// ---------------------------------------------------------------------------------------
// The official x402 Python client (scripts/x402-client.py)
// ---------------------------------------------------------------------------------------

/// The python of the venv made by scripts/x402-client-setup.sh: `X402_CLIENT_PYTHON`, else
/// the script's default venv. `None` (the test skips) when absent, unless
/// `X402_CLIENT_REQUIRED=1`, where its absence fails the test.
pub fn client_python() -> Option<String> {
    let python = std::env::var("X402_CLIENT_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/tally-x402-venv/bin/python")
    });
    if std::path::Path::new(&python).exists() {
        return Some(python);
    }
    assert!(
        std::env::var("X402_CLIENT_REQUIRED").as_deref() != Ok("1"),
        "X402_CLIENT_REQUIRED=1 but no x402 client at {python}: run scripts/x402-client-setup.sh"
    );
    eprintln!("skipped: no x402 client at {python} (scripts/x402-client-setup.sh installs it)");
    None
}

/// Runs scripts/x402-client.py; its stdout's JSON lines merged into one object, and its
/// exit code.
pub async fn run_client(python: &str, key: &str, args: &[&str]) -> (Value, i32) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/x402-client.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .args(args)
        .env("X402_PRIVATE_KEY", key)
        .output()
        .await
        .expect("runs the client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut merged = serde_json::Map::new();
    for line in stdout.lines() {
        let obj: Value = serde_json::from_str(line).expect("a JSON line");
        merged.extend(obj.as_object().expect("an object").clone());
    }
    eprintln!("client {args:?}: {stdout}{stderr}");
    (Value::Object(merged), out.status.code().unwrap_or(-1))
}
