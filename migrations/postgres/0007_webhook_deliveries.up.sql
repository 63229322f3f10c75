-- Webhook deliveries already accepted, by the sender's delivery id (X-Turbocat-Delivery): a
-- replayed call is refused. Rows older than the timestamp tolerance can no longer be replayed
-- (their signed timestamp is refused first) and are purged as new deliveries arrive.
CREATE TABLE webhook_deliveries (
    deployment_id uuid        NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    delivery_id   text        COLLATE "C" NOT NULL CHECK (length(delivery_id) BETWEEN 1 AND 200),
    received_at   timestamptz NOT NULL,
    PRIMARY KEY (deployment_id, delivery_id)
);

CREATE INDEX webhook_deliveries_by_age ON webhook_deliveries (deployment_id, received_at);
