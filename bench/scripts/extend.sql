-- extend: a reservation taken, raised, then released. try_reserve_tokens for a new report,
-- extend_reservation by 5,000 tokens, then finalize_report_usage (no steps) releases it. Each
-- call is its own transaction, as the client makes them. pgbench -D lo=.. -D hi=..: the
-- accounts (1..1000 spread, 0..0 hot).
\set a random(:lo, :hi)
SELECT gen_random_uuid() AS r \gset
SELECT tokentrack.try_reserve_tokens(bench.account(:a), ':r', 10000);
SELECT tokentrack.extend_reservation(':r', bench.account(:a), '{"tokens": 5000}');
SELECT tokentrack.finalize_report_usage(':r', bench.account(:a));
