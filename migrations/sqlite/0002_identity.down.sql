-- Reverts 0002: drops sessions, tokens, API keys and the audit trail.
DROP TABLE audit_logs;
DROP TABLE api_keys;
DROP TABLE password_reset_tokens;
DROP TABLE refresh_tokens;
DROP TABLE sessions;
