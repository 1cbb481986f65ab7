//! Fuzzes the server's JSON body extractor (`tally_server::extract::ApiJson`, which checks
//! the content type, the nesting depth and the shape) with arbitrary bytes as the body of
//! the credit, debit and hold DTOs: never panics, and the answer is a valid DTO or a
//! 4xx problem that renders to a response.
#![no_main]

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::response::IntoResponse;
use libfuzzer_sys::fuzz_target;
use tally_core::Metadata;
use tally_server::dto::{CreditBody, DebitBody, HoldBody};
use tally_server::extract::ApiJson;
use tally_server::metrics::Metrics;
use tally_server::{AppState, Config};
use tally_store::ManualClock;

/// Content types the first input byte chooses from: three the server accepts, then
/// ones it must refuse with 415 (or 400 for a duplicate header).
const CONTENT_TYPES: [&[&str]; 6] = [
    &["application/json"],
    &["application/json; charset=utf-8"],
    &["application/merge-patch+json"],
    &["text/plain"],
    &[],
    &["application/json", "application/json"],
];

/// Polls a future that needs no I/O (the body is already in memory) to completion.
fn finish<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..64 {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("extracting an in-memory body did not finish");
}

fn request(content_types: &[&str], body: &[u8]) -> Request {
    let mut b = Request::builder().method("POST").uri("/v1/agents/a/debits");
    for ct in content_types {
        b = b.header("content-type", *ct);
    }
    b.body(Body::from(body.to_vec())).expect("a valid request")
}

fn check<T>(st: &AppState, content_types: &[&str], body: &[u8]) -> Option<T>
where
    ApiJson<T>: FromRequest<AppState, Rejection = tally_server::problem::Problem>,
{
    match finish(ApiJson::<T>::from_request(request(content_types, body), st)) {
        Ok(ApiJson(dto)) => Some(dto),
        Err(problem) => {
            assert!(
                problem.status.is_client_error(),
                "bad input answered {}: {}",
                problem.status,
                problem.detail
            );
            let status = problem.status;
            assert_eq!(problem.into_response().status(), status);
            None
        }
    }
}

fn metadata_is_valid(m: &Metadata) {
    assert!(Metadata::new(m.entries().clone()).is_ok(), "invalid metadata accepted");
}

thread_local! {
    static STATE: AppState = AppState::new(
        &Config::default(),
        Arc::new(ManualClock::new(1_769_472_000_000)),
        Metrics::new().expect("metrics register"),
        "http://127.0.0.1:8402".into(),
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_types = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    STATE.with(|st| {
        if let Some(b) = check::<CreditBody>(st, content_types, body) {
            metadata_is_valid(&b.metadata);
        }
        if let Some(b) = check::<DebitBody>(st, content_types, body) {
            metadata_is_valid(&b.metadata);
        }
        if let Some(b) = check::<HoldBody>(st, content_types, body) {
            metadata_is_valid(&b.metadata);
        }
    });
});
