"""The stores, each with one owner: the journal (readings, events and command results in
SQLite until every consumer has them), the state file (small mutable state in TinyDB,
written atomically), the audit trail (hash-chained, rotated), the account store (the one
writer of prepaid accounts) and the data folder's layout, lock and disk reserve."""
