//! Benchmark harnesses (see README, Benchmarks).

pub mod tls;
