"""Ingest: validates producer events against the pipeline
spec; bad input goes to the dead-letter topic."""

from loopline.services.ingest.service import IngestService, derived_event_id
from loopline.services.ingest.settings import IngestSettings
from loopline.validation import Accepted, Rejection, Validator

__all__ = ["Accepted", "IngestService", "IngestSettings", "Rejection", "Validator",
           "derived_event_id"]
