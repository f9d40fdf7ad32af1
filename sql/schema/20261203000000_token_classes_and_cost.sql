-- Version 20261203000000: token_classes_and_cost
--
-- What a step costs (Part 2 of the contract, "Token classes" and "Prices and cost"):
--   * report_step_usage gains the canonical token classes besides input, output and total:
--     cached_input_tokens and cache_write_tokens (both part of input_tokens, disjoint) and
--     reasoning_tokens (part of output_tokens), with named constraints for the inclusions, and
--     cost_micros: the step's cost, computed once when it is recorded from the price in effect
--     at its completed_at, NULL when its model had no price then (the step is "unpriced").
--     Rows recorded before this version hold 0 in the new classes and a NULL cost.
--   * tokentrack.model_prices: prices per model name (exact, or a pattern with `*`) from an
--     effective_from on, per class, in micros per million tokens. Rows are never edited or
--     deleted (a trigger refuses it, SQLSTATE 55000): a new price is a new row, so every
--     stored cost stays explainable.
-- The functions (record_step, set_model_price and the internal model_price_at and
-- record_step_usage; persist_step_usage and finalize_reservation changed) live in
-- sql/functions/. Locks: adding the columns takes report_step_usage ACCESS EXCLUSIVE for as
-- long as the four CHECK constraints take to validate the existing rows (one scan); adding
-- columns with constant defaults rewrites nothing.
--
-- Citus: model_prices holds no account data (one price list per installation): it is meant to
-- be a reference table, replicated to every node, so its keys do not lead with account_id and
-- it has no row level security; the step rows (distributed by account_id) only read it.

-- Pin name resolution for this version's transaction (see version 20251219000000).
SET LOCAL search_path = pg_catalog, pg_temp;

ALTER TABLE tokentrack.report_step_usage
ADD COLUMN cached_input_tokens integer NOT NULL DEFAULT 0,
ADD COLUMN cache_write_tokens integer NOT NULL DEFAULT 0,
ADD COLUMN reasoning_tokens integer NOT NULL DEFAULT 0,
ADD COLUMN cost_micros bigint,
ADD CONSTRAINT report_step_usage_classes_non_negative CHECK (
    cached_input_tokens >= 0 AND cache_write_tokens >= 0 AND reasoning_tokens >= 0
),
ADD CONSTRAINT report_step_usage_cache_within_input CHECK (
    cached_input_tokens::bigint + cache_write_tokens::bigint <= input_tokens::bigint
),
ADD CONSTRAINT report_step_usage_reasoning_within_output CHECK (reasoning_tokens <= output_tokens),
ADD CONSTRAINT report_step_usage_cost_non_negative CHECK (cost_micros >= 0);

COMMENT ON COLUMN tokentrack.report_step_usage.cached_input_tokens IS
'Prompt tokens read from a prompt cache: part of input_tokens, disjoint from cache_write_tokens.';
COMMENT ON COLUMN tokentrack.report_step_usage.cache_write_tokens IS
'Prompt tokens written to a prompt cache: part of input_tokens, disjoint from cached_input_tokens.';
COMMENT ON COLUMN tokentrack.report_step_usage.reasoning_tokens IS
'Generated tokens spent reasoning: part of output_tokens.';
COMMENT ON COLUMN tokentrack.report_step_usage.cost_micros IS
'The step''s cost in micro-units (10^-6 of the installation''s currency), computed once when the '
'step was recorded from the model''s price in effect at completed_at; NULL: unpriced.';

CREATE TABLE tokentrack.model_prices (
    id bigint GENERATED ALWAYS AS IDENTITY CONSTRAINT model_prices_pkey PRIMARY KEY,
    model text NOT NULL CONSTRAINT model_prices_model_valid CHECK (
        pg_catalog.length(model) BETWEEN 1 AND 200 AND pg_catalog.btrim(model) <> ''
    ),
    -- A model name containing `*` is a pattern: `*` matches any run of characters.
    is_pattern boolean NOT NULL GENERATED ALWAYS AS (pg_catalog.strpos(model, '*') > 0) STORED,
    -- The pattern as a LIKE pattern (escape character backslash): \, % and _ stand for
    -- themselves, `*` becomes %.
    like_pattern text NOT NULL GENERATED ALWAYS AS (
        pg_catalog.replace(
            pg_catalog.replace(
                pg_catalog.replace(pg_catalog.replace(model, '\', '\\'), '%', '\%'), '_', '\_'
            ),
            '*', '%'
        )
    ) STORED,
    -- Of several matching patterns the one with the most characters other than `*` wins.
    specificity integer NOT NULL GENERATED ALWAYS AS (
        pg_catalog.length(pg_catalog.replace(model, '*', ''))
    ) STORED,
    effective_from timestamptz NOT NULL,
    -- Named as p_prices' keys (input is a keyword to sqlfluff only, not to PostgreSQL).
    input numeric NOT NULL,  -- noqa: RF04
    cached_input numeric NOT NULL,
    cache_write numeric NOT NULL,
    output numeric NOT NULL,
    reasoning numeric NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT model_prices_one_per_start UNIQUE (model, effective_from),
    CONSTRAINT model_prices_non_negative CHECK (
        input >= 0 AND cached_input >= 0 AND cache_write >= 0 AND output >= 0 AND reasoning >= 0
    ),
    -- 10^12 micros per million tokens is a million currency units per million tokens: no model
    -- costs that, and the bound keeps every cost (at most 2^31 tokens per class) within bigint.
    CONSTRAINT model_prices_bounded CHECK (
        input <= 1e12 AND cached_input <= 1e12 AND cache_write <= 1e12 AND output <= 1e12
        AND reasoning <= 1e12
    )
);

COMMENT ON TABLE tokentrack.model_prices IS
'Prices per model (exact name, or a pattern with *) from effective_from on, per token class, in '
'micros per million tokens. Never edited or deleted: a new price is a new row.';

-- model_price_at: the exact name's prices by model_prices_one_per_start; the patterns (few)
-- by this partial index.
CREATE INDEX model_prices_patterns_idx ON tokentrack.model_prices (model, effective_from) WHERE is_pattern;

CREATE FUNCTION tokentrack.model_prices_are_immutable()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $function$
BEGIN
    RAISE EXCEPTION '% of tokentrack.model_prices is not allowed: prices are never edited in place', tg_op
        USING ERRCODE = '55000',
        HINT = 'Set a new price with tokentrack.set_model_price(model, prices, effective_from).';
END
$function$;

COMMENT ON FUNCTION tokentrack.model_prices_are_immutable() IS
'Trigger function refusing UPDATE, DELETE and TRUNCATE of tokentrack.model_prices (SQLSTATE 55000).';

REVOKE ALL ON FUNCTION tokentrack.model_prices_are_immutable() FROM PUBLIC;

CREATE TRIGGER model_prices_immutable
BEFORE UPDATE OR DELETE ON tokentrack.model_prices
FOR EACH ROW EXECUTE FUNCTION tokentrack.model_prices_are_immutable();

CREATE TRIGGER model_prices_no_truncate
BEFORE TRUNCATE ON tokentrack.model_prices
FOR EACH STATEMENT EXECUTE FUNCTION tokentrack.model_prices_are_immutable();

-- Prices are not account data: every application role may read them.
REVOKE ALL ON tokentrack.model_prices FROM PUBLIC;
GRANT SELECT ON tokentrack.model_prices TO tokentrack_service, tokentrack_reader;
