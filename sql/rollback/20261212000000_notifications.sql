-- Rollback of version 20261212000000: notifications
--
-- billing-tables: notifications
--
-- The notifications are billing-adjacent: they hold no usage, but each row is the one record
-- that a (budget, window, threshold) was crossed and whether a consumer acknowledged it
-- (invariant 9). Dropped, the unacknowledged ones would be lost silently, and after a
-- reinstall no window that already crossed a threshold would ever be notified of it (its
-- used + held no longer goes from below to above). So while the table holds a row,
-- `tokentrack migrate rollback` refuses to run this file; `--archive` keeps the rows in
-- tokentrack_archive (docs/INSTALL.md, "Rollback and billing data") and the next install of
-- this version restores them, ids and delivery state included.
--
-- Removes exactly what that version added: the table (its indexes, policies and grants). The
-- functions that version introduced (note_crossings, claim_notifications, ack_notification)
-- are dropped by the migrator before this file runs; the functions it reworked (the billing,
-- reservation and health functions) get their previous definitions back after it.

DROP TABLE tokentrack.notifications;
