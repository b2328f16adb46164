"""Avro schemas of every Loopline topic: the contracts between services
(installed as loopline.schemas)."""
