"""Sans-IO protocol cores: pure classes that take bytes/str and return events."""
