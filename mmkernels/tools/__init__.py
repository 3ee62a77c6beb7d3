"""Developer tools (static GPU kernel report)."""
