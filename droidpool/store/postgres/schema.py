"""The PostgreSQL store's schema: one migration per version, the versions applied kept in
``droidpool_schema``."""

from __future__ import annotations

# Each entry upgrades the schema by one version. v1 is SQLite's v5 in one step.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        head_digest TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        turns BIGINT NOT NULL DEFAULT 0,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        cache_read_tokens BIGINT NOT NULL DEFAULT 0,
        cache_creation_tokens BIGINT NOT NULL DEFAULT 0,
        thinking_tokens BIGINT NOT NULL DEFAULT 0,
        conversation_key TEXT,
        parent_session_id TEXT,
        in_flight BOOLEAN NOT NULL DEFAULT FALSE,
        diverged BOOLEAN NOT NULL DEFAULT FALSE,
        failed_turns BIGINT NOT NULL DEFAULT 0,
        owner TEXT NOT NULL DEFAULT '',
        last_turn_id TEXT
    );
    CREATE INDEX sessions_head ON sessions (head_digest);
    CREATE INDEX sessions_updated ON sessions (updated_at);
    CREATE UNIQUE INDEX sessions_owner_conversation_key ON sessions (owner, conversation_key)
        WHERE conversation_key IS NOT NULL;
    CREATE INDEX sessions_owner_updated ON sessions (owner, updated_at);
    CREATE SEQUENCE turns_seq;
    CREATE TABLE turns (
        turn_id TEXT PRIMARY KEY,
        seq BIGINT NOT NULL UNIQUE,
        session_id TEXT NOT NULL,
        owner TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL,
        dialect TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION NOT NULL,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        cache_read_tokens BIGINT NOT NULL DEFAULT 0,
        cache_creation_tokens BIGINT NOT NULL DEFAULT 0,
        thinking_tokens BIGINT NOT NULL DEFAULT 0,
        output BYTEA,
        droid_model TEXT NOT NULL DEFAULT '',
        conversation_key TEXT,
        factory_credits DOUBLE PRECISION NOT NULL DEFAULT 0,
        multiplier DOUBLE PRECISION,
        standard_tokens DOUBLE PRECISION NOT NULL DEFAULT 0,
        cost_source TEXT NOT NULL DEFAULT 'unrecorded',
        usd DOUBLE PRECISION
    );
    CREATE INDEX turns_session ON turns (session_id);
    CREATE INDEX turns_owner_finished ON turns (owner, finished_at);
    CREATE INDEX turns_finished ON turns (finished_at);
    """,
    # v2: several nodes (SQLite's v6): the registry, each session's node, droid's session files.
    """
    ALTER TABLE sessions ADD COLUMN node_id TEXT;
    CREATE INDEX sessions_node ON sessions (node_id);
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        capacity BIGINT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL
    );
    CREATE TABLE session_files (
        session_id TEXT NOT NULL,
        name TEXT NOT NULL,
        start_byte BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (session_id, name, start_byte)
    );
    """,
    # v3: what each turn sent droid besides text (SQLite's v7).
    """
    ALTER TABLE turns ADD COLUMN attachments BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN attachment_bytes BIGINT NOT NULL DEFAULT 0;
    """,
)
