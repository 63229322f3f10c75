-- Reverts 0010: drops alert rules, their incidents and deliveries.
DROP INDEX executions_failed_finished_at;
DROP TABLE alert_deliveries;
DROP TABLE alert_incidents;
DROP TABLE alert_rules;
