-- The schemas the app adds beside what Supabase provides (supabase/bootstrap.sql recreates that
-- locally): `billing` holds the payment functions and views, `internal` the state no client reads.
-- Service role only. Files in this folder apply in name order and are the current definition of
-- everything; supabase/migrations/ is the history that produced it (tests/it/schema.rs proves
-- the two agree).

create schema billing;
revoke all on schema billing from public;
grant usage on schema billing to service_role;

create schema internal;
revoke all on schema internal from public;
grant usage on schema internal to service_role;
