-- PostgreSQL's 0012 makes its duration bucket function PL/pgSQL (a SQL function was planned
-- again on every call from the rollup triggers). SQLite has no functions of its own: its
-- triggers write the bucket's expression out in place (0008), so there is nothing to change;
-- this migration keeps both backends at the same version.
SELECT 1;
