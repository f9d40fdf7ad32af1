-- Rollback of version 20261214000000: write_path
--
-- billing-tables: none
--
-- Undoes exactly what that version changed; the functions it reworked get their previous
-- definitions back from the migrator after this file runs.

SET LOCAL search_path = pg_catalog, pg_temp;

-- Part bperf: nothing (functions only; the migrator restores their version-13 definitions
-- from the recorded history).
