//! tally-server: the HTTP face of tally. axum routes under `/v1`, bearer-token auth,
//! problem+json errors, limits at the edge, Prometheus metrics and the OpenAPI document.
//!
//! Data flows one way: request → extractor (validated DTO) → `Command` → engine →
//! [`respond::classify`] (one `match` from outcome to status) → response.

#![forbid(unsafe_code)]

pub mod agent_keys;
pub mod app;
pub mod auth;
pub mod authorize;
pub mod batch;
pub mod config;
pub mod dto;
pub mod export;
pub mod extract;
pub mod metrics;
pub mod noop;
pub mod openapi;
pub mod outbox;
pub mod payments;
pub mod problem;
pub mod proxy;
pub mod respond;
pub mod routes;
pub mod serve;
pub mod topup;
pub mod webhooks;
pub mod x402;

pub use app::{router, start, AppState, Running};
pub use config::{Config, ConfigError, Limits};
