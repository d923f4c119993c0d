"""The catalog: its tables, the connection and schema upgrades, the record functions, the status snapshot."""
