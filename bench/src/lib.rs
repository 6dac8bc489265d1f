//! Benchmark harnesses (see README, Benchmarks).
