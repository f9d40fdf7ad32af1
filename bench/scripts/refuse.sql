-- refuse: a reservation refused. try_reserve_tokens for an account that does not exist
-- (account_not_found: the refusal that reads one index entry and writes nothing else, so
-- that the cost of counting it, since version 20261213000000, is the largest share of it).
-- pgbench -D lo=.. -D hi=..: accounts that do not exist.
\set a random(:lo, :hi)
SELECT tokentrack.try_reserve_tokens(bench.account(:a), gen_random_uuid(), 10000);
