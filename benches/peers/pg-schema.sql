-- One durable debit in PostgreSQL, the same work as tally's debit: one transaction (one call
-- of debit()) that locks the agent's row, checks and records the idempotency key (24 h),
-- applies GCRA and the monthly cap, moves the balance and appends a journal row.
-- Loaded by run.sh; pg-debit.sql is the pgbench script that calls it.
CREATE TABLE agents (
  id             text PRIMARY KEY,
  balance_micros bigint NOT NULL CHECK (balance_micros >= 0),
  tat_us         bigint NOT NULL,
  interval_us    bigint NOT NULL,
  tolerance_us   bigint NOT NULL,
  cap_micros     bigint NOT NULL,
  period         int    NOT NULL,
  spent_micros   bigint NOT NULL,
  seq            bigint NOT NULL
);
CREATE TABLE idempotency (
  agent_id   text NOT NULL,
  key        text NOT NULL,
  receipt    text NOT NULL,
  expires_at timestamptz NOT NULL,
  PRIMARY KEY (agent_id, key)
);
CREATE TABLE journal (
  agent_id        text   NOT NULL,
  seq             bigint NOT NULL,
  kind            text   NOT NULL,
  amount_micros   bigint NOT NULL,
  balance_micros  bigint NOT NULL,
  idempotency_key text   NOT NULL,
  at              timestamptz NOT NULL,
  PRIMARY KEY (agent_id, seq)
);

-- Returns the receipt; a live key returns the stored one; a denial returns 'denied:<why>'
-- and writes nothing (run.sh then finds fewer journal rows than transactions and fails).
CREATE FUNCTION debit(p_agent text, p_key text, p_amount bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  a       agents%ROWTYPE;
  prev    text;
  now_ts  timestamptz := clock_timestamp();
  now_us  bigint := (extract(epoch FROM now_ts) * 1000000)::bigint;
  tat0    bigint;
  per     int := to_char(now_ts AT TIME ZONE 'UTC', 'YYYYMM')::int;
  spent   bigint;
  receipt text;
BEGIN
  SELECT * INTO a FROM agents WHERE id = p_agent FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown agent %', p_agent;
  END IF;
  SELECT i.receipt INTO prev FROM idempotency i
   WHERE i.agent_id = p_agent AND i.key = p_key AND i.expires_at > now_ts;
  IF FOUND THEN
    RETURN prev;
  END IF;
  -- GCRA, as in redis-debit.lua.
  tat0 := greatest(a.tat_us, now_us);
  IF tat0 - now_us > a.tolerance_us THEN
    RETURN 'denied:rate-limited';
  END IF;
  spent := CASE WHEN a.period = per THEN a.spent_micros ELSE 0 END;
  IF spent + p_amount > a.cap_micros THEN
    RETURN 'denied:monthly-cap';
  END IF;
  IF a.balance_micros < p_amount THEN
    RETURN 'denied:insufficient-funds';
  END IF;
  UPDATE agents
     SET balance_micros = a.balance_micros - p_amount, tat_us = tat0 + a.interval_us,
         period = per, spent_micros = spent + p_amount, seq = a.seq + 1
   WHERE id = p_agent;
  INSERT INTO journal VALUES
    (p_agent, a.seq + 1, 'debit', p_amount, a.balance_micros - p_amount, p_key, now_ts);
  receipt := p_agent || ':' || (a.seq + 1) || ':' || (a.balance_micros - p_amount);
  INSERT INTO idempotency VALUES (p_agent, p_key, receipt, now_ts + interval '24 hours')
    ON CONFLICT (agent_id, key) DO UPDATE
    SET receipt = EXCLUDED.receipt, expires_at = EXCLUDED.expires_at;
  RETURN receipt;
END
$$;
