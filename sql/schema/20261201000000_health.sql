-- Version 20261201000000: health
--
-- tokentrack.health(p_hours): the monitoring figures of `tokentrack monitor` as one read-only
-- function, so that the CLI, an exporter and a dashboard read the same numbers. The function
-- lives in sql/functions/health.sql with a `-- version: 20261201000000` header; this version
-- adds no table, index or policy (the indexes health() reads by exist since versions
-- 20251219000000 and 20260108000000).

-- Pin name resolution for this version's transaction (see version 20251219000000).
SET LOCAL search_path = pg_catalog, pg_temp;
