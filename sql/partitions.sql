-- Keeps pginval exact on partitioned tables, which PostgreSQL otherwise leaves it
-- half-blind to when publishing via the root (publish_via_partition_root):
--
-- 1. REPLICA IDENTITY: a partition's own identity decides what its old rows carry, and
--    a partition created or attached later starts with DEFAULT (key only), so rules
--    that read non-key columns could not invalidate the old key. pginval then applies
--    those templates as wildcards (over-invalidation, logged and counted); the event
--    trigger below gives every partition of a FULL root FULL as well.
-- 2. TRUNCATE, DETACH, ATTACH and DROP of a single partition are not sent to pginval
--    at all. Here they are: a statement-level TRUNCATE trigger on every partition, an
--    event trigger on ALTER TABLE of a partitioned table (DETACH / ATTACH PARTITION)
--    and one on DROP TABLE write a transactional message
--    pg_catalog.pg_logical_emit_message(true, 'pginval-partition', '{"root": ..., "op": ...}'),
--    and pginval applies the root's rules as for a TRUNCATE of the root: their
--    fallbacks (every template with {...} as a wildcard, or the declared fallback)
--    and entity `truncate` events. Over-invalidation, never a miss.
--
-- Run once per database as a superuser (event triggers need one), before or after
-- the partitions exist (existing ones get their triggers now):
--   psql -v ON_ERROR_STOP=1 -f sql/partitions.sql "$DATABASE_URL"
-- `pginval check` says which partitions still lack the TRUNCATE trigger.

-- The message pginval reads: the root's schema-qualified name and what happened.
CREATE OR REPLACE FUNCTION public.pginval_partition_message(root oid, op text) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
  SELECT pg_catalog.pg_logical_emit_message(true, 'pginval-partition', json_build_object(
           'root', n.nspname || '.' || c.relname, 'op', op)::text)::text::void
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE c.oid = root
$$;

-- Statement-level TRUNCATE trigger of a partition.
CREATE OR REPLACE FUNCTION public.pginval_partition_truncated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  root oid := pg_catalog.pg_partition_root(TG_RELID::regclass);
BEGIN
  IF root IS NOT NULL AND root <> TG_RELID THEN
    PERFORM public.pginval_partition_message(root, 'truncate');
  END IF;
  RETURN NULL;
END
$$;

-- Gives every leaf partition under `root` the TRUNCATE trigger, named after the
-- root's OID so that the DROP trigger below can tell whose partition went.
CREATE OR REPLACE FUNCTION public.pginval_partition_cover(root oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  part regclass;
BEGIN
  FOR part IN
    SELECT t.relid FROM pg_catalog.pg_partition_tree(root::regclass) t
     WHERE t.isleaf AND t.relid <> root
       AND NOT EXISTS (SELECT 1 FROM pg_trigger g
                        WHERE g.tgrelid = t.relid AND g.tgname = 'pginval_truncate_' || root)
  LOOP
    EXECUTE pg_catalog.format('CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT
                    EXECUTE FUNCTION public.pginval_partition_truncated()',
                   'pginval_truncate_' || root, part);
  END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION public.pginval_partition_identity() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  cmd record;
  root oid;
  part regclass;
BEGIN
  -- The ALTERs below fire this trigger again: those nested calls have nothing to do.
  IF pg_catalog.current_setting('pginval.partition_trigger', true) = 'busy' THEN
    RETURN;
  END IF;
  PERFORM pg_catalog.set_config('pginval.partition_trigger', 'busy', true);
  FOR cmd IN
    SELECT objid, command_tag FROM pg_event_trigger_ddl_commands()
     WHERE object_type IN ('table', 'partitioned table')
  LOOP
    root := pg_catalog.pg_partition_root(cmd.objid::regclass);
    CONTINUE WHEN root IS NULL;
    -- ALTER TABLE of a partitioned table (ATTACH / DETACH PARTITION among others):
    -- its set of rows may have changed without a row change being sent.
    IF cmd.command_tag = 'ALTER TABLE'
       AND (SELECT relkind FROM pg_class WHERE oid = cmd.objid) = 'p' THEN
      PERFORM public.pginval_partition_message(root, 'alter');
    END IF;
    PERFORM public.pginval_partition_cover(root);
    CONTINUE WHEN (SELECT relreplident FROM pg_class WHERE oid = root) <> 'f';
    FOR part IN
      SELECT t.relid FROM pg_catalog.pg_partition_tree(root::regclass) t
        JOIN pg_class c ON c.oid = t.relid
       WHERE c.relreplident <> 'f'
    LOOP
      EXECUTE pg_catalog.format('ALTER TABLE %s REPLICA IDENTITY FULL', part);
    END LOOP;
  END LOOP;
  PERFORM pg_catalog.set_config('pginval.partition_trigger', '', true);
END
$$;

-- DROP TABLE of a partition: its TRUNCATE trigger, dropped with it, names the root.
CREATE OR REPLACE FUNCTION public.pginval_partition_dropped() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  root oid;
BEGIN
  FOR root IN
    SELECT DISTINCT substring(object_identity FROM '^pginval_truncate_([0-9]+) on ')::oid
      FROM pg_event_trigger_dropped_objects()
     WHERE object_type = 'trigger' AND object_identity ~ '^pginval_truncate_[0-9]+ on '
  LOOP
    -- A root dropped with its partitions is gone: nothing to say about it here.
    CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = root);
    PERFORM public.pginval_partition_message(root, 'drop');
  END LOOP;
END
$$;

-- The triggers run as the superuser who ran this script (SECURITY DEFINER), so they
-- work where sql/setup.sql revoked pg_logical_emit_message from PUBLIC; nobody else
-- may call the helpers.
REVOKE EXECUTE ON FUNCTION public.pginval_partition_message(oid, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.pginval_partition_cover(oid) FROM PUBLIC;

DROP EVENT TRIGGER IF EXISTS pginval_partition_identity;
CREATE EVENT TRIGGER pginval_partition_identity ON ddl_command_end
  WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
  EXECUTE FUNCTION public.pginval_partition_identity();

DROP EVENT TRIGGER IF EXISTS pginval_partition_dropped;
CREATE EVENT TRIGGER pginval_partition_dropped ON sql_drop
  WHEN TAG IN ('DROP TABLE')
  EXECUTE FUNCTION public.pginval_partition_dropped();

-- The partitions that exist now.
SELECT public.pginval_partition_cover(c.oid) FROM pg_class c WHERE c.relkind = 'p' AND NOT c.relispartition;
