-- Least privilege for the gateway's PostgreSQL database: two roles.
--
--   gateway_admin  owns the tables: `gateway db migrate`, `gateway db import`,
--                  `gateway audit prune`. Used by an operator, not by a running gateway.
--   gateway        what gateway instances and the portal connect as: it reads and
--                  writes the shared state, and may only INSERT and SELECT audit
--                  events (no UPDATE, no DELETE, so even the prune marker the
--                  append-only trigger honours does not let it delete).
--
-- Run as a superuser, connected to the gateway's database, TWICE:
--   1. before the first migrate (creates the roles and the schema privileges):
--        psql -d gateway -f docs/postgresql-roles.sql
--   2. after every `gateway db migrate` run as gateway_admin (grants on the tables it made):
--        psql -d gateway -f docs/postgresql-roles.sql
-- It is idempotent. Set the passwords yourself (never in this file):
--        psql -d gateway -c '\password gateway'   and   '\password gateway_admin'
-- and put them in the files `database.password_file` names.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'gateway_admin') THEN
        CREATE ROLE gateway_admin LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'gateway') THEN
        CREATE ROLE gateway LOGIN;
    END IF;
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO gateway_admin, gateway', current_database());
END
$$;

-- The admin creates the tables (so owns them); the gateway may only use what is granted below.
GRANT USAGE, CREATE ON SCHEMA public TO gateway_admin;
GRANT USAGE ON SCHEMA public TO gateway;
REVOKE CREATE ON SCHEMA public FROM gateway;

-- Grants per table, on the tables that exist now (run again after a migrate adds tables).
DO $$
DECLARE
    grants CONSTANT text[][] := ARRAY[
        -- table,           privileges for the gateway role
        ['schema_version',  'SELECT'],
        ['events',          'SELECT, INSERT'],                  -- audit: append-only
        ['audit_chain_heads', 'SELECT, INSERT, UPDATE'],        -- each instance's chain head
        ['audit_marks',     'SELECT, INSERT'],                  -- signed checkpoints: append-only
        ['users',           'SELECT, INSERT, UPDATE, DELETE'],
        ['login_failures',  'SELECT, INSERT, UPDATE, DELETE'],
        ['lockouts',        'SELECT, INSERT, UPDATE, DELETE'],
        ['sessions',        'SELECT, INSERT, UPDATE, DELETE'],
        ['certificates',    'SELECT, INSERT, UPDATE'],          -- CA records: never deleted
        ['crls',            'SELECT, INSERT, UPDATE'],
        ['meta',            'SELECT, INSERT, UPDATE']
    ];
    entry text[];
BEGIN
    FOREACH entry SLICE 1 IN ARRAY grants LOOP
        IF to_regclass(format('public.%I', entry[1])) IS NOT NULL THEN
            EXECUTE format('REVOKE ALL ON public.%I FROM gateway', entry[1]);
            EXECUTE format('GRANT %s ON public.%I TO gateway', entry[2], entry[1]);
        END IF;
    END LOOP;
END
$$;

-- Identity columns need no sequence grant; other sequences (if a component has one) do.
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO gateway;
