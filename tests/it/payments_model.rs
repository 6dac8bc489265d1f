//! The model-based concurrency test of the money paths (docs/payments.md): generated sequences
//! of clicks, payments, refunds, disputes, subscriptions and deliveries (late, twice,
//! concurrent, in the same second, lost for good), stored Stripe failures, reconciler runs,
//! leases and orders ageing, the database cut off, run against the real SQL functions, both
//! handlers, the reconciler and the fake Stripe. After every step the stored decisions must be
//! the decisions over the stored facts; at the end (every event delivered, or one reconciler
//! run) the database must say what Stripe's objects say, every decision the reference model's
//! (`testkit::money_reference`). On failure: the seed, the shrunk sequence and what happened.
//!
//! `PAYMENTS_MODEL_CASES` (default 64) and `PAYMENTS_MODEL_SEED` (hex, to replay a failure).

use std::cell::RefCell;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use testkit::money::{Setup, World};
use testkit::money_model::{install_hold, Op, Run};

fn op() -> impl Strategy<Value = Op> {
    let user = 0u8..2;
    prop_oneof![
        6 => (user.clone(), 1u8..=4).prop_map(|(user, n)| Op::Clicks { user, n }),
        1 => user.clone().prop_map(|user| Op::Poll { user }),
        4 => user.clone().prop_map(|user| Op::Pay { user }),
        2 => user.clone().prop_map(|user| Op::PayOldTab { user }),
        1 => user.clone().prop_map(|user| Op::PayAsync { user }),
        1 => (user.clone(), any::<bool>()).prop_map(|(user, succeeded)| Op::SettleAsync { user, succeeded }),
        2 => user.clone().prop_map(|user| Op::StripeExpires { user }),
        2 => (user.clone(), any::<bool>()).prop_map(|(user, our_price)| Op::PaymentLink { user, our_price }),
        2 => (user.clone(), any::<bool>()).prop_map(|(user, full)| Op::Refund { user, full }),
        1 => user.clone().prop_map(|user| Op::Dispute { user }),
        1 => (user.clone(), any::<bool>()).prop_map(|(user, won)| Op::CloseDispute { user, won }),
        1 => user.clone().prop_map(|user| Op::Inquiry { user }),
        1 => user.clone().prop_map(|user| Op::Escalate { user }),
        1 => user.clone().prop_map(|user| Op::FailRefund { user }),
        1 => (user.clone(), any::<bool>()).prop_map(|(user, cancel)| Op::Subscribe { user, cancel }),
        1 => any::<bool>().prop_map(|refund| Op::StoredFailure { refund }),
        1 => any::<u8>().prop_map(|pick| Op::LoseEvent { pick }),
        1 => Just(Op::Reconcile),
        6 => (any::<u8>(), any::<bool>()).prop_map(|(pick, twice)| Op::Deliver { pick, twice }),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::DeliverPair { a, b }),
        2 => any::<bool>().prop_map(|reversed| Op::DeliverAll { reversed }),
        1 => any::<bool>().prop_map(|on| Op::SameSecond { on }),
        1 => Just(Op::ExpireLeases),
        1 => (1u8..=120).prop_map(|minutes| Op::AgeOrders { minutes }),
        1 => user.clone().prop_map(|user| Op::CrashMidCreate { user }),
        2 => user.clone().prop_map(|user| Op::ClickDuringPayment { user }),
        2 => user.clone().prop_map(|user| Op::ClickRacesPayment { user }),
        1 => (user, any::<u8>()).prop_map(|(user, pick)| Op::DatabaseCut { user, pick }),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop_oneof![Just(1860u32), Just(7200), Just(86_400)],
        any::<bool>(),
        prop::bool::weighted(0.3),
    )
        .prop_map(
            |(session_ttl_s, open_disputes_end_won, finish_by_reconciler)| Setup {
                instances: 3,
                session_ttl_s,
                auto_refund: true,
                open_disputes_end_won,
                finish_by_reconciler,
            },
        )
}

#[test]
fn money_invariants_hold_under_generated_interleavings() {
    let cases: u32 = std::env::var("PAYMENTS_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let seed: [u8; 32] = match std::env::var("PAYMENTS_MODEL_SEED") {
        Ok(hex_seed) => hex::decode(hex_seed.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .expect("PAYMENTS_MODEL_SEED: 64 hex digits"),
        Err(_) => *uuid::Uuid::new_v4()
            .as_bytes()
            .repeat(2)
            .first_chunk()
            .expect("32 bytes"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let world = runtime.block_on(async {
        let world = World::new(Setup {
            instances: 3,
            ..Setup::default()
        })
        .await;
        install_hold(&world).await;
        world
    });
    // Short waits for a lease a crashed instance holds: the answer is a clear 503 either way.
    let world = RefCell::new(world);
    for state in &mut world.borrow_mut().checkouts {
        state.config.max_wait = std::time::Duration::from_millis(300);
    }
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 400,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let strategy = (setup(), prop::collection::vec(op(), 1..28));
    let result = runner.run(&strategy, |(setup, ops)| {
        let mut world = world.borrow_mut();
        runtime.block_on(async {
            world.reset(setup).await;
            let mut run = Run::new(&world, setup).await;
            for op in &ops {
                let stepped = run.step(op).await;
                if let Err(e) = stepped.and(run.check().await) {
                    return Err(TestCaseError::fail(format!(
                        "{e}\n--- what happened\n{}",
                        run.log
                    )));
                }
            }
            run.finish()
                .await
                .map_err(|e| TestCaseError::fail(format!("{e}\n--- what happened\n{}", run.log)))
        })
    });
    if let Err(error) = result {
        panic!(
            "{error}\n\nreplay with PAYMENTS_MODEL_SEED={} PAYMENTS_MODEL_CASES={cases}",
            hex::encode(seed)
        );
    }
}
