-- The team stack's databases, created once on an empty cluster (docker-entrypoint-initdb.d runs it as
-- POSTGRES_USER, who owns them; tests/team/stack.py runs the same file on its loopback server):
--   mlflow       MLflow's tracking and model registry store (--backend-store-uri)
--   mlflow_auth  the users and permissions of MLflow's basic-auth app (mlflow/basic_auth.ini)
--   prefect      Prefect's server (flows, runs, deployments, work pools)
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
