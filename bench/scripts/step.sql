-- step: persist_step_usage of a new step (random name) on a report whose reservation stays
-- active for the whole run (seeded: bench.report(1, a * 100 + k), k in 1..:reports). The
-- model is priced (Workloads.setup), so the step is priced as record_step.sql's is.
-- pgbench -D lo=.. -D hi=.. -D reports=..: the accounts and their long-lived reports.
\set a random(:lo, :hi)
\set k random(1, :reports)
SELECT tokentrack.persist_step_usage(
    bench.report(1, :a * 100 + :k), bench.account(:a), 'step-' || gen_random_uuid(),
    1200, 340, NULL, 'gpt-4o'
);
