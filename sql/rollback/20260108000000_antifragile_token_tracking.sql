-- Rollback of version 20260108000000: antifragile_token_tracking
--
-- Removes exactly what that version added: its functions, its two tables (with their
-- indexes, policies and grants). Nothing of version 20251219000000 is touched: usage_periods,
-- reports, usage_ledger and increment_usage stay exactly as they are.
-- The step and reservation history is dropped with the tables; what they billed stays in
-- usage_periods.tokens_used and in the usage ledger.

DROP PROCEDURE tokentrack.sweep_expired_reservations(integer);
DROP FUNCTION tokentrack.cleanup_expired_reservations();
DROP FUNCTION tokentrack.expire_reservations(integer);
DROP FUNCTION tokentrack.finish_report(uuid, uuid, text, text);
DROP FUNCTION tokentrack.finalize_report_usage(uuid, uuid);
DROP FUNCTION tokentrack.settle_reservation(uuid, text);
DROP FUNCTION tokentrack.persist_step_usage(uuid, uuid, text, integer, integer, integer, text);
DROP FUNCTION tokentrack.try_reserve_tokens(uuid, uuid, integer);
DROP FUNCTION tokentrack.reconcile(uuid);
DROP FUNCTION tokentrack.reservation_refusal(uuid, uuid);
DROP FUNCTION tokentrack.lock_report_reservation(uuid, uuid);
DROP FUNCTION tokentrack.require_read_committed(text);

DROP TABLE tokentrack.report_step_usage;
DROP TABLE tokentrack.report_reservations;
