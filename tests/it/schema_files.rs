//! `supabase/schemas/` (the current definition of every table, view and function) and
//! `supabase/migrations/` (the append-only history) must describe the same database: both are
//! applied to fresh databases, after `bootstrap.sql`, and their catalogs compared. Column order
//! is not compared (a column added by a migration comes last); everything else is: columns with
//! types, defaults and nullability, constraints, indexes, views, functions (their text, which the
//! migration must copy exactly), triggers, policies, RLS, comments and privileges.

use testkit::db::TestDb;
use tokio_postgres::Client;

/// The catalog of the app's schemas as sorted lines of text.
const CATALOG: &str = r#"
with ns as (
  select oid, nspname from pg_namespace where nspname in ('public', 'billing', 'internal', 'auth')
)
select line from (
  select 'schema ' || nspname || ' acl=' || coalesce((select nspacl::text from pg_namespace p where p.oid = ns.oid), '') as line from ns
  union all
  select 'relation ' || n.nspname || '.' || c.relname || ' kind=' || c.relkind::text || ' rls=' || c.relrowsecurity
    || ' acl=' || coalesce(c.relacl::text, '') || ' comment=' || coalesce(obj_description(c.oid, 'pg_class'), '')
  from pg_class c join ns n on n.oid = c.relnamespace where c.relkind in ('r', 'v', 'm', 'S', 'p')
  union all
  select 'column ' || n.nspname || '.' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
    || case when a.attnotnull then ' not null' else '' end
    || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
    || case when a.attidentity <> '' then ' identity ' || a.attidentity::text else '' end
    || coalesce(' comment=' || col_description(c.oid, a.attnum), '')
  from pg_attribute a join pg_class c on c.oid = a.attrelid join ns n on n.oid = c.relnamespace
  left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
  where a.attnum > 0 and not a.attisdropped and c.relkind in ('r', 'v', 'p')
  union all
  select 'constraint ' || n.nspname || '.' || c.relname || ' ' || k.conname || ' ' || pg_get_constraintdef(k.oid)
  from pg_constraint k join pg_class c on c.oid = k.conrelid join ns n on n.oid = c.relnamespace
  union all
  select 'index ' || pg_get_indexdef(i.indexrelid)
  from pg_index i join pg_class c on c.oid = i.indrelid join ns n on n.oid = c.relnamespace
  union all
  select 'view ' || n.nspname || '.' || c.relname || ' ' || pg_get_viewdef(c.oid)
  from pg_class c join ns n on n.oid = c.relnamespace where c.relkind = 'v'
  union all
  select 'function ' || p.oid::regprocedure::text || ' acl=' || coalesce(p.proacl::text, '')
    || E'\n' || pg_get_functiondef(p.oid)
  from pg_proc p join ns n on n.oid = p.pronamespace where n.nspname <> 'auth'
  union all
  select 'trigger ' || pg_get_triggerdef(t.oid)
  from pg_trigger t join pg_class c on c.oid = t.tgrelid join ns n on n.oid = c.relnamespace
  where not t.tgisinternal
  union all
  select 'policy ' || n.nspname || '.' || c.relname || ' ' || p.polname || ' ' || p.polcmd::text
    || ' roles=' || p.polroles::regrole[]::text || ' using=' || coalesce(pg_get_expr(p.polqual, p.polrelid), '')
    || ' check=' || coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '')
  from pg_policy p join pg_class c on c.oid = p.polrelid join ns n on n.oid = c.relnamespace
) all_lines
order by line
"#;

async fn catalog(client: &Client) -> Vec<String> {
    client
        .query(CATALOG, &[])
        .await
        .expect("catalog query")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The schema files, in name order.
fn schema_files() -> Vec<(String, String)> {
    let dir = testkit::workspace_root().join("supabase/schemas");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("supabase/schemas")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

#[tokio::test]
async fn schema_files_and_migrations_describe_the_same_database() {
    let migrated = TestDb::new().await;
    let declared = TestDb::empty().await;
    let client = declared.client().await;
    let bootstrap =
        std::fs::read_to_string(testkit::workspace_root().join("supabase/bootstrap.sql")).unwrap();
    client.batch_execute(&bootstrap).await.unwrap();
    for (name, sql) in schema_files() {
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("supabase/schemas/{name}: {e:?}"));
    }

    let want = catalog(&migrated.client().await).await;
    let got = catalog(&client).await;

    let only_migrations: Vec<&String> = want.iter().filter(|l| !got.contains(l)).collect();
    let only_schemas: Vec<&String> = got.iter().filter(|l| !want.contains(l)).collect();
    assert!(
        only_migrations.is_empty() && only_schemas.is_empty(),
        "supabase/schemas and supabase/migrations differ\n--- only after the migrations:\n{}\n--- only from the schema files:\n{}",
        only_migrations.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n"),
        only_schemas.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n"),
    );
    assert!(
        want.len() > 100,
        "the catalog query sees the schema: {}",
        want.len()
    );
}
