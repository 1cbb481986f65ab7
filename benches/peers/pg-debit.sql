\set agent random(0, 999)
\set key random(1, 9000000000000000000)
SELECT debit('bench-' || :agent, :client_id || '-' || :key, 1);
