-- Version 20261212000000: notifications
--
-- Soft-threshold notifications (Part 2 of the contract, "Notifications"; invariant 9): when
-- billing (finalize, finish_report, the sweep, a late step), an adjustment or a reservation
-- (reserve, try_reserve_tokens, extend_reservation) takes a budget window's used amount plus
-- its active, unexpired holds from below one of the budget's thresholds to at or above it,
-- that transaction records exactly one notification for (budget, window, threshold)
-- (tokentrack.note_crossings) and sends NOTIFY tokentrack_notifications, which PostgreSQL
-- delivers only after commit.
--   * notifications: one row per (account, budget, window_start, threshold) ever crossed
--     (notifications_one_per_crossing), with what was used and the effective limit then, and
--     its delivery state: claimed_by and lease_until while a consumer holds it
--     (claim_notifications), acked_at and acked_by once one acknowledged it
--     (ack_notification), attempts (how many times it was handed out).
-- A threshold of t percent of the window's effective limit L (budget_limit) is the amount
-- ceil(L * t / 100): crossed when used + held goes from below it to at or above it. A limit
-- of 0 is never crossed (used + held never goes below 0).
-- Citus: the primary key, the unique constraint and the foreign key lead with account_id, and
-- the row level security policies call current_account_id() without a subquery. The two
-- other indexes (by id for ack_notification, the unacknowledged ones for
-- claim_notifications) are plain indexes, not constraints.
-- Not append-only: the delivery columns change (claim, ack); the crossing columns never do
-- (the functions never update them, and no role but the owner may write the table).

-- Pin name resolution for this version's transaction (see version 20251219000000).
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE tokentrack.notifications (
    account_id uuid NOT NULL,
    id bigint GENERATED ALWAYS AS IDENTITY,
    budget_id uuid NOT NULL,
    subject text,
    unit text NOT NULL,
    budget_window text NOT NULL,
    window_start timestamptz NOT NULL,
    threshold integer NOT NULL CONSTRAINT notifications_threshold_valid CHECK (
        threshold BETWEEN 1 AND 1000
    ),
    used bigint NOT NULL CONSTRAINT notifications_used_non_negative CHECK (used >= 0),
    limit_amount bigint NOT NULL CONSTRAINT notifications_limit_non_negative CHECK (
        limit_amount >= 0
    ),
    created_at timestamptz NOT NULL DEFAULT now(),
    claimed_by text,
    lease_until timestamptz,
    acked_at timestamptz,
    acked_by text,
    attempts integer NOT NULL DEFAULT 0 CONSTRAINT notifications_attempts_non_negative CHECK (
        attempts >= 0
    ),
    CONSTRAINT notifications_pkey PRIMARY KEY (account_id, id),
    CONSTRAINT notifications_one_per_crossing UNIQUE (account_id, budget_id, window_start, threshold),
    CONSTRAINT notifications_budget_fk FOREIGN KEY (account_id, budget_id)
    REFERENCES tokentrack.budgets (account_id, id) ON DELETE RESTRICT,
    CONSTRAINT notifications_claim_complete CHECK ((claimed_by IS NULL) = (lease_until IS NULL)),
    CONSTRAINT notifications_ack_complete CHECK ((acked_at IS NULL) = (acked_by IS NULL))
);

COMMENT ON TABLE tokentrack.notifications IS
'One row per (budget, window, threshold) crossed: used (used + active holds right after the '
'change that crossed it) and limit_amount (the effective limit then), and its delivery state '
'(claimed_by, lease_until, attempts, acked_at, acked_by). Written by note_crossings, '
'claim_notifications and ack_notification only.';

-- ack_notification finds a notification by its id alone.
CREATE INDEX notifications_by_id ON tokentrack.notifications (id);
-- claim_notifications walks the unacknowledged ones, oldest first; acknowledged ones leave it.
CREATE INDEX notifications_unacked ON tokentrack.notifications (id) WHERE acked_at IS NULL;

ALTER TABLE tokentrack.notifications ENABLE ROW LEVEL SECURITY;

CREATE POLICY notifications_reader_own ON tokentrack.notifications
FOR SELECT TO tokentrack_reader USING (account_id = tokentrack.current_account_id());
CREATE POLICY notifications_service_read ON tokentrack.notifications
FOR SELECT TO tokentrack_service USING (TRUE);

REVOKE ALL ON tokentrack.notifications FROM PUBLIC;
GRANT SELECT ON tokentrack.notifications TO tokentrack_service, tokentrack_reader;
