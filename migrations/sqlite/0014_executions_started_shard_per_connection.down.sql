-- Nothing to undo (see the up script).
SELECT 1;
