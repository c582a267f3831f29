"""Per-session state: the session service and the stores it keeps records in."""
