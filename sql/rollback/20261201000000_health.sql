-- Rollback of version 20261201000000: health
--
-- billing-tables: none
--
-- Removes exactly what that version added: the function tokentrack.health(integer). IF EXISTS,
-- because an installer that drops the functions a version introduced may have dropped it
-- already. No table or figure is touched.

DROP FUNCTION IF EXISTS tokentrack.health(integer);
