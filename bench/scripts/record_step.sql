-- record-step: record_step of a new step (random name) on a report whose reservation stays
-- active for the whole run, as step.sql: the same reports, the same model (priced), and the
-- same input and output counts (1200, 340), here with their classes: 400 of the input read
-- from the cache, 120 of the output spent reasoning. Both workloads price the step.
-- pgbench -D lo=.. -D hi=.. -D reports=..: the accounts and their long-lived reports.
\set a random(:lo, :hi)
\set k random(1, :reports)
SELECT tokentrack.record_step(
    bench.report(1, :a * 100 + :k), bench.account(:a), 'step-' || gen_random_uuid(),
    '{"input_tokens": 1200, "cached_input_tokens": 400, "output_tokens": 340, "reasoning_tokens": 120}',
    'gpt-4o'
);
