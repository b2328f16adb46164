"""Ingest: validates producer events against the pipeline spec; bad input goes to the dead-letter topic."""
