-- Reverts 0001: drops the users table (and its indexes). Every account is lost.
DROP TABLE users;
