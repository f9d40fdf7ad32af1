-- finalize: finalize_report_usage of a seeded report (active reservation, 7 unbilled steps);
-- the sequence hands each report out once. Report n belongs to account lo + n % (hi - lo + 1)
-- (bench.seed_finalize seeds them with the same formula).
SELECT nextval('bench.finalize_seq') AS n \gset
\set a :lo + :n % (:hi - :lo + 1)
SELECT tokentrack.finalize_report_usage(bench.report(2, :n), bench.account(:a));
