"""The accounting service: every event into ClickHouse, analytics and audit replay over HTTP."""
