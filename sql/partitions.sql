-- Keeps every partition of a partitioned table with REPLICA IDENTITY FULL in step
-- with its root: a partition's own identity decides what its old rows carry, and a
-- partition created or attached later starts with DEFAULT (key only), so rules that
-- read non-key columns could not invalidate the old key. pginval then applies those
-- templates as wildcards (over-invalidation, logged and counted); this trigger makes
-- that unnecessary.
--
-- Run once per database as a superuser (event triggers need one):
--   psql -v ON_ERROR_STOP=1 -f sql/partitions.sql "$DATABASE_URL"
--
-- What PostgreSQL does not send to pginval at all, with publish_via_partition_root:
-- a TRUNCATE, DETACH or DROP of a single partition. Invalidate by hand after those
-- (or TRUNCATE the root, which pginval sees).

CREATE OR REPLACE FUNCTION pginval_partition_identity() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
  changed oid;
  root oid;
  part regclass;
BEGIN
  FOR changed IN
    SELECT objid FROM pg_event_trigger_ddl_commands()
     WHERE object_type IN ('table', 'partitioned table')
  LOOP
    root := pg_partition_root(changed);
    CONTINUE WHEN root IS NULL
      OR (SELECT relreplident FROM pg_class WHERE oid = root) <> 'f';
    FOR part IN
      SELECT t.relid FROM pg_partition_tree(root) t
        JOIN pg_class c ON c.oid = t.relid
       WHERE c.relreplident <> 'f'
    LOOP
      EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', part);
    END LOOP;
  END LOOP;
END
$$;

DROP EVENT TRIGGER IF EXISTS pginval_partition_identity;
CREATE EVENT TRIGGER pginval_partition_identity ON ddl_command_end
  WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
  EXECUTE FUNCTION pginval_partition_identity();
