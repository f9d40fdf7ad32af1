-- reserve-budgets: reserve.sql with three budgets. reserve for a new report on a budget
-- account (bench.seed_budget_accounts: 1000000 + n), whose month, team's day and key's minute
-- budgets all apply (the account's own, and the subjects' two), then finalize_report_usage (no
-- steps) releases it. Each call is its own transaction, as the client makes them.
-- pgbench -D lo=.. -D hi=..: the accounts (1000001..1001000 spread, 1000000..1000000 hot).
\set a random(:lo, :hi)
SELECT gen_random_uuid() AS r \gset
SELECT tokentrack.reserve(bench.account(:a), ':r', '{"tokens": 10000}', ARRAY['team:t' || :a, 'key:k' || :a]);
SELECT tokentrack.finalize_report_usage(':r', bench.account(:a));
