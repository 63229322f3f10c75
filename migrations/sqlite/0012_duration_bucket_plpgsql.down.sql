-- Nothing to revert (see the up script).
SELECT 1;
