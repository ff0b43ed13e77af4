-- Preparing a production database for pginval, by hand, with least privilege.
--
-- Written for the example schema (sql/example-schema.sql) and rules.toml: replace the
-- table list with the tables your rules name. Run it with psql as the owner of those
-- tables (or a superuser), connected to the application's database:
--
--   psql -v ON_ERROR_STOP=1 -v pginval_password='a-long-random-secret' \
--        -d app -f sql/setup.sql
--
-- then point pginval at it:
--   PGINVAL_SOURCE_URL='postgres://pginval:<password>@db.internal:5432/app' \
--     pginval check --config rules.toml
--
-- ---------------------------------------------------------------------------------------
-- 0. Server settings (once per server, needs a superuser and a restart)
-- ---------------------------------------------------------------------------------------
-- Logical decoding needs wal_level = logical (the default, replica, is not enough):
--
--   ALTER SYSTEM SET wal_level = logical;
--   -- then restart PostgreSQL (a reload is not enough), and check:
--   SHOW wal_level;
--
-- The defaults max_replication_slots = 10 and max_wal_senders = 10 leave room for
-- pginval (one slot, one WAL sender); raise them if your replicas already use them up.
-- A slot keeps WAL until pginval confirms it: consider capping what a stopped pginval
-- can hold back (PostgreSQL 13+), e.g. ALTER SYSTEM SET max_slot_wal_keep_size = '10GB';
-- (if the cap is hit the slot is invalidated and pginval has to start over).
--
-- Managed services: set the equivalent parameter instead (e.g. a parameter group's
-- rds.logical_replication = 1, cloudsql.logical_decoding = on), and use the service's
-- way to grant replication (e.g. GRANT rds_replication TO pginval on RDS).
--
-- pg_hba.conf: pginval's replication connection names a database (replication=database),
-- so it is matched by ordinary database lines, not by the `replication` keyword, e.g.
--   hostssl  app  pginval  10.0.0.0/8  scram-sha-256

\set ON_ERROR_STOP on

-- ---------------------------------------------------------------------------------------
-- 1. The role
-- ---------------------------------------------------------------------------------------
-- REPLICATION lets it open a replication connection and create/use its slot. It is not a
-- superuser and cannot write to any table.
-- The password below is a PLACEHOLDER used only when no -v pginval_password=... is given:
-- pass a real secret on the command line (or change it afterwards with \password pginval).
\if :{?pginval_password}
\else
\warn 'pginval_password not set: using the placeholder password change-me -- change it!'
\set pginval_password 'change-me'
\endif

CREATE ROLE pginval WITH LOGIN REPLICATION PASSWORD :'pginval_password';

-- ---------------------------------------------------------------------------------------
-- 2. Read access to the tables the rules name
-- ---------------------------------------------------------------------------------------
-- The change stream itself does not check table privileges, but `pginval check` and
-- start-up inspect these tables as this role; read-only access is all it ever needs.
GRANT CONNECT ON DATABASE :"DBNAME" TO pginval;
GRANT USAGE ON SCHEMA public TO pginval;
GRANT SELECT ON TABLE public.users, public.posts, public.products, public.categories
    TO pginval;

-- ---------------------------------------------------------------------------------------
-- 3. The publication: which tables' changes are sent
-- ---------------------------------------------------------------------------------------
-- pginval creates it when missing, but only the tables' owner can, so with a
-- least-privilege role it is created here. Keep it in step with the rules: pginval only
-- sees changes of the tables in the publication. When you add a rule for another table:
--   ALTER PUBLICATION pginval ADD TABLE public.<table>;
CREATE PUBLICATION pginval FOR TABLE
    public.users, public.posts, public.products, public.categories;

-- ---------------------------------------------------------------------------------------
-- 4. Replica identity: FULL where a rule uses a column that is not in the primary key
-- ---------------------------------------------------------------------------------------
-- With REPLICA IDENTITY DEFAULT, an UPDATE carries the old primary key only when the key
-- changed and a DELETE carries only the key columns. A template such as
-- `user_posts:{author_id}` or `product_sku:{sku}` needs the old row's value (to invalidate
-- the previous author's list, or the deleted product's SKU key), so its table needs FULL.
-- Tables whose rules use only primary-key columns (here users: `user:{id}`) keep DEFAULT.
-- `pginval check` lists every table that still needs this. FULL writes the whole old row
-- to the WAL on UPDATE and DELETE of that table (more WAL, no extra locking afterwards;
-- the ALTER itself takes a brief exclusive lock).
ALTER TABLE public.posts      REPLICA IDENTITY FULL;
ALTER TABLE public.products   REPLICA IDENTITY FULL;
ALTER TABLE public.categories REPLICA IDENTITY FULL;

-- ---------------------------------------------------------------------------------------
-- 5. The slot (optional)
-- ---------------------------------------------------------------------------------------
-- pginval creates its slot (pgoutput) on first start. Create it here instead if you want
-- changes captured from now on, before pginval is first deployed: invalidation then
-- starts from this point. Run it as pginval or a superuser (it needs REPLICATION):
--
--   SELECT * FROM pg_create_logical_replication_slot('pginval', 'pgoutput');
--
-- A slot that nobody reads keeps WAL on the server forever (up to
-- max_slot_wal_keep_size). When you retire pginval, drop it:
--
--   SELECT pg_drop_replication_slot('pginval');
--   DROP PUBLICATION pginval;
--
-- Watch its lag:
--   SELECT slot_name, active,
--          pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)) AS lag
--   FROM pg_replication_slots WHERE slot_name = 'pginval';

-- ---------------------------------------------------------------------------------------
-- 6. Hints (optional): who may emit messages to pginval
-- ---------------------------------------------------------------------------------------
-- pginval applies hints (pg_logical_emit_message(true, 'pginval', '{"keys":[...]}'))
-- only with [hints] enabled = true and within the allowed prefixes. Every role may call
-- pg_logical_emit_message by default; to let only the application emit them (as a
-- superuser; the application role here is "app"):
--
--   DO $$ DECLARE f regprocedure; BEGIN
--     FOR f IN SELECT oid::regprocedure FROM pg_proc WHERE proname = 'pg_logical_emit_message'
--     LOOP
--       EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
--       EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO app', f);
--     END LOOP;
--   END $$;
--
-- (The loop covers every major's signatures: (boolean, text, text) and (boolean, text,
-- bytea) up to PostgreSQL 16; from 17 on each takes a fourth "flush" argument.) pginval's
-- heartbeat ([source] heartbeat_secs) calls the function as pginval's role: grant it
-- there as well when you use it.
--
-- Partitioned tables: sql/partitions.sql keeps new partitions' REPLICA IDENTITY FULL and
-- tells pginval of a partition's TRUNCATE, DETACH or DROP (its triggers are SECURITY
-- DEFINER, so they keep working after the REVOKE above).
