-- Rollback of version 20261202000000: immutable_billed_steps
--
-- billing-tables: none
--
-- Removes exactly what that version added: the two triggers on tokentrack.report_step_usage
-- and their function. No row is touched: the steps, billed or not, stay as they are.

DROP TRIGGER report_step_usage_billed_no_truncate ON tokentrack.report_step_usage;
DROP TRIGGER report_step_usage_billed_immutable ON tokentrack.report_step_usage;
DROP FUNCTION tokentrack.report_step_usage_billed_is_immutable();
