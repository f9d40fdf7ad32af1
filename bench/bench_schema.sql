-- Helpers of the benchmark (schema "bench"), installed next to tokentrack in the benchmark's
-- own throwaway database; never part of the tokentrack SQL.
--
-- Ids are deterministic so that pgbench scripts can name accounts and reports by number:
--   bench.account(n)      account n: 0 is the hot account, 1..1000 the spread accounts;
--                         1000000 + n: the same, with three budgets each (reserve-budgets)
--   bench.report(kind, n) report n of a kind: 1 long-lived (step workload), 2 seeded for the
--                         finalize workload, 3 history (growth), 4 expired (sweep), 5
--                         long-lived with budgets (the budget accounts' own)
-- Every seeding function keeps the data consistent with the contract: billed rows have their
-- usage_ledger row and their period's tokens_used, so tokentrack.reconcile() stays ok.

CREATE SCHEMA bench;

CREATE FUNCTION bench.account(n bigint) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ('00000000-0000-0000-0000-' || lpad(n::text, 12, '0'))::uuid $$;

CREATE FUNCTION bench.report(kind integer, n bigint) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ('00000000-0000-0000-' || lpad(kind::text, 4, '0') || '-' || lpad(n::text, 12, '0'))::uuid $$;

-- The report numbers the finalize workload hands out (one report finalized once each).
CREATE SEQUENCE bench.finalize_seq;

-- Accounts 0..p_accounts, each with an active period of p_limit tokens.
CREATE FUNCTION bench.seed_accounts(p_accounts integer, p_limit bigint) RETURNS void
LANGUAGE sql
AS $$
    SELECT tokentrack.open_usage_period(bench.account(n), p_limit)
    FROM generate_series(0, p_accounts) AS n;
$$;

-- Long-lived active reservations for the step workload: report bench.report(1, a * 100 + k)
-- for account a in p_lo..p_hi and k in 1..p_per_account.
CREATE FUNCTION bench.seed_long_lived(p_lo integer, p_hi integer, p_per_account integer)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_answer jsonb;
BEGIN
    FOR v_answer IN
        SELECT tokentrack.try_reserve_tokens(bench.account(a), bench.report(1, a * 100 + k), 1000)
        FROM generate_series(p_lo, p_hi) AS a, generate_series(1, p_per_account) AS k
    LOOP
        IF NOT (v_answer ->> 'success')::boolean THEN
            RAISE EXCEPTION 'seeding a long-lived reservation was refused: %', v_answer;
        END IF;
    END LOOP;
END
$$;

-- The budget accounts of the reserve-budgets workload: accounts p_offset + n for n in
-- 0..p_accounts (0 the hot one), each with an active period of p_limit tokens and three
-- budgets of p_limit tokens (never the limit of a run): the account's month (subject NULL), its
-- team's day (team:t<account number>) and its key's minute (key:k<account number>); and, as
-- the plain accounts have (Session.create_database, Workloads.setup), long-lived reservations
-- holding all three: one per spread account, p_hot_reports for the hot one.
-- PL/pgSQL: its body names functions that an older tokentrack (a database rolled back to it)
-- does not have, and is only planned when called.
CREATE FUNCTION bench.seed_budget_accounts(
    p_offset integer, p_accounts integer, p_limit bigint, p_hot_reports integer
)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_a integer;
    v_k integer;
    v_answer jsonb;
BEGIN
    FOR v_a IN SELECT p_offset + n FROM generate_series(0, p_accounts) AS n LOOP
        PERFORM tokentrack.open_usage_period(bench.account(v_a), p_limit);
        PERFORM tokentrack.set_budget(bench.account(v_a), NULL, 'tokens', 'month', p_limit);
        PERFORM tokentrack.set_budget(bench.account(v_a), 'team:t' || v_a, 'tokens', 'day', p_limit);
        PERFORM tokentrack.set_budget(bench.account(v_a), 'key:k' || v_a, 'tokens', 'minute', p_limit);
        FOR v_k IN 1..CASE WHEN v_a = p_offset THEN p_hot_reports ELSE 1 END LOOP
            v_answer := tokentrack.reserve(
                bench.account(v_a), bench.report(5, v_a::bigint * 100 + v_k), '{"tokens": 1000}',
                ARRAY['team:t' || v_a, 'key:k' || v_a]
            );
            IF NOT (v_answer ->> 'success')::boolean
                OR pg_catalog.jsonb_array_length(v_answer -> 'budgets') <> 3 THEN
                RAISE EXCEPTION 'seeding a budget account''s reservation: %', v_answer;
            END IF;
        END LOOP;
    END LOOP;
END
$$;

-- Reports p_from..p_to of kind 2 for the finalize workload: each with an active reservation
-- and 7 unbilled steps; report n belongs to account p_lo + n % (p_hi - p_lo + 1) (the same
-- formula as bench/scripts/finalize.sql). Unbilled rows need no ledger row.
CREATE FUNCTION bench.seed_finalize(p_from bigint, p_to bigint, p_lo integer, p_hi integer)
RETURNS void
LANGUAGE sql
AS $$
    INSERT INTO tokentrack.reports (id, account_id, status)
    SELECT bench.report(2, n), bench.account(p_lo + n % (p_hi - p_lo + 1)), 'processing'
    FROM generate_series(p_from, p_to) AS n;

    INSERT INTO tokentrack.report_reservations (report_id, account_id, period_id, reserved_tokens)
    SELECT bench.report(2, n), p.account_id, p.id, 10000
    FROM generate_series(p_from, p_to) AS n
    INNER JOIN tokentrack.usage_periods AS p
        ON p.account_id = bench.account(p_lo + n % (p_hi - p_lo + 1)) AND p.status = 'active';

    INSERT INTO tokentrack.report_step_usage (
        report_id, account_id, step_name, input_tokens, output_tokens, total_tokens, model
    )
    SELECT bench.report(2, n), bench.account(p_lo + n % (p_hi - p_lo + 1)), s.name, 1200, 300, 1500, 'gpt-4o'
    FROM generate_series(p_from, p_to) AS n
    CROSS JOIN unnest(ARRAY['AN0', 'AN1.5', 'AN1.7', 'AN2', 'AN3', 'AN4', 'AN5']) AS s (name);
$$;

-- Removes the seeded finalize reports p_from..p_to that a run did not reach (all unbilled, so
-- no ledger row points at them), so that they neither hold budget nor slow later runs.
CREATE FUNCTION bench.drop_unused_finalize(p_from bigint, p_to bigint) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_ids uuid[];
    v_n bigint;
BEGIN
    SELECT array_agg(bench.report(2, n)) INTO v_ids FROM generate_series(p_from, p_to) AS n;
    IF EXISTS (
        SELECT FROM tokentrack.report_reservations
        WHERE report_id = ANY (v_ids) AND status <> 'active'
    ) THEN
        RAISE EXCEPTION 'unused finalize reports %..% include billed ones', p_from, p_to;
    END IF;
    DELETE FROM tokentrack.report_step_usage WHERE report_id = ANY (v_ids);
    DELETE FROM tokentrack.report_reservations WHERE report_id = ANY (v_ids);
    DELETE FROM tokentrack.reports WHERE id = ANY (v_ids);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;

-- History for the growth measurements: reports p_from..p_to of kind 3, each with a billed
-- reservation (completed; 1 in 50 expired by the sweep), its usage_ledger row and one billed
-- step (none for 1 in 1000 reports). Report n was created (n - 1) * p_every before now, so the
-- newest reports (the last 24 hours) are the same whatever the history's length.
-- Report status: 2 in 100 failed, 1 in 100 cancelled, the rest complete.
CREATE FUNCTION bench.seed_history(p_from bigint, p_to bigint, p_every interval) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    CREATE TEMP TABLE seed ON COMMIT DROP AS
    SELECT
        n,
        bench.report(3, n) AS report_id,
        p.account_id,
        p.id AS period_id,
        now() - (n - 1) * p_every AS created_at,
        CASE n % 100 WHEN 0 THEN 'failed' WHEN 1 THEN 'failed' WHEN 2 THEN 'cancelled' ELSE 'complete' END
            AS status,
        CASE WHEN n % 50 = 25 THEN 'expired' ELSE 'completed' END AS reservation_status,
        CASE WHEN n % 1000 = 500 THEN 0 ELSE 1500 END AS tokens
    FROM generate_series(p_from, p_to) AS n
    INNER JOIN tokentrack.usage_periods AS p
        ON p.account_id = bench.account(1 + n % 1000) AND p.status = 'active';

    INSERT INTO tokentrack.reports (id, account_id, status, token_usage, created_at)
    SELECT report_id, account_id, status, jsonb_build_object('totalTokens', tokens), created_at
    FROM seed;

    INSERT INTO tokentrack.report_reservations (
        report_id, account_id, period_id, status, reserved_tokens, billed_tokens,
        created_at, expires_at, finalized_at
    )
    SELECT
        report_id, account_id, period_id, reservation_status, 20000, tokens,
        created_at, created_at + interval '2 hours',
        created_at + CASE WHEN reservation_status = 'expired' THEN interval '2 hours' ELSE interval '10 minutes' END
    FROM seed;

    WITH entries AS (
        INSERT INTO tokentrack.usage_ledger (account_id, period_id, kind, tokens, reports, report_id, created_at)
        SELECT
            account_id, period_id,
            CASE WHEN reservation_status = 'expired' THEN 'report_expired' ELSE 'report_billed' END,
            tokens, CASE WHEN status = 'complete' THEN 1 ELSE 0 END, report_id, created_at + interval '10 minutes'
        FROM seed
        RETURNING id, report_id, period_id
    )
    INSERT INTO tokentrack.report_step_usage (
        report_id, account_id, step_name, input_tokens, output_tokens, total_tokens, model,
        completed_at, billed_at, billed_period_id, billing_entry_id
    )
    SELECT
        s.report_id, s.account_id, 'AN0', 1200, 300, 1500, 'gpt-4o',
        s.created_at + interval '5 minutes', s.created_at + interval '10 minutes', e.period_id, e.id
    FROM seed AS s INNER JOIN entries AS e ON e.report_id = s.report_id
    WHERE s.tokens > 0;

    UPDATE tokentrack.usage_periods AS p
    SET tokens_used = p.tokens_used + t.tokens, reports_count = p.reports_count + t.reports,
        period_start = LEAST(p.period_start, t.oldest - interval '1 day')
    FROM (
        SELECT period_id, sum(tokens) AS tokens,
            count(*) FILTER (WHERE status = 'complete') AS reports, min(created_at) AS oldest
        FROM seed GROUP BY period_id
    ) AS t
    WHERE p.id = t.period_id;
END
$$;

-- The sweep's backlog: reports p_from..p_to of kind 4 whose active reservations expired an
-- hour ago, each with p_steps unbilled steps, spread over accounts 1..1000.
CREATE FUNCTION bench.seed_expired(p_from bigint, p_to bigint, p_steps integer) RETURNS void
LANGUAGE sql
AS $$
    INSERT INTO tokentrack.reports (id, account_id, status, created_at)
    SELECT bench.report(4, n), bench.account(1 + n % 1000), 'processing', now() - interval '3 hours'
    FROM generate_series(p_from, p_to) AS n;

    INSERT INTO tokentrack.report_reservations (
        report_id, account_id, period_id, reserved_tokens, created_at, expires_at
    )
    SELECT bench.report(4, n), p.account_id, p.id, 20000, now() - interval '3 hours', now() - interval '1 hour'
    FROM generate_series(p_from, p_to) AS n
    INNER JOIN tokentrack.usage_periods AS p
        ON p.account_id = bench.account(1 + n % 1000) AND p.status = 'active';

    INSERT INTO tokentrack.report_step_usage (
        report_id, account_id, step_name, input_tokens, output_tokens, total_tokens, model, completed_at
    )
    SELECT bench.report(4, n), bench.account(1 + n % 1000), 'AN' || k, 1200, 300, 1500, 'gpt-4o',
        now() - interval '150 minutes'
    FROM generate_series(p_from, p_to) AS n, generate_series(1, p_steps) AS k;
$$;
