"""specrt."""
