"""Training methods, each a small module of pure functions plus one entry point."""
