-- version: 20261210000000
--
-- tokentrack.set_budget(p_account_id uuid, p_subject text, p_unit text, p_window text,
--     p_limit bigint, p_options jsonb DEFAULT '{}') -> jsonb
--
-- Creates or changes the account's budget for (p_subject, p_unit, p_window): p_subject NULL
-- is the whole account, else a label the application chooses (team:research, user:42,
-- key:sk-live-1); p_unit tokens or cost_micros; p_window minute, hour, day, week (from
-- Monday), month (calendar windows in the budget's time zone) or total (never resets: its
-- window starts when the budget is created); p_limit the limit in that unit. p_options may hold
-- timezone (an IANA name such as Europe/Berlin, in any case, stored as the zone spells it;
-- default UTC) and thresholds (soft thresholds
-- in percent, 1 to 1000, at most 10; default [80, 100]). On a change, an option left out keeps
-- its value.
-- A new limit takes effect at once, for the current window too: reservations already granted
-- keep their holds (billing stays actual usage), new ones are checked against the new limit.
-- Locks: the budget (lock_budgets, rank 4 of the global order, docs/REVIEW.md), then its row
--   (by the UPDATE); nothing else.
-- Writes: the budgets row (insert, or update of limit_amount, timezone, thresholds) and one
--   budget_changes row, unless nothing changed ("changed": false, nothing written).
-- Answer: {"success": true, "budget_id", "created", "changed", "subject", "unit", "window",
--   "limit", "timezone", "thresholds"}. Refusal: account_not_found.
-- Errors: 25000 under REPEATABLE READ or SERIALIZABLE; 22004 a NULL account, unit, window,
--   limit or options; 22023 a blank subject, an unknown unit
--   or window, a negative limit, options not an object, an unknown option, a time zone that is
--   not a known name, thresholds not a list of 1 to 10 whole percentages from 1 to 1000;
--   22001 a subject over 200 characters.
CREATE OR REPLACE FUNCTION tokentrack.set_budget(
    p_account_id uuid,
    p_subject text,
    p_unit text,
    p_window text,
    p_limit bigint,
    p_options jsonb DEFAULT '{}'::jsonb
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_key text;
    v_timezone text;
    v_thresholds integer[];
    v_value jsonb;
    v_budget tokentrack.budgets%ROWTYPE;
    v_created boolean := false;
    v_changed boolean := false;
BEGIN
    -- READ COMMITTED only: see require_read_committed (a change racing another one waits for it
    -- and then sees it).
    PERFORM tokentrack.require_read_committed('set_budget');
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;
    IF pg_catalog.btrim(p_subject) = '' THEN
        RAISE EXCEPTION 'p_subject must not be empty (NULL: the whole account)'
            USING ERRCODE = '22023', COLUMN = 'p_subject';
    END IF;
    IF pg_catalog.length(p_subject) > 200 THEN
        RAISE EXCEPTION 'p_subject must be at most 200 characters (got %)', pg_catalog.length(p_subject)
            USING ERRCODE = '22001', COLUMN = 'p_subject';
    END IF;
    IF p_unit IS NULL THEN
        RAISE EXCEPTION 'p_unit must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_unit';
    END IF;
    IF p_unit NOT IN ('tokens', 'cost_micros') THEN
        RAISE EXCEPTION 'p_unit must be tokens or cost_micros (got %)', p_unit
            USING ERRCODE = '22023', COLUMN = 'p_unit';
    END IF;
    IF p_window IS NULL THEN
        RAISE EXCEPTION 'p_window must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_window';
    END IF;
    IF p_window NOT IN ('minute', 'hour', 'day', 'week', 'month', 'total') THEN
        RAISE EXCEPTION 'p_window must be minute, hour, day, week, month or total (got %)', p_window
            USING ERRCODE = '22023', COLUMN = 'p_window';
    END IF;
    IF p_limit IS NULL THEN
        RAISE EXCEPTION 'p_limit must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_limit';
    END IF;
    IF p_limit < 0 THEN
        RAISE EXCEPTION 'p_limit must not be negative (got %)', p_limit
            USING ERRCODE = '22023', COLUMN = 'p_limit';
    END IF;
    IF p_options IS NULL THEN
        RAISE EXCEPTION 'p_options must not be NULL (no option: {})' USING ERRCODE = '22004', COLUMN = 'p_options';
    END IF;
    IF pg_catalog.jsonb_typeof(p_options) <> 'object' THEN
        RAISE EXCEPTION 'p_options must be a JSON object (got %)', pg_catalog.jsonb_typeof(p_options)
            USING ERRCODE = '22023', COLUMN = 'p_options';
    END IF;
    FOR v_key, v_value IN SELECT e.key, e.value FROM pg_catalog.jsonb_each(p_options) AS e ORDER BY e.key LOOP
        IF v_key = 'timezone' THEN
            -- The zone's own spelling (utc is UTC, europe/berlin Europe/Berlin).
            SELECT pg_catalog.min(z.name) INTO v_timezone FROM pg_catalog.pg_timezone_names AS z
            WHERE
                pg_catalog.jsonb_typeof(v_value) = 'string'
                AND pg_catalog.lower(z.name) = pg_catalog.lower(v_value #>> '{}');
            IF v_timezone IS NULL THEN
                RAISE EXCEPTION 'p_options.timezone must be a time zone name such as Europe/Berlin (got %)', v_value
                    USING ERRCODE = '22023', COLUMN = 'p_options.timezone';
            END IF;
        ELSIF v_key = 'thresholds' THEN
            IF pg_catalog.jsonb_typeof(v_value) <> 'array'
                OR pg_catalog.jsonb_array_length(v_value) NOT BETWEEN 1 AND 10
                OR EXISTS (
                    SELECT FROM pg_catalog.jsonb_array_elements(v_value) AS t (v)
                    WHERE
                        pg_catalog.jsonb_typeof(t.v) <> 'number'
                        OR (t.v #>> '{}')::numeric <> pg_catalog.trunc((t.v #>> '{}')::numeric)
                        OR (t.v #>> '{}')::numeric NOT BETWEEN 1 AND 1000
                ) THEN
                RAISE EXCEPTION 'p_options.thresholds must be a list of 1 to 10 whole percentages from 1 to 1000 (got %)', v_value
                    USING ERRCODE = '22023', COLUMN = 'p_options.thresholds';
            END IF;
            SELECT pg_catalog.array_agg(DISTINCT (t.v #>> '{}')::integer ORDER BY (t.v #>> '{}')::integer)
            INTO v_thresholds
            FROM pg_catalog.jsonb_array_elements(v_value) AS t (v);
        ELSE
            RAISE EXCEPTION 'unknown key p_options.%: the options are timezone and thresholds', v_key
                USING ERRCODE = '22023', COLUMN = 'p_options.' || v_key;
        END IF;
    END LOOP;

    IF NOT EXISTS (SELECT FROM tokentrack.accounts AS a WHERE a.id = p_account_id) THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'account_not_found',
            'message', pg_catalog.format('account %s does not exist', p_account_id)
        );
    END IF;

    INSERT INTO tokentrack.budgets (account_id, subject, unit, budget_window, timezone, limit_amount, thresholds)
    VALUES (
        p_account_id, p_subject, p_unit, p_window, COALESCE(v_timezone, 'UTC'), p_limit,
        COALESCE(v_thresholds, '{80,100}'::integer[])
    )
    ON CONFLICT ON CONSTRAINT budgets_one_per_kind DO NOTHING
    RETURNING * INTO v_budget;
    v_created := FOUND;
    IF v_created THEN
        v_changed := true;
    ELSE
        SELECT b.id INTO STRICT v_budget.id FROM tokentrack.budgets AS b
        WHERE
            b.account_id = p_account_id AND b.subject IS NOT DISTINCT FROM p_subject
            AND b.unit = p_unit AND b.budget_window = p_window;
        PERFORM tokentrack.lock_budgets(p_account_id, ARRAY[v_budget.id]);
        -- Under the lock (a new statement: what a change that held it committed).
        SELECT b.* INTO STRICT v_budget FROM tokentrack.budgets AS b
        WHERE b.account_id = p_account_id AND b.id = v_budget.id;
        IF v_budget.limit_amount <> p_limit
            OR v_budget.timezone <> COALESCE(v_timezone, v_budget.timezone)
            OR v_budget.thresholds <> COALESCE(v_thresholds, v_budget.thresholds) THEN
            UPDATE tokentrack.budgets AS b
            SET
                limit_amount = p_limit,
                timezone = COALESCE(v_timezone, b.timezone),
                thresholds = COALESCE(v_thresholds, b.thresholds)
            WHERE b.account_id = p_account_id AND b.id = v_budget.id
            RETURNING b.* INTO v_budget;
            v_changed := true;
        END IF;
    END IF;
    IF v_changed THEN
        INSERT INTO tokentrack.budget_changes (account_id, budget_id, limit_amount, timezone, thresholds)
        VALUES (p_account_id, v_budget.id, v_budget.limit_amount, v_budget.timezone, v_budget.thresholds);
    END IF;

    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'budget_id', v_budget.id,
        'created', v_created,
        'changed', v_changed,
        'subject', v_budget.subject,
        'unit', v_budget.unit,
        'window', v_budget.budget_window,
        'limit', v_budget.limit_amount,
        'timezone', v_budget.timezone,
        'thresholds', pg_catalog.to_jsonb(v_budget.thresholds)
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.set_budget(uuid, text, text, text, bigint, jsonb) IS
'Creates or changes a budget of an account or of a subject (tokens or cost_micros, per calendar '
'window in a time zone or in total); every change is recorded in budget_changes.';

REVOKE ALL ON FUNCTION tokentrack.set_budget(uuid, text, text, text, bigint, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.set_budget(uuid, text, text, text, bigint, jsonb) TO tokentrack_service;
