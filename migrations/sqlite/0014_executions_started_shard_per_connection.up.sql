-- PostgreSQL's 0014 counts the executions a user starts in a row of the committing
-- connection's own, so that commits of creations on different connections do not wait for
-- one row. SQLite commits one transaction at a time and keeps that count in one row a day
-- (0008): there is nothing to change; this migration keeps both backends at the same version.
SELECT 1;
