-- Version 20261202000000: immutable_billed_steps
--
-- A billed report_step_usage row is a billing record: the contract makes billing records
-- immutable, as the usage ledger already is (version 20251219000000). This version adds a
-- trigger that refuses, with SQLSTATE 55000 like the ledger's:
--   * UPDATE of a billed row (billed_at set), whatever the columns;
--   * DELETE of a billed row;
--   * TRUNCATE of the table while any row of it is billed.
-- Unbilled rows are not billing records yet: billing itself is the one UPDATE of an unbilled
-- row (finalize, the sweep: billed_at, billed_period_id and billing_entry_id set once), and
-- an unbilled row can still be deleted (a step whose report will never be billed). A
-- correction of billed usage is a new usage_ledger row, never an edit.
--
-- Cost: the row trigger carries WHEN (OLD.billed_at IS NOT NULL), which the executor
-- evaluates on the row without calling the function; the billing UPDATE only touches rows
-- whose billed_at is NULL, so it never calls it (docs/REVIEW.md has the measurement).
-- The table owner (and a superuser) can still ALTER TABLE ... DISABLE TRIGGER: this guards
-- against mistakes and against roles that have UPDATE or DELETE, not against the owner
-- deliberately switching it off (reconcile() reports a billed step changed behind its ledger
-- row either way).
--
-- The trigger function lives here, not in sql/functions/: the installer applies function files
-- after the schema files (in the transaction of the last pending version), and a rollback
-- drops a version's functions before its rollback file runs, while a trigger needs its
-- function first and keeps it from being dropped (as the ledger's trigger function stays in
-- version 20251219000000).

-- Pin name resolution for this version's transaction (see version 20251219000000).
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE FUNCTION tokentrack.report_step_usage_billed_is_immutable()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    IF tg_op = 'TRUNCATE' THEN
        -- Served by report_step_usage_billed_period_idx (billed_period_id is set exactly when
        -- billed_at is: report_step_usage_billed_consistently).
        IF EXISTS (SELECT FROM tokentrack.report_step_usage AS s WHERE s.billed_period_id IS NOT NULL) THEN
            RAISE EXCEPTION 'tokentrack.report_step_usage holds billed steps: TRUNCATE is not allowed'
                USING ERRCODE = '55000',
                HINT = 'Billed steps are billing records and stay; record a correction as a new usage_ledger row.';
        END IF;
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'step % of report % was billed at %: % of a billed step is not allowed',
        pg_catalog.quote_literal(old.step_name), old.report_id, old.billed_at, tg_op
        USING ERRCODE = '55000',
        HINT = 'Billed steps are billing records and stay; record a correction as a new usage_ledger row.';
END
$function$;

COMMENT ON FUNCTION tokentrack.report_step_usage_billed_is_immutable() IS
'Trigger function refusing UPDATE and DELETE of a billed tokentrack.report_step_usage row, and '
'TRUNCATE while the table holds billed rows (SQLSTATE 55000).';

REVOKE ALL ON FUNCTION tokentrack.report_step_usage_billed_is_immutable() FROM PUBLIC;

-- WHEN: unbilled rows (every row the billing UPDATE touches) never call the function.
CREATE TRIGGER report_step_usage_billed_immutable
BEFORE UPDATE OR DELETE ON tokentrack.report_step_usage
FOR EACH ROW WHEN (old.billed_at IS NOT NULL)
EXECUTE FUNCTION tokentrack.report_step_usage_billed_is_immutable();

CREATE TRIGGER report_step_usage_billed_no_truncate
BEFORE TRUNCATE ON tokentrack.report_step_usage
FOR EACH STATEMENT EXECUTE FUNCTION tokentrack.report_step_usage_billed_is_immutable();
