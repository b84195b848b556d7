"""The SQLite store's schema: one migration per version, the version kept in ``PRAGMA user_version``."""

from __future__ import annotations

# Each entry upgrades the schema by one version; the index is the version it produces - 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        head_digest TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        turns INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cache_read_tokens INTEGER NOT NULL DEFAULT 0,
        cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
        thinking_tokens INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX sessions_head ON sessions (head_digest);
    CREATE INDEX sessions_updated ON sessions (updated_at);
    """,
    # v2: client-chosen conversation ids (one session per id, whatever the model), forks, and
    # the turn bookkeeping that keeps a stateless resend off a session whose droid history holds
    # more than the client saw (a failed, interrupted or crashed turn).
    """
    ALTER TABLE sessions ADD COLUMN conversation_key TEXT;
    ALTER TABLE sessions ADD COLUMN parent_session_id TEXT;
    ALTER TABLE sessions ADD COLUMN in_flight INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN diverged INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN failed_turns INTEGER NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX sessions_conversation_key ON sessions (conversation_key)
        WHERE conversation_key IS NOT NULL;
    """,
    # v3: sessions belong to the API key that created them (its name; "" without auth);
    # conversation ids are unique per owner.
    """
    ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    DROP INDEX sessions_conversation_key;
    CREATE UNIQUE INDEX sessions_owner_conversation_key ON sessions (owner, conversation_key)
        WHERE conversation_key IS NOT NULL;
    CREATE INDEX sessions_owner_updated ON sessions (owner, updated_at);
    """,
    # v4: one row per turn that reached droid (completed or failed), with the dialect that asked
    # and, when the client asked to keep it (Responses' store), its output; sessions point at
    # their latest completed turn (Responses' previous_response_id continues from there).
    """
    ALTER TABLE sessions ADD COLUMN last_turn_id TEXT;
    CREATE TABLE turns (
        turn_id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        owner TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL,
        dialect TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL NOT NULL,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cache_read_tokens INTEGER NOT NULL DEFAULT 0,
        cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
        thinking_tokens INTEGER NOT NULL DEFAULT 0,
        output BLOB
    );
    CREATE INDEX turns_session ON turns (session_id);
    CREATE INDEX turns_owner_finished ON turns (owner, finished_at);
    """,
    # v5: the turns table becomes the usage ledger: the droid model that ran each turn, its
    # conversation id, droid's own credit estimate, and the cost (multiplier, standard tokens,
    # where the price came from, USD). Rows from before have cost_source 'unrecorded'.
    """
    ALTER TABLE turns ADD COLUMN droid_model TEXT NOT NULL DEFAULT '';
    ALTER TABLE turns ADD COLUMN conversation_key TEXT;
    ALTER TABLE turns ADD COLUMN factory_credits REAL NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN multiplier REAL;
    ALTER TABLE turns ADD COLUMN standard_tokens REAL NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN cost_source TEXT NOT NULL DEFAULT 'unrecorded';
    ALTER TABLE turns ADD COLUMN usd REAL;
    CREATE INDEX turns_finished ON turns (finished_at);
    """,
    # v6: several nodes: the registry, the node holding each session's live worker, and droid's
    # session files (appended chunks) so that another node can take a session over.
    """
    ALTER TABLE sessions ADD COLUMN node_id TEXT;
    CREATE INDEX sessions_node ON sessions (node_id);
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        capacity INTEGER NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        state TEXT NOT NULL
    );
    CREATE TABLE session_files (
        session_id TEXT NOT NULL,
        name TEXT NOT NULL,
        start_byte INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (session_id, name, start_byte)
    );
    """,
    # v7: what each turn sent droid besides text: images and documents, counted and in bytes.
    """
    ALTER TABLE turns ADD COLUMN attachments INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN attachment_bytes INTEGER NOT NULL DEFAULT 0;
    """,
)
