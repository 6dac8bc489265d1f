//! The schema's guarantees, checked in SQL as Supabase's roles: RLS lets a user read only their
//! own rows, and only the service role may call the write functions.

use testkit::db::TestDb;
use tokio_postgres::Client;

/// The `user_id`s of `table` that `user`, signed in, can read.
async fn owners_seen_by(client: &mut Client, user: &str, table: &str) -> Vec<String> {
    let sql = format!("select user_id::text from {table}");
    let rows = as_role(client, "authenticated", Some(user), &sql)
        .await
        .unwrap();
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

async fn as_role(
    client: &mut Client,
    role: &str,
    sub: Option<&str>,
    sql: &str,
) -> Result<Vec<tokio_postgres::Row>, String> {
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&format!("set local role {role}"))
        .await
        .unwrap();
    if let Some(sub) = sub {
        let claims = serde_json::json!({"sub": sub, "role": role}).to_string();
        tx.execute(
            "select set_config('request.jwt.claims', $1, true)",
            &[&claims],
        )
        .await
        .unwrap();
    }
    let result = tx.query(sql, &[]).await.map_err(|e| {
        e.as_db_error()
            .map(|d| d.code().code().to_owned())
            .unwrap_or_default()
    });
    let _ = tx.rollback().await;
    result
}

#[tokio::test]
async fn users_read_only_their_own_rows() {
    let db = TestDb::new().await;
    let mut sql = db.client().await;
    let alice = db.create_user(&sql).await.to_string();
    let bob = db.create_user(&sql).await.to_string();
    for user in [&alice, &bob] {
        sql.execute(
            "insert into orders (user_id) values ($1::text::uuid)",
            &[user],
        )
        .await
        .unwrap();
        sql.execute(
            "insert into entitlements (user_id, product, active, source) values ($1::text::uuid, 'full_report', true, 'x')",
            &[user],
        )
        .await
        .unwrap();
    }

    assert_eq!(
        owners_seen_by(&mut sql, &alice, "orders").await,
        vec![alice.clone()]
    );
    assert_eq!(
        owners_seen_by(&mut sql, &bob, "entitlements").await,
        vec![bob.clone()]
    );
    let anon = as_role(&mut sql, "anon", None, "select * from orders").await;
    assert_eq!(
        anon.err().as_deref(),
        Some("42501"),
        "anon has no access at all"
    );
}

#[tokio::test]
async fn users_cannot_write_or_see_stripe_events() {
    let db = TestDb::new().await;
    let mut sql = db.client().await;
    let alice = db.create_user(&sql).await.to_string();
    let insert = format!("insert into orders (user_id, status) values ('{alice}', 'paid')");
    assert_eq!(
        as_role(&mut sql, "authenticated", Some(&alice), &insert)
            .await
            .err()
            .as_deref(),
        Some("42501")
    );
    let update = "update orders set status = 'paid'";
    assert_eq!(
        as_role(&mut sql, "authenticated", Some(&alice), update)
            .await
            .err()
            .as_deref(),
        Some("42501")
    );
    assert_eq!(
        as_role(
            &mut sql,
            "authenticated",
            Some(&alice),
            "select * from stripe_events"
        )
        .await
        .err()
        .as_deref(),
        Some("42501")
    );
}

#[tokio::test]
async fn only_the_service_role_may_record_stripe_facts() {
    let db = TestDb::new().await;
    let mut sql = db.client().await;
    let call = "select public.record_stripe_facts('{\"id\":\"evt_x\",\"type\":\"x\",\"created\":1}', '{}', null, '[]')";
    for role in ["anon", "authenticated"] {
        assert_eq!(
            as_role(&mut sql, role, None, call).await.err().as_deref(),
            Some("42501"),
            "{role}"
        );
    }
    let rows = as_role(&mut sql, "service_role", None, call)
        .await
        .expect("service role may call");
    assert_eq!(rows[0].get::<_, serde_json::Value>(0)["outcome"], "ignored");
}

#[tokio::test]
async fn migrations_leave_rls_enabled_on_every_public_table() {
    let db = TestDb::new().await;
    let sql = db.client().await;
    let rows = sql
        .query(
            "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
             where n.nspname = 'public' and c.relkind = 'r' and not c.relrowsecurity",
            &[],
        )
        .await
        .unwrap();
    let unprotected: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert!(
        unprotected.is_empty(),
        "tables without RLS: {unprotected:?}"
    );
}

#[tokio::test]
async fn one_open_order_per_user_and_product() {
    let db = TestDb::new().await;
    let sql = db.client().await;
    let user = db.create_user(&sql).await.to_string();
    sql.execute(
        "insert into orders (user_id) values ($1::text::uuid)",
        &[&user],
    )
    .await
    .unwrap();
    let second = sql
        .execute(
            "insert into orders (user_id) values ($1::text::uuid)",
            &[&user],
        )
        .await;
    assert_eq!(second.unwrap_err().code().map(|c| c.code()), Some("23505"));
    sql.execute("update orders set closed_reason = 'expired'", &[])
        .await
        .unwrap();
    sql.execute(
        "insert into orders (user_id) values ($1::text::uuid)",
        &[&user],
    )
    .await
    .expect("a new order after expiry");
}
