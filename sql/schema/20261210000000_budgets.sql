-- Version 20261210000000: budgets
--
-- Budgets as products sell them (Part 2 of the contract, "Budgets"): any number per account
-- besides its Part 1 usage period, for the whole account (subject NULL) or a subject the
-- application names (team:research, user:42, key:sk-live-1), in tokens or cost_micros, over
-- calendar windows in a time zone (minute, hour, day, week from Monday, month) or a total that
-- never resets.
--   * budgets: one row per (account, subject, unit, window), its current limit, time zone
--     and soft thresholds. set_budget creates or changes it.
--   * budget_changes: every creation and change of a budget, append-only (a trigger refuses
--     UPDATE, DELETE and TRUNCATE with 55000): a limit is never edited away.
--   * budget_windows: one row per budget and window that a reservation was granted in, with
--     what its reports were billed there (used).
--   * report_reservations gains holds (the budget windows it holds, as a JSON array of
--     {"budget_id", "window_start"}) and reserved_cost_micros (its cost estimate, NULL when it
--     has none): while active and unexpired it holds reserved_tokens in every tokens budget
--     and reserved_cost_micros in every cost budget of holds. Part 1 reservations hold none.
-- Citus: every key and foreign key of the new tables leads with account_id, and their row
-- level security policies call current_account_id() without a subquery (Citus refuses
-- subqueries in policies; a STABLE function call in the qualifier costs the same here).
-- Locks: adding two columns with no default rewrites nothing.

-- Pin name resolution for this version's transaction (see version 20251219000000).
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE tokentrack.budgets (
    account_id uuid NOT NULL
    CONSTRAINT budgets_account_fk REFERENCES tokentrack.accounts (id) ON DELETE RESTRICT,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    subject text CONSTRAINT budgets_subject_valid CHECK (
        pg_catalog.length(subject) BETWEEN 1 AND 200 AND pg_catalog.btrim(subject) <> ''
    ),
    unit text NOT NULL CONSTRAINT budgets_unit_valid CHECK (unit IN ('tokens', 'cost_micros')),
    budget_window text NOT NULL CONSTRAINT budgets_window_valid CHECK (
        budget_window IN ('minute', 'hour', 'day', 'week', 'month', 'total')
    ),
    timezone text NOT NULL DEFAULT 'UTC',
    limit_amount bigint NOT NULL CONSTRAINT budgets_limit_non_negative CHECK (limit_amount >= 0),
    thresholds integer[] NOT NULL DEFAULT '{80,100}',
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT budgets_pkey PRIMARY KEY (account_id, id),
    CONSTRAINT budgets_one_per_kind UNIQUE NULLS NOT DISTINCT (account_id, subject, unit, budget_window),
    -- set_budget checks each threshold (a whole percentage from 1 to 1000).
    CONSTRAINT budgets_thresholds_valid CHECK (pg_catalog.cardinality(thresholds) BETWEEN 1 AND 10)
);

COMMENT ON TABLE tokentrack.budgets IS
'A budget of an account (subject NULL) or of a subject of it, in tokens or cost_micros, over a '
'calendar window in its time zone or in total; limit_amount is the current limit (its history '
'is budget_changes). Written by set_budget only.';

CREATE TABLE tokentrack.budget_changes (
    account_id uuid NOT NULL,
    id bigint GENERATED ALWAYS AS IDENTITY,
    budget_id uuid NOT NULL,
    limit_amount bigint NOT NULL,
    timezone text NOT NULL,
    thresholds integer[] NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT budget_changes_pkey PRIMARY KEY (account_id, id),
    CONSTRAINT budget_changes_budget_fk FOREIGN KEY (account_id, budget_id)
    REFERENCES tokentrack.budgets (account_id, id) ON DELETE RESTRICT
);

COMMENT ON TABLE tokentrack.budget_changes IS
'Every creation and change of a budget (limit, time zone, thresholds), append-only.';

CREATE INDEX budget_changes_budget_idx ON tokentrack.budget_changes (account_id, budget_id, id);

CREATE TABLE tokentrack.budget_windows (
    account_id uuid NOT NULL,
    budget_id uuid NOT NULL,
    window_start timestamptz NOT NULL,
    used bigint NOT NULL DEFAULT 0 CONSTRAINT budget_windows_used_non_negative CHECK (used >= 0),
    CONSTRAINT budget_windows_pkey PRIMARY KEY (account_id, budget_id, window_start),
    CONSTRAINT budget_windows_budget_fk FOREIGN KEY (account_id, budget_id)
    REFERENCES tokentrack.budgets (account_id, id) ON DELETE RESTRICT
);

COMMENT ON TABLE tokentrack.budget_windows IS
'What the reports whose reservations were granted in a budget''s window were billed there '
'(used, in the budget''s unit; late steps included). A row exists from the first reservation '
'granted in that window.';

ALTER TABLE tokentrack.report_reservations
ADD COLUMN holds jsonb,
ADD COLUMN reserved_cost_micros bigint,
ADD CONSTRAINT report_reservations_holds_array CHECK (pg_catalog.jsonb_typeof(holds) = 'array'),
ADD CONSTRAINT report_reservations_cost_non_negative CHECK (reserved_cost_micros >= 0);

COMMENT ON COLUMN tokentrack.report_reservations.holds IS
'The budget windows this reservation holds ([{"budget_id", "window_start"}]): reserved_tokens in '
'each tokens budget, reserved_cost_micros in each cost budget, while active and unexpired. NULL: '
'none.';
COMMENT ON COLUMN tokentrack.report_reservations.reserved_cost_micros IS
'The reservation''s cost estimate in micros (NULL: none; it then holds 0 in cost budgets).';

-- A reservation estimate as reserve and extend_reservation take it (check_estimate).
CREATE TYPE tokentrack.reservation_estimate AS (tokens integer, cost_micros bigint);

COMMENT ON TYPE tokentrack.reservation_estimate IS
'A checked reservation estimate: tokens, and cost_micros (NULL: no cost estimate).';

CREATE FUNCTION tokentrack.budget_changes_are_append_only()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    RAISE EXCEPTION '% of tokentrack.budget_changes is not allowed: budget changes are append-only', tg_op
        USING ERRCODE = '55000',
        HINT = 'Change a budget with tokentrack.set_budget(...): it records a new row.';
END
$function$;

COMMENT ON FUNCTION tokentrack.budget_changes_are_append_only() IS
'Trigger function refusing UPDATE, DELETE and TRUNCATE of tokentrack.budget_changes (SQLSTATE 55000).';

REVOKE ALL ON FUNCTION tokentrack.budget_changes_are_append_only() FROM PUBLIC;

CREATE TRIGGER budget_changes_append_only
BEFORE UPDATE OR DELETE ON tokentrack.budget_changes
FOR EACH ROW EXECUTE FUNCTION tokentrack.budget_changes_are_append_only();

CREATE TRIGGER budget_changes_no_truncate
BEFORE TRUNCATE ON tokentrack.budget_changes
FOR EACH STATEMENT EXECUTE FUNCTION tokentrack.budget_changes_are_append_only();

-- Row level security: readers see their own account's rows. No subquery in the policies
-- (Citus refuses them): current_account_id() is STABLE, so the planner may evaluate it once.
ALTER TABLE tokentrack.budgets ENABLE ROW LEVEL SECURITY;
ALTER TABLE tokentrack.budget_changes ENABLE ROW LEVEL SECURITY;
ALTER TABLE tokentrack.budget_windows ENABLE ROW LEVEL SECURITY;

CREATE POLICY budgets_reader_own ON tokentrack.budgets
FOR SELECT TO tokentrack_reader USING (account_id = tokentrack.current_account_id());
CREATE POLICY budget_changes_reader_own ON tokentrack.budget_changes
FOR SELECT TO tokentrack_reader USING (account_id = tokentrack.current_account_id());
CREATE POLICY budget_windows_reader_own ON tokentrack.budget_windows
FOR SELECT TO tokentrack_reader USING (account_id = tokentrack.current_account_id());
CREATE POLICY budgets_service_read ON tokentrack.budgets
FOR SELECT TO tokentrack_service USING (TRUE);
CREATE POLICY budget_changes_service_read ON tokentrack.budget_changes
FOR SELECT TO tokentrack_service USING (TRUE);
CREATE POLICY budget_windows_service_read ON tokentrack.budget_windows
FOR SELECT TO tokentrack_service USING (TRUE);

REVOKE ALL ON tokentrack.budgets, tokentrack.budget_changes, tokentrack.budget_windows FROM PUBLIC;
GRANT SELECT ON tokentrack.budgets, tokentrack.budget_changes, tokentrack.budget_windows
TO tokentrack_service, tokentrack_reader;
