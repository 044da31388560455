"""Writers of files other tools read."""
