//! Integration tests: the handlers driven with real function-URL events against a real
//! PostgreSQL (a fresh database per test) and HTTP-level fakes. One binary, one link.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod anonymous_checkout;
mod auth;
mod chat;
mod chat_attacks;
mod chat_ceilings;
mod chat_fallback;
mod chat_limits;
mod chat_ui;
mod checkout;
mod dashboard;
mod db_tls;
mod decisions;
mod docs;
mod facts_races;
mod faults;
mod hostile;
mod https_ca;
mod payments;
mod payments_model;
mod pooler;
mod postgrest_contract;
mod reconcile;
mod schema;
mod schema_files;
mod secrets;
mod storm;
mod stripe_truth;
mod webhook;
