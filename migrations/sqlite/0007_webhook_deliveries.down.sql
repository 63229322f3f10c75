-- Reverts 0007: drops the log of webhook deliveries.
DROP TABLE webhook_deliveries;
