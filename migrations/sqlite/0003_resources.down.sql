-- Reverts 0003: drops agents, workflows, templates and deployments with their histories.
DROP TABLE deployment_events;
DROP TABLE deployments;
DROP TABLE templates;
DROP TABLE workflow_steps;
DROP TABLE workflows;
DROP TABLE agent_versions;
DROP TABLE agents;
