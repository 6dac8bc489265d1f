//! Fresh databases for tests: `supabase/bootstrap.sql` and every migration are applied once to a
//! template database named after their content hash; each test gets a copy (`CREATE DATABASE ...
//! TEMPLATE`), dropped again when the test ends.

use sha2::{Digest, Sha256};
use tokio_postgres::{Client, NoTls};

/// The server tests use: `TEST_DATABASE_URL`, default the local PostgreSQL as `postgres`.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".into())
}

/// The local transaction-mode pooler in front of that server (`scripts/ensure-pgbouncer`):
/// `TEST_POOLER_URL`, default PgBouncer on 127.0.0.1:6432.
pub fn pooler_admin_url() -> String {
    std::env::var("TEST_POOLER_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:6432/postgres?sslmode=disable".into())
}

/// `url` with its database name replaced by `database`.
pub fn url_for(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let prefix = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{prefix}/{database}?{q}"),
        None => format!("{prefix}/{database}"),
    }
}

/// Connects to `url` without TLS and drives the connection in the background.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL ({e}); is it running?"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// `bootstrap.sql` then every migration, in filename order.
pub fn schema_files() -> Vec<(String, String)> {
    let root = crate::workspace_root().join("supabase");
    let mut files = vec![(
        "bootstrap.sql".to_owned(),
        std::fs::read_to_string(root.join("bootstrap.sql")).expect("supabase/bootstrap.sql"),
    )];
    let mut migrations: Vec<_> = std::fs::read_dir(root.join("migrations"))
        .expect("supabase/migrations")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    migrations.sort();
    for path in migrations {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        files.push((name, std::fs::read_to_string(&path).expect("migration")));
    }
    files
}

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Creates a fresh database with every migration applied.
    pub async fn new() -> TestDb {
        let admin = admin_url();
        let template = ensure_template(&admin).await;
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let client = connect(&admin).await;
        client
            .batch_execute(&format!("create database {name} template {template}"))
            .await
            .expect("create test database");
        TestDb {
            url: url_for(&admin, &name),
            name,
        }
    }

    /// Creates an empty database (nothing applied), dropped when the value is.
    pub async fn empty() -> TestDb {
        let admin = admin_url();
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        connect(&admin)
            .await
            .batch_execute(&format!("create database {name}"))
            .await
            .expect("create test database");
        TestDb {
            url: url_for(&admin, &name),
            name,
        }
    }

    /// This database through the transaction-mode pooler (see [`pooler_admin_url`]).
    pub fn pooler_url(&self) -> String {
        url_for(&pooler_admin_url(), &self.name)
    }

    /// A new connection to this database (as the superuser).
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Inserts a user into `auth.users` and returns its id.
    pub async fn create_user(&self, client: &Client) -> uuid::Uuid {
        let id = uuid::Uuid::new_v4();
        client
            .execute(
                "insert into auth.users (id, email) values ($1, $2)",
                &[&id, &format!("{}@example.com", id.simple())],
            )
            .await
            .expect("insert user");
        id
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = admin_url();
        // Drop runs outside any runtime guarantee: use a thread with its own small runtime.
        let _ = crate::on_own_runtime(async move {
            if let Ok((client, connection)) = tokio_postgres::connect(&admin, NoTls).await {
                tokio::spawn(connection);
                let _ = client
                    .batch_execute(&format!("drop database if exists {name} with (force)"))
                    .await;
            }
        })
        .join();
    }
}

async fn ensure_template(admin: &str) -> String {
    let files = schema_files();
    let mut hasher = Sha256::new();
    for (name, sql) in &files {
        hasher.update(name.as_bytes());
        hasher.update(sql.as_bytes());
    }
    let template = format!("tmpl_{}", &hex::encode(hasher.finalize())[..16]);
    let client = connect(admin).await;
    // Test binaries run in parallel; one builds the template while the others wait.
    client
        .batch_execute("select pg_advisory_lock(724310)")
        .await
        .expect("advisory lock");
    let exists = client
        .query_opt("select 1 from pg_database where datname = $1", &[&template])
        .await
        .expect("pg_database")
        .is_some();
    if !exists {
        // Other checkouts of the repository (worktrees, branches) may be testing against their
        // own templates right now: keep the newest few, drop the rest.
        let stale = client
            .query(
                "select datname from pg_database where datname like 'tmpl\\_%'
                 order by oid desc offset 4",
                &[],
            )
            .await
            .expect("list templates");
        for row in stale {
            let name: String = row.get(0);
            let _ = client
                .batch_execute(&format!("drop database if exists {name} with (force)"))
                .await;
        }
        let building = format!("{template}_building");
        for statement in [
            format!("drop database if exists {building} with (force)"),
            format!("create database {building}"),
        ] {
            client
                .batch_execute(&statement)
                .await
                .expect("create template");
        }
        {
            let db = connect(&url_for(admin, &building)).await;
            for (name, sql) in &files {
                db.batch_execute(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{name} failed: {e:?}"));
                // Recorded as the Supabase CLI and scripts/db-migrate do.
                if let Some((version, rest)) = name.trim_end_matches(".sql").split_once('_') {
                    if name != "bootstrap.sql" {
                        db.execute(
                            "insert into supabase_migrations.schema_migrations (version, name) values ($1, $2)",
                            &[&version, &rest],
                        )
                        .await
                        .expect("record migration");
                    }
                }
            }
        }
        // Renaming needs no other session on it; give the closed connection a moment to go.
        let mut renamed = false;
        for _ in 0..50 {
            if client
                .batch_execute(&format!("alter database {building} rename to {template}"))
                .await
                .is_ok()
            {
                renamed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(renamed, "could not finish the template database");
    }
    client
        .batch_execute("select pg_advisory_unlock(724310)")
        .await
        .expect("advisory unlock");
    template
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_for_replaces_only_the_database() {
        assert_eq!(
            url_for(
                "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
                "t_1"
            ),
            "postgres://postgres@127.0.0.1:5432/t_1?sslmode=disable"
        );
        assert_eq!(url_for("postgres://u:p@h/db", "x"), "postgres://u:p@h/x");
    }
}
