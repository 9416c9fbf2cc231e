-- Runs that a start attempt made but its turn does not follow: the attempt's answer came back
-- after a newer attempt had taken its lease (Parallel or Postgres was slow, the worker froze).
-- Each is billed and never read; it is kept here with its run id, so operators can see (and
-- reconcile with Parallel's invoice) every run the service paid for. See README, "Guarantees".
CREATE TABLE turn_extra_run (
    turn_id         text NOT NULL REFERENCES turn (id) ON DELETE CASCADE,
    attempt         integer NOT NULL,
    run_id          text NOT NULL,
    interaction_id  text,
    found_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (turn_id, attempt)
);
