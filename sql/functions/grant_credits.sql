-- version: 20261211000000
--
-- tokentrack.grant_credits(p_account_id uuid, p_budget_id uuid, p_amount bigint,
--     p_expires_at timestamptz, p_idempotency_key text, p_reason text) -> jsonb
--
-- Raises a budget's limit by p_amount (in the budget's unit) until p_expires_at (NULL:
-- never): one credit_grants row, granted now. While unexpired, the grant counts in every window
-- of the budget it overlaps (budget_limit: granted before the window ends; a total budget's one
-- window always), so reserve and extend_reservation grant more there; once expired it stops
-- counting, and what was billed under it stays billed. The budget's limit_amount and its
-- budget_changes are not touched: reconcile explains the effective limit as limit_amount (its
-- newest change) plus the grants.
-- Idempotent by p_idempotency_key, scoped to the account and to grants: a call with a key the
-- account already used for a grant with the same budget, amount, expiry and reason is a retry
-- and answers as the first call did with "duplicate": true (nothing written, even after the
-- grant expired); with other arguments it is refused with idempotency_conflict (nothing
-- written; grant_id names the first grant).
-- Locks: the budget (lock_budgets: FOR UPDATE, rank 4 of the global order, docs/REVIEW.md), so
--   that a grant never lands between a reservation's read of the limit and its decision (and
--   a threshold check under that lock sees it). Nothing else.
-- Writes: one credit_grants row.
-- Answer: {"success": true, "grant_id", "budget_id", "unit", "amount", "expires_at",
--   "granted_at", "window_start" (the budget's current window), "limit" (the budget's
--   effective limit in that window now, this grant included while unexpired), "duplicate"}.
-- Refusals (success false, nothing written), in this order: account_not_found,
--   idempotency_conflict (with grant_id), budget_not_found (the account has no such budget).
-- Errors: 25000 under REPEATABLE READ or SERIALIZABLE; 22004 a NULL account, budget, amount,
--   key or reason; 22023 a non-positive amount, an empty key or reason, an expires_at not
--   after now() (checked after the key, so a retry of an expired grant is still a duplicate);
--   22001 a key over 200 or a reason over 1000 characters.
CREATE OR REPLACE FUNCTION tokentrack.grant_credits(
    p_account_id uuid,
    p_budget_id uuid,
    p_amount bigint,
    p_expires_at timestamptz,
    p_idempotency_key text,
    p_reason text
)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
DECLARE
    v_grant tokentrack.credit_grants%ROWTYPE;
    v_budget tokentrack.budgets%ROWTYPE;
    v_window_start timestamptz;
BEGIN
    -- READ COMMITTED only: see require_read_committed (a retry racing the first call waits for
    -- its insert and then reads it).
    PERFORM tokentrack.require_read_committed('grant_credits');
    IF p_account_id IS NULL THEN
        RAISE EXCEPTION 'p_account_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_account_id';
    END IF;
    IF p_budget_id IS NULL THEN
        RAISE EXCEPTION 'p_budget_id must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_budget_id';
    END IF;
    IF p_amount IS NULL THEN
        RAISE EXCEPTION 'p_amount must not be NULL' USING ERRCODE = '22004', COLUMN = 'p_amount';
    END IF;
    IF p_amount <= 0 THEN
        RAISE EXCEPTION 'p_amount must be positive (got %)', p_amount USING ERRCODE = '22023', COLUMN = 'p_amount';
    END IF;
    PERFORM tokentrack.check_correction_text(p_idempotency_key, 'p_idempotency_key', 200);
    PERFORM tokentrack.check_correction_text(p_reason, 'p_reason', 1000);

    IF NOT EXISTS (SELECT FROM tokentrack.accounts AS a WHERE a.id = p_account_id) THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'account_not_found',
            'message', pg_catalog.format('account %s does not exist', p_account_id)
        );
    END IF;

    SELECT g.* INTO v_grant FROM tokentrack.credit_grants AS g
    WHERE g.account_id = p_account_id AND g.idempotency_key = p_idempotency_key;
    IF NOT FOUND THEN
        IF p_expires_at IS NOT NULL AND p_expires_at <= pg_catalog.now() THEN
            RAISE EXCEPTION 'p_expires_at must be in the future (got %)', p_expires_at
                USING ERRCODE = '22023', COLUMN = 'p_expires_at';
        END IF;
        PERFORM tokentrack.lock_budgets(p_account_id, ARRAY[p_budget_id]);
        SELECT b.* INTO v_budget FROM tokentrack.budgets AS b
        WHERE b.account_id = p_account_id AND b.id = p_budget_id;
        IF NOT FOUND THEN
            RETURN pg_catalog.jsonb_build_object(
                'success', false, 'error', 'budget_not_found',
                'message', pg_catalog.format('account %s has no budget %s', p_account_id, p_budget_id)
            );
        END IF;
        INSERT INTO tokentrack.credit_grants (account_id, budget_id, amount, expires_at, idempotency_key, reason)
        VALUES (p_account_id, p_budget_id, p_amount, p_expires_at, p_idempotency_key, p_reason)
        ON CONFLICT ON CONSTRAINT credit_grants_one_per_key DO NOTHING
        RETURNING * INTO v_grant;
        IF FOUND THEN
            v_window_start := tokentrack.budget_window_start(
                v_budget.budget_window, v_budget.timezone, v_budget.created_at, pg_catalog.now()
            );
            RETURN pg_catalog.jsonb_build_object(
                'success', true,
                'grant_id', v_grant.id,
                'budget_id', v_grant.budget_id,
                'unit', v_budget.unit,
                'amount', v_grant.amount,
                'expires_at', v_grant.expires_at,
                'granted_at', v_grant.granted_at,
                'window_start', v_window_start,
                'limit', tokentrack.budget_limit(p_account_id, p_budget_id, v_window_start),
                'duplicate', false
            );
        END IF;
        -- The same key, inserted meanwhile by a call that committed: answered as below.
        SELECT g.* INTO STRICT v_grant FROM tokentrack.credit_grants AS g
        WHERE g.account_id = p_account_id AND g.idempotency_key = p_idempotency_key;
    END IF;

    IF v_grant.budget_id <> p_budget_id OR v_grant.amount <> p_amount
        OR v_grant.expires_at IS DISTINCT FROM p_expires_at OR v_grant.reason <> p_reason THEN
        RETURN pg_catalog.jsonb_build_object(
            'success', false, 'error', 'idempotency_conflict',
            'message', pg_catalog.format(
                'idempotency key %s was used for grant %s with other arguments', p_idempotency_key, v_grant.id
            ),
            'grant_id', v_grant.id
        );
    END IF;
    SELECT b.* INTO STRICT v_budget FROM tokentrack.budgets AS b
    WHERE b.account_id = p_account_id AND b.id = v_grant.budget_id;
    v_window_start := tokentrack.budget_window_start(
        v_budget.budget_window, v_budget.timezone, v_budget.created_at, pg_catalog.now()
    );
    RETURN pg_catalog.jsonb_build_object(
        'success', true,
        'grant_id', v_grant.id,
        'budget_id', v_grant.budget_id,
        'unit', v_budget.unit,
        'amount', v_grant.amount,
        'expires_at', v_grant.expires_at,
        'granted_at', v_grant.granted_at,
        'window_start', v_window_start,
        'limit', tokentrack.budget_limit(p_account_id, v_grant.budget_id, v_window_start),
        'duplicate', true
    );
END
$function$;

COMMENT ON FUNCTION tokentrack.grant_credits(uuid, uuid, bigint, timestamptz, text, text) IS
'Grants credits to a budget: raises its limit by an amount until an expiry, in every window the '
'grant overlaps; one append-only credit_grants row, idempotent by key.';

REVOKE ALL ON FUNCTION tokentrack.grant_credits(uuid, uuid, bigint, timestamptz, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tokentrack.grant_credits(uuid, uuid, bigint, timestamptz, text, text) TO tokentrack_service;
