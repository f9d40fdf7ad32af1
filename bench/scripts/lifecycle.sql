-- lifecycle: a whole report, as tokentrack_client's track_report makes it: reserve, the seven
-- steps, then finish_report (outcome complete + billing). Nine calls, each its own transaction.
\set a random(:lo, :hi)
SELECT gen_random_uuid() AS r \gset
SELECT tokentrack.try_reserve_tokens(bench.account(:a), ':r', 20000);
SELECT tokentrack.persist_step_usage(':r', bench.account(:a), 'AN0', 1800, 420, NULL, 'gpt-4o');
SELECT tokentrack.persist_step_usage(':r', bench.account(:a), 'AN1.5', 2400, 610, NULL, 'gpt-4o');
SELECT tokentrack.persist_step_usage(':r', bench.account(:a), 'AN1.7', 2100, 380, NULL, 'gpt-4o');
SELECT tokentrack.persist_step_usage(':r', bench.account(:a), 'AN2', 3200, 900, NULL, 'gpt-4o');
SELECT tokentrack.persist_step_usage(':r', bench.account(:a), 'AN3', 2800, 750, NULL, 'gpt-4o');
SELECT tokentrack.persist_step_usage(':r', bench.account(:a), 'AN4', 1500, 500, NULL, 'gpt-4o');
SELECT tokentrack.persist_step_usage(':r', bench.account(:a), 'AN5', 900, 1200, NULL, 'gpt-4o');
SELECT tokentrack.finish_report(':r', bench.account(:a), 'complete');
